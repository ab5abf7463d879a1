//! Who the hub trusts right now: the operator roles (`--roles FILE`) and the revoked certificate serials
//! (`--revoked FILE`), both read again when their file changes, and where audit records are shipped. A file
//! that becomes unreadable or invalid keeps what was in force (logged, and shown with the fleet's problems in
//! `flotilla clusters` through [`Identities::problems`]).

use crate::access::Roles;
use arc_swap::ArcSwap;
use flotilla_common::identity::normalize_serial;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often the files are looked at.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

pub struct Identities {
    roles: ArcSwap<Roles>,
    revoked: ArcSwap<BTreeSet<String>>,
    /// Bumped whenever the revoked list changes: live sessions look again.
    changed: tokio::sync::watch::Sender<u64>,
    pub roles_file: Option<PathBuf>,
    pub revoked_file: Option<PathBuf>,
    pub sink: Option<crate::audit::Sink>,
    /// Why a file is not in force, when it is not.
    problems: Mutex<Vec<String>>,
    /// The files as they were when last read.
    seen: Mutex<(Option<Stamp>, Option<Stamp>)>,
}

impl Default for Identities {
    fn default() -> Self {
        Identities {
            roles: ArcSwap::from_pointee(Roles::everyone_admin()),
            revoked: ArcSwap::default(),
            changed: tokio::sync::watch::channel(0).0,
            roles_file: None,
            revoked_file: None,
            sink: None,
            problems: Mutex::default(),
            seen: Mutex::default(),
        }
    }
}

/// A revoked-serials file: one serial per line (hex, `:` separators allowed), `#` comments, blank lines.
pub fn parse_revoked(text: &str, file: &str) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        if !line.chars().all(|c| c.is_ascii_hexdigit() || c == ':') || line.len() > 128 {
            return Err(format!("{file}:{}: {line:?} is not a certificate serial (hex digits, ':' allowed)", i + 1));
        }
        out.insert(normalize_serial(line));
    }
    Ok(out)
}

impl Identities {
    /// Reads both files once (an error here stops the start: a hub must not start with no roles when it was
    /// given a file), then serves them.
    pub fn load(
        roles_file: Option<PathBuf>,
        revoked_file: Option<PathBuf>,
        sink: Option<crate::audit::Sink>,
    ) -> Result<Identities, String> {
        let ids = Identities { roles_file, revoked_file, sink, ..Default::default() };
        *ids.seen.lock().unwrap_or_else(|p| p.into_inner()) =
            (ids.roles_file.as_deref().map(stamp), ids.revoked_file.as_deref().map(stamp));
        if let Some(f) = &ids.roles_file {
            ids.roles.store(Arc::new(read_roles(f)?));
        } else {
            warn!("no --roles file: every operator certificate of the fleet's CA may do everything (admin)");
        }
        if let Some(f) = &ids.revoked_file {
            ids.revoked.store(Arc::new(read_revoked(f)?));
        }
        Ok(ids)
    }

    pub fn roles(&self) -> Arc<Roles> {
        self.roles.load_full()
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.load().contains(serial)
    }

