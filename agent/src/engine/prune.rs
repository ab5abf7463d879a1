//! What pruning may delete, decided without I/O: the objects that left an app, minus every object another
//! app's desired state now holds (ownership moves, it is never deleted and re-created), minus guarded kinds
//! the app did not opt in to, and nothing at all while the app's new objects did not all apply or when more
//! than half of the app would go without the app's confirmation.

use crate::state::ObjectRef;
use flotilla_common::fleet::{SyncPolicy, GUARDED_KINDS};
use std::collections::BTreeSet;

/// Why the objects are pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The app's desired state changed; `not_applied` of its objects did not apply (or wait for their kind).
    Changed { not_applied: usize },
    /// The app left the cluster: everything it had goes (guards still hold).
    Left,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub delete: Vec<ObjectRef>,
    /// Left the app, not deleted, and still the app's to prune later (pruning waits).
    pub kept: BTreeSet<ObjectRef>,
    /// Now held by another app: no longer this app's.
    pub handed_over: usize,
    pub notes: Vec<String>,
}

fn guarded(r: &ObjectRef) -> bool {
    let builtin = match r.kind.as_str() {
        "CustomResourceDefinition" => r.group() == "apiextensions.k8s.io",
        _ => r.group().is_empty(),
    };
    builtin && GUARDED_KINDS.contains(&r.kind.as_str())
}

