//! The store's key schema, in one place: every key the hub reads or writes is built here.
//!
//! | key | value |
//! |---|---|
//! | `source/revision` | the commit the hub renders from |
//! | `source/error` | the last error following the repository (absent when none) |
//! | `fleet/clusters` | the inventory (name → labels), JSON |
//! | `fleet/problems` | problems of the current commit, JSON |
//! | `fleet/rendering` | how the current commit was rendered, JSON |
//! | `fleet/specs` | each app's rollout spec at the current commit (or why it is broken), JSON |
//! | `hub/clock` | the last time (Unix ms) the hub was known to run, for the downtime of a restart |
//! | `fleet/desired-clusters` | the clusters the hub has a desired state for (some with no app), JSON |
//! | `releases/<app>` | the app's desired state on every cluster: clusters grouped by value (digest, revision), JSON |
//! | `desired/<cluster>` | (read from stores written before releases) the cluster's desired state, JSON |
//! | `reports/<cluster>` | what the cluster's agent last reported, JSON |
//! | `rollouts/<app>` | the app's rollout progress and timeline, JSON |
//! | `rollout-data/<app>` | the app's rollout content per cluster, history, JSON |
//! | `bundles/<digest>` | a rendered bundle, canonical YAML |
//! | `audit/<unix ms>-<seq>-<id>` | one audited call (a control, a refresh, a join, a refusal) and its answer, JSON |
//! | `join-tokens/<id>` | a bootstrap token: its cluster, the SHA-256 of its secret, expiry, uses left, JSON |

/// A key of the hub's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    Revision,
    SourceError,
    Clusters,
    Problems,
    Rendering,
    Specs,
    Clock,
    DesiredClusters,
    Release(&'a str),
    Desired(&'a str),
    Report(&'a str),
    Rollout(&'a str),
    RolloutData(&'a str),
    Bundle(&'a str),
}

/// The key families with one key per name, for scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Desired,
    Release,
    Report,
    Rollout,
    RolloutData,
    Bundle,
    Audit,
    JoinToken,
}

impl Prefix {
    pub fn as_str(self) -> &'static str {
        match self {
            Prefix::Desired => "desired/",
            Prefix::Release => "releases/",
            Prefix::Report => "reports/",
            Prefix::Rollout => "rollouts/",
            Prefix::RolloutData => "rollout-data/",
            Prefix::Bundle => "bundles/",
            Prefix::Audit => "audit/",
            Prefix::JoinToken => "join-tokens/",
        }
    }

    /// The name in a key of this family.
    pub fn name(self, key: &str) -> &str {
        key.strip_prefix(self.as_str()).unwrap_or(key)
    }
}

impl Key<'_> {
    pub fn path(&self) -> String {
        match self {
            Key::Revision => "source/revision".into(),
            Key::SourceError => "source/error".into(),
            Key::Clusters => "fleet/clusters".into(),
            Key::Problems => "fleet/problems".into(),
            Key::Rendering => "fleet/rendering".into(),
            Key::Specs => "fleet/specs".into(),
            Key::Clock => "hub/clock".into(),
            Key::DesiredClusters => "fleet/desired-clusters".into(),
            Key::Release(a) => format!("{}{a}", Prefix::Release.as_str()),
            Key::Desired(c) => format!("{}{c}", Prefix::Desired.as_str()),
            Key::Report(c) => format!("{}{c}", Prefix::Report.as_str()),
            Key::Rollout(a) => format!("{}{a}", Prefix::Rollout.as_str()),
            Key::RolloutData(a) => format!("{}{a}", Prefix::RolloutData.as_str()),
            Key::Bundle(d) => format!("{}{d}", Prefix::Bundle.as_str()),
        }
    }
}

/// An audit record's key: ordered by time, then by a sequence within the millisecond.
pub fn audit(at_ms: i64, seq: u64) -> String {
    format!("{}{at_ms:016}-{seq:020}", Prefix::Audit.as_str())
}

/// The time (Unix ms) in an audit key.
pub fn audit_time(key: &str) -> Option<i64> {
    Prefix::Audit.name(key).split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_their_names() {
        for (k, p) in [
            (Key::Desired("eu-1"), Prefix::Desired),
            (Key::Release("shop"), Prefix::Release),
            (Key::Report("eu-1"), Prefix::Report),
            (Key::Rollout("shop"), Prefix::Rollout),
            (Key::RolloutData("shop"), Prefix::RolloutData),
            (Key::Bundle("sha256:ab"), Prefix::Bundle),
        ] {
            let path = k.path();
            assert!(path.starts_with(p.as_str()));
            assert!(matches!(p.name(&path), "eu-1" | "shop" | "sha256:ab"), "{path}");
        }
        // No family is a prefix of another's keys.
        assert!(!Key::Rollout("x").path().starts_with(Prefix::RolloutData.as_str()));
        assert!(!Key::RolloutData("x").path().starts_with(Prefix::Rollout.as_str()));
        assert_eq!(audit_time(&audit(1_700_000_000_000, 3)), Some(1_700_000_000_000));
        assert!(audit(1, 2) < audit(10, 0), "audit keys sort by time");
    }
}