    /// A receiver that sees every change of the revoked list.
    pub fn revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn problems(&self) -> Vec<String> {
        self.problems.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_roles(&self, roles: Roles) {
        self.roles.store(Arc::new(roles));
    }

    pub fn set_revoked(&self, revoked: BTreeSet<String>) {
        if **self.revoked.load() != revoked {
            self.revoked.store(Arc::new(revoked));
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Reads the files again whenever they change, until `stop`.
    pub async fn follow(self: Arc<Self>, stop: CancellationToken) {
        let mut seen = *self.seen.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            let mut problems = Vec::new();
            let roles = (self.roles_file.as_deref(), &mut seen.0, "roles file");
            self.reload(roles, &mut problems, |f| read_roles(f).map(|r| self.set_roles(r)));
            let revoked = (self.revoked_file.as_deref(), &mut seen.1, "revoked list");
            self.reload(revoked, &mut problems, |f| read_revoked(f).map(|r| self.set_revoked(r)));
            *self.problems.lock().unwrap_or_else(|p| p.into_inner()) = problems;
        }
    }

    /// Reads `file` again with `read` if it changed since `seen`; a file that cannot be used keeps what is in
    /// force and is a problem (`what: …`) until it changes again.
    fn reload(
        &self,
        (file, seen, what): (Option<&Path>, &mut Option<Stamp>, &str),
        problems: &mut Vec<String>,
        read: impl FnOnce(&Path) -> Result<(), String>,
    ) {
        let Some(f) = file else { return };
        let now = stamp(f);
        if seen.as_ref() == Some(&now) {
            problems.extend(self.problems().into_iter().filter(|p| p.starts_with(what)));
            return;
        }
        *seen = Some(now);
        match read(f) {
            Ok(()) => info!(file = %f.display(), "{what} read again"),
            Err(e) => {
                warn!(error = %e, "the {what} cannot be used: what was read before stays in force");
                problems.push(format!("{what}: {e} (what was read before stays in force)"));
            }
        }
    }
}

/// What tells a changed file: its length, modification time and inode (a replaced file).
type Stamp = Option<(u64, std::time::SystemTime, u64)>;

fn stamp(f: &Path) -> Stamp {
    let m = std::fs::metadata(f).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some((m.len(), m.modified().ok()?, ino))
}

fn read_roles(f: &Path) -> Result<Roles, String> {
    let text = std::fs::read_to_string(f).map_err(|e| format!("reading {}: {e}", f.display()))?;
    Roles::parse(&text, &f.display().to_string()).map_err(|e| e.to_string())
}

fn read_revoked(f: &Path) -> Result<BTreeSet<String>, String> {
    let text = std::fs::read_to_string(f).map_err(|e| format!("reading {}: {e}", f.display()))?;
    parse_revoked(&text, &f.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_compare_in_any_spelling() {
        assert_eq!(normalize_serial("00:1A:2b"), "1a2b");
        assert_eq!(normalize_serial("1a2b"), "1a2b");
        let set = parse_revoked("# revoked\n00:1a:2b  # eu-1's old agent\n\nFF\n", "revoked.txt").unwrap();
        assert_eq!(set, BTreeSet::from(["1a2b".to_string(), "ff".to_string()]));
        let e = parse_revoked("1a\nnot-a-serial\n", "revoked.txt").unwrap_err();
        assert!(e.starts_with("revoked.txt:2: "), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn files_are_read_again_when_they_change_and_a_broken_one_keeps_what_was_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let (roles, revoked) = (dir.path().join("roles.yaml"), dir.path().join("revoked.txt"));
        std::fs::write(&roles, "bindings:\n  - operators: [alice]\n    role: viewer\n").unwrap();
        std::fs::write(&revoked, "").unwrap();
        let ids = Arc::new(Identities::load(Some(roles.clone()), Some(revoked.clone()), None).unwrap());
        let mut rx = ids.revocations();
        let stop = CancellationToken::new();
        tokio::spawn(ids.clone().follow(stop.clone()));
        let view = crate::access::Target::fleet();
        assert!(!ids.roles().allows("alice", crate::access::Action::Refresh, &view));
        std::fs::write(&roles, "bindings:\n  - operators: [alice]\n    role: operator\n").unwrap();
        std::fs::write(&revoked, "0a\n").unwrap();
        tokio::time::sleep(RELOAD_EVERY * 2).await;
        assert!(ids.roles().allows("alice", crate::access::Action::Refresh, &view));
        assert!(ids.is_revoked("a"));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        std::fs::write(&roles, "bindings: [oops\n").unwrap();
        tokio::time::sleep(RELOAD_EVERY * 2).await;
        assert!(ids.roles().allows("alice", crate::access::Action::Refresh, &view), "kept");
        assert!(ids.problems().iter().any(|p| p.contains("roles file")), "{:?}", ids.problems());
        stop.cancel();
    }
}