/// The prune of `inventory` (everything the app may have created) down to `current` (its desired objects).
pub fn plan(
    inventory: &BTreeSet<ObjectRef>,
    current: &BTreeSet<ObjectRef>,
    claimed_elsewhere: impl Fn(&ObjectRef) -> bool,
    sync: &SyncPolicy,
    cause: Cause,
) -> Plan {
    let mut p = Plan::default();
    let mut candidates = Vec::new();
    for r in inventory.difference(current) {
        if claimed_elsewhere(r) {
            p.handed_over += 1;
        } else {
            candidates.push(r.clone());
        }
    }
    if candidates.is_empty() {
        return p;
    }
    if let Cause::Changed { not_applied } = cause {
        if not_applied > 0 {
            p.notes.push(format!(
                "pruning {} objects waits until every object of the app applies ({not_applied} did not)",
                candidates.len()
            ));
            p.kept.extend(candidates);
            return p;
        }
    }
    if !sync.prune {
        p.notes.push(format!("{} objects left the app and stay in place: pruning is off", candidates.len()));
        return p;
    }
    let mut deletable = Vec::new();
    for r in candidates {
        if guarded(&r) && !sync.allow_prune_of.contains(&r.kind) {
            p.notes.push(format!(
                "{r} left the app and stays in place: {}s are pruned only when sync.allowPruneOf lists {}",
                r.kind, r.kind
            ));
        } else {
            deletable.push(r);
        }
    }
    let limit = (inventory.len() / 2).max(1);
    if cause != Cause::Left && deletable.len() > limit && !sync.allow_mass_prune {
        p.notes.push(format!(
            "pruning {} of the app's {} objects waits for confirmation: more than half of the app would be \
             deleted (set sync.allowMassPrune: true in app.yaml if that is meant)",
            deletable.len(),
            inventory.len()
        ));
        p.kept.extend(deletable);
        return p;
    }
    p.delete = deletable;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(api_version: &str, kind: &str, ns: &str, name: &str) -> ObjectRef {
        ObjectRef { api_version: api_version.into(), kind: kind.into(), namespace: ns.into(), name: name.into() }
    }

    fn cm(name: &str) -> ObjectRef {
        r("v1", "ConfigMap", "shop", name)
    }

    fn set(refs: &[ObjectRef]) -> BTreeSet<ObjectRef> {
        refs.iter().cloned().collect()
    }

    #[test]
    fn identity_is_group_kind_namespace_name_never_the_version() {
        let inv = set(&[r("example.com/v1beta1", "Widget", "shop", "w"), cm("a")]);
        let cur = set(&[r("example.com/v1", "Widget", "shop", "w"), cm("a")]);
        assert_eq!(
            plan(&inv, &cur, |_| false, &SyncPolicy::default(), Cause::Changed { not_applied: 0 }),
            Plan::default()
        );
    }

    #[test]
    fn objects_another_app_holds_are_handed_over_not_deleted() {
        let inv = set(&[cm("a"), cm("b"), cm("c")]);
        let p =
            plan(&inv, &set(&[cm("a")]), |o| o.name == "b", &SyncPolicy::default(), Cause::Changed { not_applied: 0 });
        assert_eq!((p.delete, p.handed_over), (vec![cm("c")], 1));
        let p = plan(&inv, &BTreeSet::new(), |_| true, &SyncPolicy::default(), Cause::Left);
        assert_eq!((p.delete.len(), p.handed_over), (0, 3), "a renamed app: every object moves");
    }

    #[test]
    fn nothing_is_pruned_until_everything_applied() {
        let inv = set(&[cm("a"), cm("old")]);
        let p = plan(&inv, &set(&[cm("a")]), |_| false, &SyncPolicy::default(), Cause::Changed { not_applied: 1 });
        assert!(p.delete.is_empty());
        assert_eq!(p.kept, set(&[cm("old")]));
        assert!(p.notes[0].contains("waits until every object of the app applies (1 did not)"), "{:?}", p.notes);
    }

    #[test]
    fn guarded_kinds_stay_unless_the_app_opts_in() {
        let inv = set(&[
            r("v1", "Namespace", "", "shop"),
            r("v1", "PersistentVolumeClaim", "shop", "data"),
            r("apiextensions.k8s.io/v1", "CustomResourceDefinition", "", "w.example.com"),
            cm("a"),
            cm("b"),
            cm("c"),
        ]);
        let cur = set(&[cm("a"), cm("b"), cm("c")]);
        let p = plan(&inv, &cur, |_| false, &SyncPolicy::default(), Cause::Left);
        assert!(p.delete.iter().all(|o| o.kind == "ConfigMap"), "{:?}", p.delete);
        assert_eq!(p.notes.len(), 3);
        let sync = SyncPolicy { allow_prune_of: vec!["PersistentVolumeClaim".into()], ..Default::default() };
        let p = plan(&inv, &cur, |_| false, &sync, Cause::Left);
        assert_eq!(p.delete, vec![r("v1", "PersistentVolumeClaim", "shop", "data")]);
        // A custom kind named like a guarded one is not guarded.
        let inv = set(&[r("example.com/v1", "Namespace", "shop", "x"), cm("a")]);
        assert_eq!(plan(&inv, &set(&[cm("a")]), |_| false, &SyncPolicy::default(), Cause::Left).delete.len(), 1);
    }

    #[test]
    fn a_mass_prune_waits_for_confirmation() {
        let inv: BTreeSet<ObjectRef> = (0..10).map(|i| cm(&format!("c{i}"))).collect();
        let cur = set(&[cm("c0"), cm("c1"), cm("c2"), cm("c3")]);
        let changed = Cause::Changed { not_applied: 0 };
        let p = plan(&inv, &cur, |_| false, &SyncPolicy::default(), changed);
        assert!(p.delete.is_empty() && p.kept.len() == 6, "{p:?}");
        assert!(p.notes[0].contains("sync.allowMassPrune"));
        let sync = SyncPolicy { allow_mass_prune: true, ..Default::default() };
        assert_eq!(plan(&inv, &cur, |_| false, &sync, changed).delete.len(), 6);
        let cur = set(&[cm("c0"), cm("c1"), cm("c2"), cm("c3"), cm("c4")]);
        assert_eq!(
            plan(&inv, &cur, |_| false, &SyncPolicy::default(), changed).delete.len(),
            5,
            "half is not more than half"
        );
        // One object replaced in a one-object app is an ordinary rename.
        let p = plan(&set(&[cm("a"), cm("b")]), &set(&[cm("b")]), |_| false, &SyncPolicy::default(), changed);
        assert_eq!(p.delete, vec![cm("a")]);
    }

    #[test]
    fn pruning_off_keeps_everything_in_place() {
        let sync = SyncPolicy { prune: false, ..Default::default() };
        let p = plan(&set(&[cm("a"), cm("b")]), &set(&[cm("a")]), |_| false, &sync, Cause::Changed { not_applied: 0 });
        assert!(p.delete.is_empty() && p.kept.is_empty());
        assert!(p.notes[0].contains("pruning is off"));
    }
}
