//! Rules of the hub's state machine that a user relies on, checked on the machine itself: unreferenced bundles
//! are collected, the cluster list is paged and filtered, and a control the store cannot record changes nothing
//! and says so (through the running hub's writer).

use flotilla_common::fleet::parse;
use flotilla_common::fleet::render::{render_fleet, RenderCache};
use flotilla_common::tools::SystemTools;
use flotilla_hub::git::Follower;
use flotilla_hub::machine::{State, Synced};
use flotilla_hub::platform::list_clusters;
use flotilla_hub::report::Rendering;
use flotilla_hub::rollouts::Control;
use flotilla_hub::server::{Hub, Options};
use flotilla_hub::sessions::Sessions;
use flotilla_hub::store::{MemStore, Store};
use flotilla_proto::platform::v1::ListClustersRequest;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

fn synced(rev: &str, value: &str, clusters: usize) -> Synced {
    let mut files: Vec<(String, String)> = (0..clusters)
        .map(|i| {
            (format!("clusters/k{i}.yaml"), format!("labels: {{tier: {}}}\n", if i % 2 == 0 { "prod" } else { "dev" }))
        })
        .collect();
    files.push(("apps/shop/app.yaml".into(), "namespace: shop\ntargets: [{selector: {}}]\n".into()));
    files.push((
        "apps/shop/cm.yaml".into(),
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\ndata: {{v: '{value}'}}\n"),
    ));
    let fleet = parse(&files.into_iter().map(|(p, c)| (p, c.into_bytes())).collect());
    let rendered = render_fleet(&fleet, &SystemTools::detect(), &mut RenderCache::default());
    Synced { revision: rev.into(), fleet: Arc::new(fleet), rendered, rendering: Rendering::default() }
}

#[test]
fn bundles_nothing_references_are_collected_at_the_next_commit() {
    let store = MemStore::default();
    let mut st = State::default();
    for (rev, v) in [("r1", "one"), ("r2", "two")] {
        let t = st.synced(&synced(rev, v, 3), 0);
        store.commit(t.batch).unwrap();
        st = t.next;
    }
    let stored = store.keys("bundles/").unwrap();
    assert_eq!(stored.len(), 1, "only the bundle of r2 is kept: {stored:?}");
    let digest = &st.desired["k0"]["shop"].digest;
    assert_eq!(stored[0], format!("bundles/{digest}"));
    assert_eq!(State::load(&store).unwrap(), st);
}

