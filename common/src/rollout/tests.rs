use super::*;
use proptest::prelude::*;

fn spec(yaml: &str) -> RolloutSpec {
    let s: RolloutSpec = serde_yaml::from_str(yaml).unwrap();
    s.validate().unwrap();
    s
}

/// `n` clusters per region r0..r{regions-1}, named `r<k>-<i>`.
fn fleet(regions: usize, n: usize) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for r in 0..regions {
        for i in 0..n {
            out.insert(format!("r{r}-{i:03}"), [("region".to_string(), format!("r{r}"))].into_iter().collect());
        }
    }
    out
}

/// A fleet that takes `ready_ms` to run a released revision, degraded where `bad` says so, offline where
/// `offline` says so.
struct Sim {
    released: BTreeMap<String, (String, i64)>,
    ready_ms: i64,
    bad: BTreeSet<String>,
    offline: BTreeSet<String>,
}

impl Sim {
    fn new(ready_ms: i64) -> Sim {
        Sim { released: BTreeMap::new(), ready_ms, bad: BTreeSet::new(), offline: BTreeSet::new() }
    }

    fn observe(&self, now: i64) -> BTreeMap<String, Observation> {
        self.released
            .iter()
            .map(|(c, (rev, at))| {
                let ready = now - at >= self.ready_ms;
                let health = match (self.bad.contains(c), ready) {
                    (true, true) => ObservedHealth::Degraded,
                    (false, true) => ObservedHealth::Healthy,
                    _ => ObservedHealth::Progressing,
                };
                let reason = if self.bad.contains(c) {
                    "Deployment shop/web: ProgressDeadlineExceeded".into()
                } else {
                    String::new()
                };
                (c.clone(), Observation { online: !self.offline.contains(c), revision: rev.clone(), health, reason })
            })
            .chain(
                self.offline
                    .iter()
                    .filter(|c| !self.released.contains_key(*c))
                    .map(|c| (c.clone(), Observation { online: false, ..Default::default() })),
            )
            .collect()
    }

    fn apply(&mut self, actions: &[Action], revision: &str, now: i64) {
        for a in actions {
            match a {
                Action::Release { cluster } if !self.offline.contains(cluster) => {
                    self.released.insert(cluster.clone(), (revision.to_string(), now));
                }
                Action::Revert { cluster, revision } => {
                    self.released.insert(cluster.clone(), (revision.clone(), now));
                }
                _ => {}
            }
        }
    }
}

/// Steps the rollout every `tick` ms until it stops moving or `limit` ms pass; returns every action.
fn drive(r: &mut Rollout, sim: &mut Sim, tick: i64, limit: i64) -> Vec<(i64, Action)> {
    let mut all = Vec::new();
    let mut now = r.started_ms;
    while now <= r.started_ms + limit {
        let actions = step(r, &sim.observe(now), now);
        sim.apply(&actions, &r.revision.clone(), now);
        all.extend(actions.into_iter().map(|a| (now, a)));
        if !r.active() {
            break;
        }
        now += tick;
    }
    all
}

const FIVE: &str = "waves:\n- {name: canary, selector: {matchLabels: {region: r0}}, maxParallel: 1}\n- {name: w1, selector: {matchLabels: {region: r1}}, maxParallel: 25%, bakeSeconds: 10}\n- {name: w2, selector: {matchLabels: {region: r2}}, maxParallel: 50%}\n- {name: w3, selector: {matchLabels: {region: r3}}, failureBudget: 1}\n";

#[test]
fn specs_parse_and_validate_with_clear_errors() {
    let s = spec(FIVE);
    assert_eq!(s.waves[1].max_parallel, Some(Amount::Percent(25)));
    assert_eq!(s.waves[3].failure_budget, Amount::Count(1));
    assert_eq!(Amount::Percent(10).of(3), 1, "a percentage above zero allows at least one cluster");
    assert_eq!(Amount::Percent(25).of(40), 10);
    let err = |y: &str| match serde_yaml::from_str::<RolloutSpec>(y) {
        Ok(s) => s.validate().unwrap_err(),
        Err(e) => e.to_string(),
    };
    assert!(err("waves:\n- {name: a, maxParallel: 150%}\n").contains("a percentage cannot be over 100%"));
    assert!(
        err("waves:\n- {name: a, bake: 10}\n").starts_with("waves[0]: unknown field `bake`"),
        "{}",
        err("waves:\n- {name: a, bake: 10}\n")
    );
    assert_eq!(err("waves:\n- {name: a}\n- {name: a}\n"), "waves[1].name: two waves are named \"a\"");
    assert_eq!(err("waves:\n- {name: a, maxParallel: 0}\n"), "waves[0].maxParallel: 0 would never update a cluster");
    assert_eq!(err("waves: []\n"), "waves: at least one wave is needed");
    assert!(err("waves:\n- {name: a, onFailure: panic}\n").contains("unknown variant `panic`"));
}

