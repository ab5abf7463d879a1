//! The audit trail: every mutating call of the platform API and every refusal (who, what, on what, when, the
//! answer). Records are written through the hub's writer (kept by count and age, `machine::AUDIT_MAX`,
//! `machine::AUDIT_AGE_MS`), read back by `ListAudit` (`flotilla audit`), and optionally shipped as JSON lines
//! to a file or stdout for a log pipeline (by the writer, once a record is committed, whatever wrote it).

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

/// One audited call. Records written before this shape (`operator`, `result`) still read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_unix_ms: i64,
    /// The operator's name, or the identity that called ("cluster eu-1", "hub").
    #[serde(alias = "operator")]
    pub who: String,
    /// approve, rollback, refresh, create-join-token, view, …
    pub action: String,
    /// The app, when the call named one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app: String,
    /// What else the call named: the wave, the revision, the cluster.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Whether it was allowed (a refused call is recorded too).
    #[serde(default = "yes")]
    pub allowed: bool,
    /// The answer the caller got.
    #[serde(alias = "result")]
    pub answer: String,
    /// The hub replica that answered (empty for a single hub).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replica: String,
}

fn yes() -> bool {
    true
}

impl AuditRecord {
    /// Old records said `Approve("two")` for the action; the name is its first word, lowercased.
    pub fn normalized(mut self) -> Self {
        if self.action.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
            let name: String = self.action.chars().take_while(|c| c.is_alphanumeric()).collect();
            self.detail = self.action.trim_start_matches(&name).trim_matches(|c| "(){}\" ".contains(c)).to_string();
            self.action = name.to_lowercase();
        }
        if self.answer.starts_with("refused: ") {
            self.allowed = false;
        }
        self
    }
}

/// Which records a reader wants.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub since_unix_ms: i64,
    pub who: String,
    /// The newest this many (0: the default).
    pub limit: usize,
}

pub const DEFAULT_LIMIT: usize = 1000;

/// The records `q` selects from `all` (oldest first), oldest first.
pub fn select(all: Vec<AuditRecord>, q: &Query) -> Vec<AuditRecord> {
    let mut out: Vec<AuditRecord> = all
        .into_iter()
        .map(AuditRecord::normalized)
        .filter(|r| r.at_unix_ms >= q.since_unix_ms && (q.who.is_empty() || r.who == q.who))
        .collect();
    let limit = if q.limit == 0 { DEFAULT_LIMIT } else { q.limit };
    if out.len() > limit {
        out.drain(..out.len() - limit);
    }
    out
}

/// Where audit records are shipped as they are decided, as JSON lines.
pub enum Sink {
    Stdout,
    File(PathBuf, Mutex<std::fs::File>),
}

impl Sink {
    /// `-` is stdout; anything else a file appended to (created 0600).
    pub fn open(target: &str) -> std::io::Result<Sink> {
        if target == "-" {
            return Ok(Sink::Stdout);
        }
        let mut o = std::fs::OpenOptions::new();
        o.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        let path = PathBuf::from(target);
        let f = o.open(&path)?;
        Ok(Sink::File(path, Mutex::new(f)))
    }

    /// Writes one stored record (its JSON) as a line.
    pub fn ship_json(&self, json: &[u8]) {
        let mut line = Vec::with_capacity(json.len() + 1);
        line.extend_from_slice(json);
        line.push(b'\n');
        let written = match self {
            Sink::Stdout => std::io::stdout().lock().write_all(&line),
            Sink::File(_, f) => f.lock().unwrap_or_else(|p| p.into_inner()).write_all(&line),
        };
        if let Err(e) = written {
            let to = match self {
                Sink::Stdout => "stdout".to_string(),
                Sink::File(p, _) => p.display().to_string(),
            };
            tracing::warn!(error = %e, %to, "shipping an audit record failed (it is in the store)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_records_read_as_new_ones() {
        let old = r#"{"at_unix_ms":5,"operator":"alice","app":"shop","action":"Approve(\"two\")","result":"refused: no such wave"}"#;
        let r: AuditRecord = serde_json::from_str(old).unwrap();
        let r = r.normalized();
        assert_eq!((r.who.as_str(), r.action.as_str(), r.detail.as_str()), ("alice", "approve", "two"));
        assert!(!r.allowed);
        assert_eq!(r.answer, "refused: no such wave");
    }

    #[test]
    fn select_filters_by_time_and_who_and_keeps_the_newest() {
        let rec = |t: i64, who: &str| AuditRecord {
            at_unix_ms: t,
            who: who.into(),
            action: "pause".into(),
            ..Default::default()
        };
        let all = vec![rec(1, "a"), rec(2, "b"), rec(3, "a"), rec(4, "a")];
        let got = select(all.clone(), &Query { since_unix_ms: 2, who: "a".into(), limit: 0 });
        assert_eq!(got.iter().map(|r| r.at_unix_ms).collect::<Vec<_>>(), vec![3, 4]);
        let got = select(all, &Query { limit: 2, ..Default::default() });
        assert_eq!(got.iter().map(|r| r.at_unix_ms).collect::<Vec<_>>(), vec![3, 4]);
    }
}
