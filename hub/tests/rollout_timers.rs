//! The hub's rollout timers on paused tokio time: bake time, progress deadline, and an approval that waits
//! as long as it takes. The hub runs with a clock that follows tokio's (paused) time; agents' reports are
//! recorded directly.

use flotilla_e2e::{commit, git};
use flotilla_hub::git::Follower;
use flotilla_hub::rollouts::Control;
use flotilla_hub::server::{Hub, Options};
use flotilla_hub::store::RedbStore;
use flotilla_proto::agent::v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const ROLLOUT: &str = "waves:\n- {name: first, selector: {matchLabels: {ring: '1'}}, bakeSeconds: 300}\n- {name: second, selector: {matchLabels: {ring: '2'}}, progressDeadlineSeconds: 120}\n";

/// Whether the app has been released to the cluster (a cluster that never had it keeps what its agent runs
/// until then: "adopted").
fn released(hub: &Hub, cluster: &str, app: &str) -> bool {
    hub.desired(cluster, app).is_some_and(|d| !d.adopt)
}

async fn report(hub: &Hub, cluster: &str, app: &str, healthy: bool) {
    let d = hub.desired(cluster, app).expect("released");
    let status = pb::AppStatus {
        app: app.into(),
        digest: d.digest,
        revision: d.revision,
        phase: pb::Phase::Applied as i32,
        health: if healthy { pb::Health::Healthy } else { pb::Health::Progressing } as i32,
        health_reason: if healthy {
            String::new()
        } else {
            "Deployment shop/web: RolloutInProgress: 0 of 1 updated".into()
        },
        ..Default::default()
    };
    hub.record_report(cluster, &pb::StatusReport { apps: vec![status], api: None }).await;
}

async fn advance(secs: u64) {
    tokio::time::advance(Duration::from_secs(secs)).await;
}

#[tokio::test]
async fn bake_time_progress_deadline_and_approval_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("fleet");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    commit(
        &repo,
        &[
            ("clusters/a.yaml", Some("labels: {ring: '1'}\n")),
            ("clusters/b.yaml", Some("labels: {ring: '2'}\n")),
            ("rollout.yaml", Some(ROLLOUT)),
            ("apps/shop/app.yaml", Some("namespace: shop\ntargets: [{selector: {}}]\n")),
            ("apps/shop/cm.yaml", Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")),
            (
                "apps/gated/app.yaml",
                Some("namespace: gated\ntargets: [{selector: {}}]\nrollout:\n  waves:\n  - {name: first, selector: {matchLabels: {ring: '1'}}}\n  - {name: everyone, approval: true}\n"),
            ),
            ("apps/gated/cm.yaml", Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: g}\n")),
        ],
        "first",
    );
    let store = Arc::new(RedbStore::open(&tmp.path().join("hub.redb")).unwrap());
    let follower = Follower::new(format!("file://{}", repo.display()), "main", tmp.path().join("clone"));
    let base = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let start = tokio::time::Instant::now();
    let opts = Options {
        clock: Arc::new(move || base + start.elapsed().as_millis() as i64),
        grace: Duration::ZERO,
        tick: None,
        ..Options::default()
    };
    let hub = Hub::with_options(store, follower, CancellationToken::new(), opts).unwrap();
    // The fetch and render run on real time; the rollout's timers on paused time from here.
    hub.sync_once().await;
    tokio::time::pause();
    hub.set_connected("a", true);
    hub.set_connected("b", true);

    // The first wave: a is released, healthy, and bakes for 300 s.
    hub.drive_rollouts().await;
    assert!(released(&hub, "a", "shop") && !released(&hub, "b", "shop"));
    report(&hub, "a", "shop", true).await;
    hub.drive_rollouts().await;
    assert_eq!(hub.rollout("shop").unwrap().waves[0].phase.to_string(), "baking");
    advance(299).await;
    hub.drive_rollouts().await;
    assert!(!released(&hub, "b", "shop"), "the second wave waits for the bake");
    advance(2).await;
    hub.drive_rollouts().await;
    assert_eq!(hub.rollout("shop").unwrap().waves[0].phase.to_string(), "passed");
    assert!(released(&hub, "b", "shop"), "released after the bake");

    // The second wave: b stays unhealthy; it fails at the 120 s deadline, not before.
    report(&hub, "b", "shop", false).await;
    advance(119).await;
    hub.drive_rollouts().await;
    assert_eq!(hub.rollout("shop").unwrap().phase.to_string(), "progressing");
    advance(2).await;
    hub.drive_rollouts().await;
    assert_eq!(
        hub.rollout("shop").unwrap().phase.to_string(),
        "failed: wave second failed: b: progress deadline exceeded: Deployment shop/web: RolloutInProgress: 0 of 1 updated"
    );

    // The approval gate waits as long as it takes.
    report(&hub, "a", "gated", true).await;
    hub.drive_rollouts().await;
    hub.drive_rollouts().await;
    assert_eq!(hub.rollout("gated").unwrap().waves[1].phase.to_string(), "awaiting approval");
    advance(86_400).await;
    hub.drive_rollouts().await;
    assert_eq!(hub.rollout("gated").unwrap().waves[1].phase.to_string(), "awaiting approval");
    assert!(!released(&hub, "b", "gated"));
    assert_eq!(
        hub.control("gated", &Control::Approve("everyone".into()), "alice").await,
        Ok("wave everyone approved".into())
    );
    assert!(released(&hub, "b", "gated"), "released once approved");
    assert_eq!(
        hub.control("gated", &Control::Approve("everyone".into()), "mallory").await,
        Err("wave everyone is approved already".into())
    );
    let audit = hub.audit();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(
        (audit[0].who.as_str(), audit[0].action.as_str(), audit[0].detail.as_str(), audit[0].answer.as_str()),
        ("alice", "approve", "wave everyone", "wave everyone approved")
    );
    assert_eq!(audit[1].answer, "refused: wave everyone is approved already", "refusals are recorded too");
}