#[test]
fn clusters_go_to_the_first_wave_that_selects_them_and_the_rest_last() {
    let s = spec("waves:\n- {name: canary, selector: {matchLabels: {region: r0}}}\n");
    let waves = s.assign(&fleet(2, 2));
    assert_eq!(waves.len(), 2);
    assert_eq!(waves[0].1, vec!["r0-000", "r0-001"]);
    assert_eq!(
        (waves[1].0.name.as_str(), waves[1].1.clone()),
        (REST, vec!["r1-000".to_string(), "r1-001".to_string()])
    );
    let no_rest = spec("finalWave: false\nwaves:\n- {name: canary, selector: {matchLabels: {region: r0}}}\n");
    assert_eq!(no_rest.assign(&fleet(2, 2)).len(), 1);
}

#[test]
fn waves_complete_in_order_within_their_limits() {
    let mut r = Rollout::new("shop", "rev-2", Some("rev-1".into()), &spec(FIVE), &fleet(4, 8), 0);
    let mut sim = Sim::new(2_000);
    let actions = drive(&mut r, &mut sim, 500, 600_000);
    assert_eq!(r.phase, RolloutPhase::Complete);
    let releases: Vec<(i64, String)> = actions
        .iter()
        .filter_map(|(t, a)| match a {
            Action::Release { cluster } => Some((*t, cluster.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(releases.len(), 32);
    // Wave order: every r1 release after the last r0 one, and so on.
    for k in 1..4 {
        let last_prev =
            releases.iter().filter(|(_, c)| c.starts_with(&format!("r{}", k - 1))).map(|(t, _)| *t).max().unwrap();
        let first = releases.iter().filter(|(_, c)| c.starts_with(&format!("r{k}"))).map(|(t, _)| *t).min().unwrap();
        assert!(first > last_prev, "wave {k} started before wave {} was done", k - 1);
    }
    // The bake of w1 (10 s) holds w2 back.
    let w1_done = releases.iter().filter(|(_, c)| c.starts_with("r1")).map(|(t, _)| *t).max().unwrap() + 2_000;
    let w2_first = releases.iter().filter(|(_, c)| c.starts_with("r2")).map(|(t, _)| *t).min().unwrap();
    assert!(w2_first >= w1_done + 10_000, "w2 started {w2_first} before w1's bake ended");
}

#[test]
fn a_failing_wave_halts_and_later_waves_never_see_the_revision() {
    let mut r = Rollout::new("shop", "rev-2", Some("rev-1".into()), &spec(FIVE), &fleet(4, 4), 0);
    let mut sim = Sim::new(1_000);
    sim.bad.extend(["r2-000".to_string(), "r2-001".to_string()]);
    let actions = drive(&mut r, &mut sim, 500, 600_000);
    match &r.phase {
        RolloutPhase::Failed(why) => {
            assert_eq!(why, "wave w2 failed: r2-000: Deployment shop/web: ProgressDeadlineExceeded")
        }
        other => panic!("{other:?}"),
    }
    assert!(!actions.iter().any(|(_, a)| matches!(a, Action::Release { cluster } if cluster.starts_with("r3"))));
    assert_eq!(explain(&r, "r3-002"), "r3-002 does not get rev-2: the rollout is failed: wave w2 failed: r2-000: Deployment shop/web: ProgressDeadlineExceeded");
    assert_eq!(explain(&r, "r2-000"), "r2-000 failed on rev-2: Deployment shop/web: ProgressDeadlineExceeded");
}

#[test]
fn a_failing_wave_rolls_back_when_asked() {
    let yaml = FIVE.replace("maxParallel: 50%}", "maxParallel: 50%, onFailure: rollback}");
    let mut r = Rollout::new("shop", "rev-2", Some("rev-1".into()), &spec(&yaml), &fleet(4, 4), 0);
    let mut sim = Sim::new(1_000);
    sim.bad.insert("r2-003".into());
    let actions = drive(&mut r, &mut sim, 500, 600_000);
    assert!(matches!(r.phase, RolloutPhase::RolledBack(_)), "{:?}", r.phase);
    let reverted: BTreeSet<String> = actions
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Revert { cluster, revision } => {
                assert_eq!(revision, "rev-1", "only ever back to the previous rendered revision");
                Some(cluster.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(reverted, (0..4).map(|i| format!("r2-{i:03}")).collect(), "every released cluster of the wave");
    assert!(sim.released.iter().filter(|(c, _)| c.starts_with("r2")).all(|(_, (rev, _))| rev == "rev-1"));
    assert!(
        sim.released.iter().filter(|(c, _)| c.starts_with("r1")).all(|(_, (rev, _))| rev == "rev-2"),
        "earlier waves keep it"
    );
}

#[test]
fn approval_gates_a_wave_and_pause_holds_everything() {
    let yaml = "waves:\n- {name: canary, selector: {matchLabels: {region: r0}}}\n- {name: prod, approval: true, selector: {matchLabels: {region: r1}}}\n";
    let mut r = Rollout::new("shop", "rev-2", None, &spec(yaml), &fleet(2, 2), 0);
    let mut sim = Sim::new(1_000);
    drive(&mut r, &mut sim, 500, 20_000);
    assert_eq!(r.waves[1].phase, WavePhase::AwaitingApproval);
    assert_eq!(explain(&r, "r1-000"), "r1-000 waits: wave prod awaits approval");
    assert!(sim.released.keys().all(|c| c.starts_with("r0")));
    assert_eq!(approve(&mut r, "canary", "alice"), Err("wave canary needs no approval".into()));
    approve(&mut r, "prod", "alice").unwrap();
    pause(&mut r).unwrap();
    assert_eq!(explain(&r, "r1-000"), "r1-000 waits: the rollout of rev-2 is paused");
    assert!(step(&mut r, &sim.observe(30_000), 30_000).is_empty(), "a paused rollout releases nothing");
    resume(&mut r).unwrap();
    r.started_ms = 30_000;
    drive(&mut r, &mut sim, 500, 60_000);
    assert_eq!(r.phase, RolloutPhase::Complete);
    assert_eq!(resume(&mut r), Err("the rollout is complete, not paused".into()));
}

#[test]
fn offline_clusters_follow_the_rule() {
    for (rule, expect) in [("wait", "failed"), ("fail", "failed"), ("skip", "complete")] {
        let yaml = format!("offline: {rule}\nwaves:\n- {{name: all, progressDeadlineSeconds: 5}}\n");
        let mut r = Rollout::new("shop", "rev-2", None, &spec(&yaml), &fleet(1, 3), 0);
        let mut sim = Sim::new(1_000);
        sim.offline.insert("r0-001".into());
        drive(&mut r, &mut sim, 500, 60_000);
        assert!(r.phase.to_string().starts_with(expect), "{rule}: {}", r.phase);
        if rule == "wait" {
            assert!(r.phase.to_string().contains("offline past the progress deadline"), "{}", r.phase);
        }
    }
}

#[test]
fn the_progress_deadline_fails_a_slow_cluster() {
    let mut r = Rollout::new(
        "shop",
        "rev-2",
        None,
        &spec("waves:\n- {name: all, progressDeadlineSeconds: 3}\n"),
        &fleet(1, 1),
        0,
    );
    let mut sim = Sim::new(10_000);
    drive(&mut r, &mut sim, 500, 60_000);
    assert_eq!(r.phase.to_string(), "failed: wave all failed: r0-000: not healthy on rev-2 within 3 s");
}

#[test]
fn abort_stops_where_it_is() {
    let mut r = Rollout::new("shop", "rev-2", None, &spec(FIVE), &fleet(4, 2), 0);
    let mut sim = Sim::new(1_000);
    step(&mut r, &sim.observe(0), 0);
    abort(&mut r, "bob").unwrap();
    assert!(step(&mut r, &sim.observe(10_000), 10_000).is_empty());
    assert_eq!(r.phase.to_string(), "aborted: by bob");
    sim.released.clear();
}

#[derive(Debug, Clone)]
struct Case {
    waves: Vec<(Option<u32>, u32, u64, bool)>, // maxParallel %, failure budget count, bake s, rollback
    regions: usize,
    per_region: usize,
    bad: BTreeSet<String>,
    ready_ms: i64,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..5, 1usize..7, 200i64..3_000).prop_flat_map(|(regions, per_region, ready_ms)| {
        let waves = proptest::collection::vec(
            (proptest::option::of(1u32..=100), 0u32..3, 0u64..20, any::<bool>()),
            regions..=regions,
        );
        let names: Vec<String> =
            (0..regions).flat_map(|r| (0..per_region).map(move |i| format!("r{r}-{i:03}"))).collect();
        let bad = proptest::sample::subsequence(names.clone(), 0..=names.len().min(4));
        (waves, bad).prop_map(move |(waves, bad)| Case {
            waves,
            regions,
            per_region,
            bad: bad.into_iter().collect(),
            ready_ms,
        })
    })
}

fn spec_of(c: &Case) -> RolloutSpec {
    RolloutSpec {
        waves: c
            .waves
            .iter()
            .enumerate()
            .map(|(k, (mp, budget, bake, rollback))| WaveSpec {
                name: format!("w{k}"),
                selector: serde_yaml::from_str(&format!("matchLabels: {{region: r{k}}}")).unwrap(),
                max_parallel: mp.map(Amount::Percent),
                failure_budget: Amount::Count(*budget),
                bake_seconds: *bake,
                progress_deadline_seconds: 30,
                approval: false,
                on_failure: if *rollback { OnFailure::Rollback } else { OnFailure::Halt },
            })
            .collect(),
        final_wave: true,
        offline: Offline::Wait,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The planner's promises, whatever the waves and whichever clusters fail.
    #[test]
    fn planner_invariants(c in case()) {
        let s = spec_of(&c);
        let mut r = Rollout::new("app", "new", Some("old".into()), &s, &fleet(c.regions, c.per_region), 0);
        let mut sim = Sim::new(c.ready_ms);
        sim.bad = c.bad.clone();
        let mut now = 0;
        let mut failed_at: Option<usize> = None;
        let mut twin = r.clone();
        while now < 3_600_000 {
            let obs = sim.observe(now);
            let actions = step(&mut r, &obs, now);
            // The same inputs give the same decisions.
            prop_assert_eq!(&step(&mut twin, &obs, now), &actions);
            for a in &actions {
                match a {
                    Action::Release { cluster } => {
                        prop_assert!(failed_at.is_none(), "a release after a wave failed");
                        let (k, _) = r.wave_of(cluster).unwrap();
                        // No cluster of wave k before every earlier wave passed its gate and bake.
                        for earlier in &r.waves[..k] {
                            prop_assert_eq!(&earlier.phase, &WavePhase::Passed);
                        }
                    }
                    Action::Revert { revision, .. } => prop_assert_eq!(revision.as_str(), "old", "only the rendered previous revision"),
                    Action::Event(_) => {}
                }
            }
            // Never more clusters updating in a wave than allowed.
            for w in &r.waves {
                let limit = w.spec.max_parallel.map_or(w.clusters.len(), |m| m.of(w.clusters.len())).max(1);
                let updating = w.clusters.iter().filter(|c| c.outcome == ClusterOutcome::Updating).count();
                prop_assert!(updating <= limit, "wave {} has {} updating, limit {}", w.spec.name, updating, limit);
            }
            if failed_at.is_none() {
                failed_at = r.waves.iter().position(|w| matches!(w.phase, WavePhase::Failed(_)));
            }
            sim.apply(&actions, "new", now);
            if !r.active() {
                break;
            }
            now += 1_000;
        }
        prop_assert!(!r.active(), "the rollout ends: {:?}", r.phase);
        if c.bad.is_empty() {
            prop_assert_eq!(&r.phase, &RolloutPhase::Complete);
        }
    }
}
