//! A model test of the hub's state machine: random interleavings of commits, rollout steps, agents' reports,
//! operator controls, restarts and failed store commits keep its invariants:
//! - a failed store commit changes nothing in memory;
//! - after every step, and after a restart, memory equals what the store holds;
//! - no cluster moves backwards (to older content) except by a rollback;
//! - no recorded control is lost: every control the store accepted is in the audit.

use flotilla_common::fleet::render::{render_fleet, RenderCache};
use flotilla_common::fleet::{parse, Tree};
use flotilla_common::tools::SystemTools;
use flotilla_hub::machine::{Observed, State, Synced, Transition};
use flotilla_hub::report::Rendering;
use flotilla_hub::rollouts::Control;
use flotilla_hub::store::{MemStore, Store};
use flotilla_proto::agent::v1 as pb;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const CLUSTERS: [&str; 4] = ["c0", "c1", "c2", "c3"];
const APPS: [&str; 2] = ["a", "b"];

fn tree(va: u32, vb: u32, other: u32) -> Tree {
    let mut files: Vec<(String, String)> = CLUSTERS
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("clusters/{c}.yaml"), format!("labels: {{ring: r{}}}\n", i / 2)))
        .collect();
    files.push((
        "rollout.yaml".into(),
        "waves:\n- {name: first, selector: {matchLabels: {ring: r0}}, maxParallel: 1, progressDeadlineSeconds: 30}\n- {name: second, selector: {matchLabels: {ring: r1}}, approval: true}\n".into(),
    ));
    for (app, v) in [("a", va), ("b", vb)] {
        files.push((format!("apps/{app}/app.yaml"), format!("namespace: {app}\ntargets: [{{selector: {{}}}}]\n")));
        files.push((
            format!("apps/{app}/cm.yaml"),
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {app}}}\ndata: {{v: '{v}'}}\n"),
        ));
    }
    // A file no app reads: a commit that changes only it changes no content.
    files.push(("README.md".into(), format!("edit {other}\n")));
    files.into_iter().map(|(p, c)| (p, c.into_bytes())).collect()
}

#[derive(Debug, Clone)]
enum Step {
    /// A commit: each app's content moves on by 0 or 1 version (Git only moves forward here).
    Commit {
        a: bool,
        b: bool,
    },
    Tick {
        secs: u8,
    },
    Report {
        cluster: usize,
        healthy: bool,
    },
    Control {
        app: usize,
        which: u8,
    },
    Restart,
    FailNextCommit,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (any::<bool>(), any::<bool>()).prop_map(|(a, b)| Step::Commit { a, b }),
        4 => (1u8..40).prop_map(|secs| Step::Tick { secs }),
        4 => (0usize..4, prop::bool::weighted(0.8)).prop_map(|(cluster, healthy)| Step::Report { cluster, healthy }),
        2 => (0usize..2, 0u8..7).prop_map(|(app, which)| Step::Control { app, which }),
        1 => Just(Step::Restart),
        1 => Just(Step::FailNextCommit),
    ]
}

struct Model {
    store: Arc<MemStore>,
    state: State,
    now: i64,
    versions: (u32, u32),
    commits: u32,
    /// digest → (app, content version).
    version_of: BTreeMap<String, (String, u32)>,
    controls_recorded: usize,
    /// Apps an operator rolled back, while that rollback's rollout is theirs: they may move back.
    rolled_back: BTreeMap<String, String>,
    cache: RenderCache,
}

impl Model {
    /// Commits a transition the way the hub's writer does: memory changes only if the store took it.
    fn apply(&mut self, t: Transition) -> bool {
        match self.store.commit(t.batch) {
            Ok(()) => {
                self.state = t.next;
                true
            }
            Err(_) => false,
        }
    }

    fn version(&self, cluster: &str, app: &str) -> Option<u32> {
        let d = self.state.desired.get(cluster)?.get(app)?;
        self.version_of.get(&d.digest).map(|(_, v)| *v)
    }

    fn versions(&self) -> BTreeMap<(String, String), u32> {
        let mut out = BTreeMap::new();
        for c in CLUSTERS {
            for a in APPS {
                if let Some(v) = self.version(c, a) {
                    out.insert((c.to_string(), a.to_string()), v);
                }
            }
        }
        out
    }
}

fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let tools = SystemTools::detect();
    let mut m = Model {
        store: Arc::new(MemStore::default()),
        state: State::default(),
        now: 1_700_000_000_000,
        versions: (1, 1),
        commits: 0,
        version_of: BTreeMap::new(),
        controls_recorded: 0,
        rolled_back: BTreeMap::new(),
        cache: RenderCache::default(),
    };
    let sync = |m: &mut Model, va: u32, vb: u32| {
        m.commits += 1;
        let fleet = parse(&tree(va, vb, m.commits));
        let rendered = render_fleet(&fleet, &tools, &mut m.cache);
        for apps in rendered.clusters.values() {
            for (app, r) in apps {
                if let Ok(b) = r {
                    let v = if app == "a" { va } else { vb };
                    m.version_of.insert(b.digest.clone(), (app.clone(), v));
                }
            }
        }
        let s = Synced {
            revision: format!("{:040x}", m.commits),
            fleet: Arc::new(fleet),
            rendered,
            rendering: Rendering::default(),
        };
        let t = m.state.synced(&s, m.now);
        m.apply(t)
    };
    sync(&mut m, 1, 1);
    // A replica that follows the store's changes (as standbys follow etcd) sees what the writer has.
    let mut replica = State::default();
    let mut store_before: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for s in steps {
        let before = m.state.clone();
        let before_versions = m.versions();
        let failing = m.store.fail_commits.load(Ordering::SeqCst) > 0;
        let committed = match s {
            Step::Commit { a, b } => {
                m.versions = (m.versions.0 + a as u32, m.versions.1 + b as u32);
                let (va, vb) = m.versions;
                sync(&mut m, va, vb)
            }
            Step::Tick { secs } => {
                m.now += secs as i64 * 1000;
                let t = m.state.tick(m.now, &|_| true);
                m.apply(t)
            }
            Step::Report { cluster, healthy } => {
                let c = CLUSTERS[cluster];
                let apps = m
                    .state
                    .desired
                    .get(c)
                    .map(|d| {
                        d.iter()
                            .filter(|(_, d)| !d.digest.is_empty())
                            .map(|(app, d)| pb::AppStatus {
                                app: app.clone(),
                                digest: d.digest.clone(),
                                revision: d.revision.clone(),
                                phase: pb::Phase::Applied as i32,
                                health: if healthy { pb::Health::Healthy } else { pb::Health::Degraded } as i32,
                                changed_unix_ms: m.now,
                                ..Default::default()
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let obs = BTreeMap::from([(c.to_string(), Observed { apps, seen_ms: m.now, ..Default::default() })]);
                let t = m.state.observed(obs);
                m.apply(t)
            }
            Step::Control { app, which } => {
                let app = APPS[app];
                let action = match which {
                    0 => Control::Pause,
                    1 => Control::Resume,
                    2 => Control::Approve("second".into()),
                    3 => Control::Abort,
                    4 => Control::Retry,
                    5 => Control::Rollback { revision: format!("{:040x}", 1), immediate: true },
                    _ => Control::Rollback { revision: format!("{:040x}", 1), immediate: false },
                };
                let t = m.state.control(app, &action, "alice", m.now, m.controls_recorded as u64);
                let rollback = matches!(action, Control::Rollback { .. }) && t.reply.is_ok();
                let ok = m.apply(t);
                if ok {
                    m.controls_recorded += 1;
                    if rollback {
                        let rev =
                            m.state.rollouts.get(app).and_then(|r| r.rollout.as_ref()).map(|r| r.revision.clone());
                        m.rolled_back.insert(app.to_string(), rev.unwrap_or_default());
                    }
                }
                ok
            }
            Step::Restart => {
                m.state = State::load(&*m.store).unwrap();
                true
            }
            Step::FailNextCommit => {
                m.store.fail_commits.store(1, Ordering::SeqCst);
                true
            }
        };
        if !committed {
            prop_assert!(failing, "only a failing store refuses a commit");
            prop_assert_eq!(&m.state, &before, "a failed commit changes nothing in memory");
        }
        // Memory equals the store.
        let loaded = State::load(&*m.store).unwrap();
        prop_assert_eq!(&loaded, &m.state, "memory equals the store after {:?}", s);
        let store_after: BTreeMap<String, Vec<u8>> = m.store.scan("").unwrap().into_iter().collect();
        let mut changes: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        for (k, v) in &store_after {
            if store_before.get(k) != Some(v) {
                changes.insert(k.clone(), Some(v.clone()));
            }
        }
        for k in store_before.keys().filter(|k| !store_after.contains_key(*k)) {
            changes.insert(k.clone(), None);
        }
        let (followed, woken) = replica.apply_changes(&changes, &*m.store).unwrap();
        prop_assert_eq!(&followed, &loaded, "a replica following the changes sees the store after {:?}", s);
        for c in CLUSTERS {
            let moved = replica.desired.get(c) != followed.desired.get(c);
            prop_assert!(!moved || woken.contains(c), "{} changed and was not woken after {:?}", c, s);
        }
        replica = followed;
        store_before = store_after;
        // A rollback's own rollout may move clusters back; once a commit starts another, it is over.
        let state = &m.state;
        m.rolled_back.retain(|app, rev| {
            state.rollouts.get(app).and_then(|r| r.rollout.as_ref()).is_some_and(|r| &r.revision == rev)
        });
        // Nobody moves backwards except by a rollback.
        let after = m.versions();
        for (k, v) in &before_versions {
            if let Some(now) = after.get(k).filter(|_| !m.rolled_back.contains_key(&k.1)) {
                prop_assert!(now >= v, "{:?} moved back from version {} to {} at {:?}", k, v, now, s);
            }
        }
        // No recorded control lost.
        prop_assert_eq!(m.store.keys("audit/").unwrap().len(), m.controls_recorded);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn the_state_machine_keeps_its_invariants(steps in proptest::collection::vec(step(), 1..40)) {
        run(steps)?;
    }
}
