//! Joining the fleet with a bootstrap token, free of I/O: the token as the hub keeps it (a hash of its secret,
//! the cluster it is for, until when, how many uses are left) and the decision whether a join may proceed.
//! Double opt-in: the token must be valid for the cluster **and** the cluster must be in the inventory, not
//! disabled. The gRPC edge (the bootstrap port, renewal on the agent session) is in `crate::bootstrap`.

use flotilla_common::fleet::ClusterSpec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A token as stored (`join-tokens/<id>`): never its secret, only the secret's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub cluster: String,
    pub secret_sha256: String,
    pub expires_ms: i64,
    pub uses_left: u32,
    pub created_by: String,
    pub created_ms: i64,
}

/// Most uses and longest life a token may be given.
pub const MAX_USES: u32 = 100;
pub const MAX_TTL_SECONDS: u32 = 7 * 24 * 3600;

pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new token for `cluster`: its id and secret (`<id>.<secret>` is what the operator hands over) and what
/// the hub keeps.
pub fn new_token(cluster: &str, ttl_s: u32, uses: u32, who: &str, now_ms: i64) -> (String, String, JoinToken) {
    let mut bytes = [0u8; 24];
    if rustls::crypto::aws_lc_rs::default_provider().secure_random.fill(&mut bytes).is_err() {
        bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    let id = hex::encode(&bytes[..6]);
    let secret = hex::encode(&bytes[6..]);
    let token = JoinToken {
        cluster: cluster.to_string(),
        secret_sha256: hash(&secret),
        expires_ms: now_ms + i64::from(ttl_s.clamp(60, MAX_TTL_SECONDS)) * 1000,
        uses_left: uses.clamp(1, MAX_USES),
        created_by: who.to_string(),
        created_ms: now_ms,
    };
    (id, secret, token)
}

/// `<id>.<secret>` split, or why it is not a token.
pub fn parse(text: &str) -> Result<(&str, &str), String> {
    let (id, secret) = text.trim().split_once('.').ok_or("the token is not of the form <id>.<secret>")?;
    let hexy = |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hexy(id) || !hexy(secret) {
        return Err("the token is not of the form <id>.<secret> (hex)".into());
    }
    Ok((id, secret))
}

/// Whether a join with token `id`.`secret` for `cluster` may proceed now.
pub fn admit(
    id: &str,
    token: Option<&JoinToken>,
    secret: &str,
    cluster: &str,
    inventory: Option<&ClusterSpec>,
    now_ms: i64,
) -> Result<(), String> {
    let Some(t) = token.filter(|t| constant_time_eq(&t.secret_sha256, &hash(secret))) else {
        return Err(format!("join token {id} is unknown (never issued, used up, or mistyped)"));
    };
    if t.expires_ms <= now_ms {
        return Err(format!("join token {id} expired {} s ago", (now_ms - t.expires_ms) / 1000));
    }
    if t.uses_left == 0 {
        return Err(format!("join token {id} has been used already"));
    }
    if t.cluster != cluster {
        return Err(format!("join token {id} is for cluster {}, not for cluster {cluster}", t.cluster));
    }
    match inventory {
        None => {
            Err(format!("cluster {cluster} is not in the fleet inventory: add clusters/{cluster}.yaml before it joins"))
        }
        Some(c) if c.disabled => Err(format!("cluster {cluster} is disabled in the fleet inventory")),
        Some(_) => Ok(()),
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_needs_a_valid_token_for_the_cluster_and_the_cluster_in_the_inventory() {
        let (id, secret, t) = new_token("eu-1", 3600, 1, "ada", 1_000_000);
        let spec = ClusterSpec::default();
        let ok = |t: &JoinToken, cluster: &str, inv: Option<&ClusterSpec>, now: i64| {
            admit(&id, Some(t), &secret, cluster, inv, now)
        };
        assert_eq!(ok(&t, "eu-1", Some(&spec), 1_000_001), Ok(()));
        let e = admit(&id, Some(&t), "00", "eu-1", Some(&spec), 1_000_001).unwrap_err();
        assert!(e.contains("unknown"), "{e}");
        assert!(admit(&id, None, &secret, "eu-1", Some(&spec), 0).unwrap_err().contains("unknown"));
        let e = ok(&t, "eu-1", Some(&spec), 1_000_000 + 3_600_000 + 5_000).unwrap_err();
        assert_eq!(e, format!("join token {id} expired 5 s ago"));
        let used = JoinToken { uses_left: 0, ..t.clone() };
        assert!(ok(&used, "eu-1", Some(&spec), 1_000_001).unwrap_err().contains("used already"));
        let e = ok(&t, "eu-2", Some(&spec), 1_000_001).unwrap_err();
        assert_eq!(e, format!("join token {id} is for cluster eu-1, not for cluster eu-2"));
        assert!(ok(&t, "eu-1", None, 1_000_001).unwrap_err().contains("not in the fleet inventory"));
        let off = ClusterSpec { disabled: true, ..Default::default() };
        assert!(ok(&t, "eu-1", Some(&off), 1_000_001).unwrap_err().contains("disabled"));
    }

    #[test]
    fn tokens_parse_and_bounds_hold() {
        let (id, secret, t) = new_token("c", 10, 1000, "ada", 0);
        assert_eq!(parse(&format!("{id}.{secret}")), Ok((id.as_str(), secret.as_str())));
        assert!(parse("nodot").is_err() && parse("zz.yy").is_err() && parse(".").is_err());
        assert_eq!((t.expires_ms, t.uses_left), (60_000, MAX_USES), "at least a minute, at most 100 uses");
        assert_ne!(t.secret_sha256, secret, "only the hash is kept");
    }
}