#[test]
fn the_cluster_list_is_paged_and_filtered() {
    let t = State::default().synced(&synced("r1", "one", 5), 0);
    let st = t.next;
    let sessions = Sessions::default();
    let page = |token: &str, selector: &str| {
        let req = ListClustersRequest {
            page_size: 2,
            page_token: token.into(),
            selector: selector.into(),
            problems_only: false,
        };
        list_clusters(&st, &sessions, &req).unwrap()
    };
    let mut names = Vec::new();
    let mut token = String::new();
    for _ in 0..5 {
        let p = page(&token, "");
        assert_eq!(p.total, 5);
        assert!(p.clusters.len() <= 2);
        names.extend(p.clusters.iter().map(|c| c.name.clone()));
        token = p.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(names, ["k0", "k1", "k2", "k3", "k4"]);
    let prod = page("", "tier=prod");
    assert_eq!((prod.total, prod.clusters.iter().map(|c| c.name.as_str()).collect::<Vec<_>>()), (3, vec!["k0", "k2"]));
    let all =
        list_clusters(&st, &sessions, &ListClustersRequest { problems_only: true, ..Default::default() }).unwrap();
    assert_eq!(all.total, 5, "no agent is connected: every cluster has a problem");
    assert!(all.clusters[0].problems.iter().any(|p| p.contains("not connected")), "{:?}", all.clusters[0].problems);
    let bad =
        list_clusters(&st, &sessions, &ListClustersRequest { selector: "tier in prod".into(), ..Default::default() });
    assert!(bad.unwrap_err().message().contains("invalid label selector requirement"));
}

#[tokio::test]
async fn a_refusal_repeated_in_a_loop_is_recorded_once_and_cannot_push_out_the_trail() {
    use flotilla_hub::audit::AuditRecord;
    let store = Arc::new(MemStore::default());
    let follower =
        Follower::new("file:///nonexistent".to_string(), "main", std::env::temp_dir().join("flotilla-unused"));
    let opts = Options { tick: None, ..Options::default() };
    let hub = Hub::with_options(store, follower, CancellationToken::new(), opts).unwrap();
    let refused = AuditRecord {
        who: "mallory".into(),
        action: "view".into(),
        allowed: false,
        answer: "refused: the certificate of operator mallory (serial 1a) is revoked".into(),
        ..Default::default()
    };
    for _ in 0..500 {
        hub.record(refused.clone()).await;
    }
    let other = AuditRecord { action: "approve".into(), app: "shop".into(), ..refused.clone() };
    hub.record(other).await;
    let allowed = AuditRecord { who: "alice".into(), action: "refresh".into(), allowed: true, ..Default::default() };
    hub.record(allowed.clone()).await;
    hub.record(allowed).await;
    let audit = hub.audit();
    let count = |who: &str, action: &str| audit.iter().filter(|r| r.who == who && r.action == action).count();
    assert_eq!(count("mallory", "view"), 1, "{audit:?}");
    assert_eq!(count("mallory", "approve"), 1, "another refusal is a record of its own");
    assert_eq!(count("alice", "refresh"), 2, "allowed calls are all recorded");
}

#[tokio::test]
async fn a_control_the_store_cannot_record_changes_nothing_and_says_so() {
    let store = Arc::new(MemStore::default());
    let follower =
        Follower::new("file:///nonexistent".to_string(), "main", std::env::temp_dir().join("flotilla-unused"));
    let opts = Options { tick: None, ..Options::default() };
    let hub = Hub::with_options(store.clone(), follower, CancellationToken::new(), opts).unwrap();
    store.fail_commits.store(1, Ordering::SeqCst);
    let e = hub.control("shop", &Control::Pause, "alice").await.unwrap_err();
    assert!(e.starts_with("storing the change failed, nothing changed"), "{e}");
    assert!(hub.audit().is_empty());
    assert!(hub.state().audit.is_empty(), "memory did not change either");
    let e = hub.control("shop", &Control::Pause, "alice").await.unwrap_err();
    assert_eq!(e, "app shop has no rollout");
    assert_eq!(hub.audit().len(), 1, "the refusal is recorded");
}

#[test]
fn the_audit_is_kept_by_count_and_by_age() {
    use flotilla_hub::keys;
    use flotilla_hub::machine::{AUDIT_AGE_MS, AUDIT_MAX};
    use flotilla_hub::store::Op;
    let now = 200 * 24 * 3600 * 1000i64;
    // A record older than the age limit goes at the next control.
    let st =
        State { audit: Arc::new([keys::audit(now - AUDIT_AGE_MS - 1, 0)].into_iter().collect()), ..State::default() };
    let t = st.control("shop", &Control::Pause, "alice", now, 1);
    assert_eq!(t.next.audit.len(), 1);
    assert!(t.batch.0.contains(&Op::Delete(keys::audit(now - AUDIT_AGE_MS - 1, 0))));
    // A full audit drops its oldest record for each new one.
    let full: std::collections::VecDeque<String> = (0..AUDIT_MAX as u64).map(|i| keys::audit(now - 1000, i)).collect();
    let st = State { audit: Arc::new(full), ..State::default() };
    let t = st.control("shop", &Control::Pause, "alice", now, 1);
    assert_eq!(t.next.audit.len(), AUDIT_MAX);
    assert!(t.batch.0.contains(&Op::Delete(keys::audit(now - 1000, 0))));
    assert_eq!(t.next.audit.back(), Some(&keys::audit(now, 1)));
}

#[test]
fn reports_keep_only_apps_meant_for_the_cluster_within_bounds() {
    use flotilla_hub::machine::Observed;
    use flotilla_hub::report::{MAX_APPS, MAX_REASONS};
    use flotilla_proto::agent::v1 as pb;
    let st = State::default().synced(&synced("r1", "one", 2), 0).next;
    let status = |app: &str| pb::AppStatus {
        app: app.into(),
        digest: "sha256:x".into(),
        reasons: (0..100).map(|i| format!("reason {i}")).collect(),
        message: "m".repeat(100_000),
        ..Default::default()
    };
    // A flood of app names the cluster is not meant to run, and one app it is.
    let mut apps: Vec<pb::AppStatus> = (0..MAX_APPS + 50).map(|i| status(&format!("junk-{i}"))).collect();
    apps.push(status("shop"));
    let obs = [
        ("k0".to_string(), Observed { apps: apps.clone(), seen_ms: 1, ..Default::default() }),
        ("stranger".to_string(), Observed { apps, seen_ms: 1, ..Default::default() }),
    ];
    let t = st.observed(obs.into_iter().collect());
    let rep = &t.next.reports["k0"];
    assert_eq!(rep.apps.keys().collect::<Vec<_>>(), ["shop"], "only the app meant for k0");
    let shop = &rep.apps["shop"].0;
    assert_eq!(shop.reasons.len(), MAX_REASONS);
    assert!(shop.message.len() <= 4100, "{}", shop.message.len());
    assert!(!t.next.reports.contains_key("stranger"), "a cluster out of the inventory keeps no report");
}

#[test]
fn the_problems_of_a_commit_name_the_apps_it_breaks() {
    let st = State::default().synced(&synced("r1", "one", 5), 0).next;
    let mut broken = synced("r2", "it's broken", 5);
    broken.revision = "r2".into();
    let t = st.synced(&broken, 0);
    let p = t.next.problems.iter().find(|p| p.starts_with("app shop on ")).expect("the app's problem");
    assert!(p.contains("k0, k1, k2 and 2 more") && p.contains("apps/shop/cm.yaml"), "{p}");
}

#[test]
fn an_unreachable_api_server_and_a_too_old_agent_are_problems_of_the_cluster() {
    use flotilla_hub::machine::Observed;
    use flotilla_hub::platform::cluster_view;
    use flotilla_proto::agent::v1 as pb;
    let st = State::default().synced(&synced("r1", "one", 2), 0).next;
    let down = pb::ApiServer { unreachable_since_unix_ms: 1_796_126_584_000, error: "connection refused".into() };
    let obs = [
        ("k0".to_string(), Observed { api: Some(down), seen_ms: 1, ..Default::default() }),
        ("k1".to_string(), Observed { agent: Some(("0.0.9".into(), 0)), seen_ms: 1, ..Default::default() }),
    ];
    let st = st.observed(obs.into_iter().collect()).next;
    let sessions = Sessions::default();
    let k0 = cluster_view(&st, &sessions, "k0").unwrap();
    assert!(
        k0.problems.contains(&"API unreachable since 2026-12-01 12:03:04 UTC: connection refused".to_string()),
        "{:?}",
        k0.problems
    );
    let k1 = cluster_view(&st, &sessions, "k1").unwrap();
    assert!(k1.problems.iter().any(|p| p.contains("its agent 0.0.9 is too old (protocol 0")), "{:?}", k1.problems);
    // The agent says it answers again: the problem goes; a report without the field changes nothing.
    let up = pb::ApiServer::default();
    let st =
        st.observed([("k0".to_string(), Observed { api: Some(up), seen_ms: 2, ..Default::default() })].into()).next;
    assert!(!cluster_view(&st, &sessions, "k0").unwrap().problems.iter().any(|p| p.starts_with("API unreachable")));
    // It survives a restart of the hub (the report is stored).
    let store = MemStore::default();
    let st2 = State::default().synced(&synced("r1", "one", 2), 0);
    store.commit(st2.batch).unwrap();
    let obs = [("k1".to_string(), Observed { agent: Some(("0.0.9".into(), 0)), seen_ms: 1, ..Default::default() })];
    store.commit(st2.next.observed(obs.into_iter().collect()).batch).unwrap();
    let loaded = State::load(&store).unwrap();
    assert!(cluster_view(&loaded, &sessions, "k1").unwrap().problems.iter().any(|p| p.contains("too old")));
}

#[test]
fn a_rollout_says_which_released_cluster_cannot_reach_its_api_server() {
    use flotilla_hub::machine::Observed;
    use flotilla_hub::platform::rollout_view;
    use flotilla_proto::agent::v1 as pb;
    let with_waves = |rev: &str, value: &str| {
        let mut s = synced(rev, value, 3);
        let mut tree: flotilla_common::fleet::Tree =
            (0..3).map(|i| (format!("clusters/k{i}.yaml"), b"labels: {}\n".to_vec())).collect();
        tree.insert(
            "rollout.yaml".into(),
            b"waves:\n- {name: all, selector: {}, progressDeadlineSeconds: 600}\n".to_vec(),
        );
        tree.insert("apps/shop/app.yaml".into(), b"namespace: shop\ntargets: [{selector: {}}]\n".to_vec());
        let cm = format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\ndata: {{v: '{value}'}}\n");
        tree.insert("apps/shop/cm.yaml".into(), cm.into_bytes());
        let fleet = parse(&tree);
        s.rendered = render_fleet(&fleet, &SystemTools::detect(), &mut RenderCache::default());
        s.fleet = Arc::new(fleet);
        s
    };
    let st = State::default().synced(&with_waves("r1", "one"), 0).next;
    let st = st.synced(&with_waves("r2", "two"), 1_000).next;
    let st = st.tick(2_000, &|_| true).next;
    let down = pb::ApiServer { unreachable_since_unix_ms: 1_796_126_584_000, error: "connection refused".into() };
    let st =
        st.observed([("k1".to_string(), Observed { api: Some(down), seen_ms: 3, ..Default::default() })].into()).next;
    let view = rollout_view("shop", &st.rollouts["shop"], 3_000, &st.reports);
    assert_eq!(
        view.waves[0].waiting, "waits on k1: API unreachable since 2026-12-01 12:03:04 UTC: connection refused",
        "{view:?}"
    );
}

#[test]
fn desired_state_is_stored_per_app_and_a_store_of_per_cluster_keys_is_read_then_rewritten() {
    let store = MemStore::default();
    let t = State::default().synced(&synced("r1", "one", 300), 0);
    store.commit(t.batch).unwrap();
    let st = t.next;
    // 300 clusters on one bundle: one release key and the list of clusters, not 300 keys.
    assert!(store.keys("desired/").unwrap().is_empty());
    assert_eq!(store.keys("releases/").unwrap(), vec!["releases/shop"]);
    let release = store.get("releases/shop").unwrap().unwrap();
    assert!(release.len() < 300 * 20, "{} bytes for 300 clusters", release.len());
    assert_eq!(State::load(&store).unwrap(), st);

    // A store an earlier version wrote: one key per cluster.
    let legacy = MemStore::default();
    let mut batch = flotilla_hub::store::Batch::default();
    for (k, v) in store.scan("").unwrap() {
        if k != "fleet/desired-clusters" && !k.starts_with("releases/") {
            batch = batch.put(k, v);
        }
    }
    for (c, apps) in &st.desired {
        batch = batch.put(format!("desired/{c}"), serde_json::to_vec(&**apps).unwrap());
    }
    legacy.commit(batch).unwrap();
    let old = State::load(&legacy).unwrap();
    assert!(old.desired_legacy);
    assert_eq!(old.desired, st.desired, "read the same");
    // The next change of desired state writes the releases and removes the per-cluster keys.
    let t = old.synced(&synced("r2", "two", 300), 0);
    legacy.commit(t.batch).unwrap();
    assert!(legacy.keys("desired/").unwrap().is_empty());
    assert!(!t.next.desired_legacy);
    assert_eq!(State::load(&legacy).unwrap(), t.next);
}
