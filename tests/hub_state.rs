//! The hub as one state machine, end to end, with real processes: a simulator with six clusters, six agent
//! processes, the hub binary following a repository served by `git daemon`, the `flotilla` CLI.
//!
//! Day-2 operations: an unrelated commit leaves a rollout that waits for approval after its bake exactly where
//! it is; failed content is not rolled out again by an unrelated commit and `flotilla rollout retry` does;
//! an app and a cluster removed while a rollout runs; a duplicate session with a cluster's certificate; the hub
//! killed (kill -9) mid-rollout under `offline: fail` and `offline: skip`; the hub started on a wiped data
//! directory while agents run apps: nothing is deleted and the fleet view is rebuilt.

use flotilla_e2e::{
    binary, commit, eventually, free_port, git_daemon, kube, operator_client, spawn, start_agent, Proc,
};
use flotilla_proto::agent::v1 as pb;
use flotilla_proto::platform::v1::{GetClusterRequest, ListRolloutsRequest, Rollout};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CLUSTERS: [&str; 6] = ["c1", "c2", "c3", "c4", "c5", "c6"];

fn ring(c: &str) -> u32 {
    match c {
        "c1" | "c2" => 1,
        "c3" | "c4" => 2,
        _ => 3,
    }
}

fn cm(name: &str, v: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\ndata: {{v: '{v}'}}\n")
}

fn deployment(image: &str) -> String {
    format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: web, image: '{image}'}}]}}\n")
}

struct World {
    tmp: tempfile::TempDir,
    repo: PathBuf,
    url: String,
    port: u16,
    hub: Option<Proc>,
    server: String,
    agents: BTreeMap<String, Proc>,
    _sim: Proc,
    _daemon: Proc,
    hub_args: Vec<String>,
}

impl World {
    async fn new(files: &[(&str, String)], hub_args: &[&str]) -> World {
        flotilla_common::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        eprintln!("work directory (logs): {}", tmp.path().display());
        flotilla_e2e::issue_certs(tmp.path(), &CLUSTERS.join(","), "alice");
        let repo = flotilla_e2e::new_repo(tmp.path());
        let mut all: Vec<(String, String)> = CLUSTERS
            .iter()
            .map(|c| (format!("clusters/{c}.yaml"), format!("labels: {{ring: '{}'}}\n", ring(c))))
            .collect();
        all.extend(files.iter().map(|(p, c)| (p.to_string(), c.clone())));
        let borrowed: Vec<(&str, Option<&str>)> = all.iter().map(|(p, c)| (p.as_str(), Some(c.as_str()))).collect();
        commit(&repo, &borrowed, "first");
        let (daemon, git_port) = git_daemon(&tmp.path().join("served"));
        let url = format!("git://127.0.0.1:{git_port}/fleet.git");
        let kc = tmp.path().join("kc");
        let sim_args: Vec<String> =
            ["--listen", "127.0.0.1:0", "--clusters", "0", "--cluster", "c1,c2,c3,c4,c5,c6", "--ready-after-ms", "200"]
                .iter()
                .map(|s| s.to_string())
                .chain(["--kubeconfig-dir".to_string(), kc.display().to_string()])
                .collect();
        let sim = spawn("flotilla-sim", &sim_args, &tmp.path().join("sim.log"));
        eventually(30, "the simulator", || async { kc.join("server").exists().then_some(()) }).await;
        let server = std::fs::read_to_string(kc.join("server")).unwrap().trim().to_string();
        let port = free_port();
        let mut w = World {
            tmp,
            repo,
            url,
            port,
            hub: None,
            server,
            agents: BTreeMap::new(),
            _sim: sim,
            _daemon: daemon,
            hub_args: hub_args.iter().map(|s| s.to_string()).collect(),
        };
        w.start_hub();
        for c in CLUSTERS {
            w.agents.insert(c.to_string(), start_agent(w.tmp.path(), port, c, c));
        }
        w
    }

    fn path(&self) -> &Path {
        self.tmp.path()
    }

    fn certs(&self) -> PathBuf {
        self.path().join("certs")
    }

    fn start_hub(&mut self) {
        self.hub = Some(flotilla_e2e::start_hub_with(self.path(), self.port, &self.url, &self.hub_args));
    }

    fn kill_hub(&mut self) {
        if let Some(mut h) = self.hub.take() {
            h.kill();
        }
    }

    fn commit(&self, files: &[(&str, Option<String>)], msg: &str) -> String {
        let borrowed: Vec<(&str, Option<&str>)> = files.iter().map(|(p, c)| (*p, c.as_deref())).collect();
        commit(&self.repo, &borrowed, msg);
        flotilla_e2e::git(&self.repo, &["rev-parse", "HEAD"])
    }

    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new(binary("flotilla"))
            .args(args)
            .args(["--hub", &format!("https://localhost:{}", self.port), "--operator", "alice", "--certs"])
            .arg(self.certs())
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    async fn rollout(&self, app: &str) -> Option<Rollout> {
        let mut c = operator_client(&self.certs(), self.port).await;
        c.list_rollouts(ListRolloutsRequest { app: app.into() }).await.ok()?.into_inner().rollouts.into_iter().next()
    }

    async fn wait_rollout(&self, app: &str, what: &str, secs: u64, f: impl Fn(&Rollout) -> bool) -> Rollout {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let r = self.rollout(app).await;
            if let Some(r) = r.as_ref().filter(|r| f(r)) {
                return r.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {secs}s waiting for {app}: {what}; last: {r:#?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn value(&self, cluster: &str, ns: &str, name: &str) -> Option<String> {
        let client = kube(&self.path().join("kc"), cluster).await;
        let api: Api<ConfigMap> = Api::namespaced(client, ns);
        api.get_opt(name).await.ok().flatten().and_then(|c| c.data).and_then(|d| d.get("v").cloned())
    }

    async fn values(&self, ns: &str, name: &str) -> BTreeMap<String, Option<String>> {
        let mut out = BTreeMap::new();
        for c in CLUSTERS {
            out.insert(c.to_string(), self.value(c, ns, name).await);
        }
        out
    }

    async fn image(&self, cluster: &str) -> Option<String> {
        self.image_in(cluster, "web").await
    }

    async fn image_in(&self, cluster: &str, ns: &str) -> Option<String> {
        let client = kube(&self.path().join("kc"), cluster).await;
        let api: Api<Deployment> = Api::namespaced(client, ns);
        api.get_opt("web").await.ok()??.spec?.template.spec?.containers.first()?.image.clone()
    }

    fn behaviour(&self, cluster: &str, body: &str) {
        flotilla_e2e::admin_patch(&self.server, &format!("/admin/clusters/{cluster}/behaviour"), body);
    }

    async fn connected(&self, cluster: &str) -> bool {
        let mut c = operator_client(&self.certs(), self.port).await;
        c.get_cluster(GetClusterRequest { name: cluster.into() }).await.is_ok_and(|r| r.into_inner().connected)
    }
}

impl Drop for World {
    /// A failed test shows the end of the hub's and an agent's log (the work directory goes with the test).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(dir) = std::fs::read_dir(self.path()) else { return };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("hub-") || name.starts_with("agent-") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("  ")).collect();
                eprintln!("== {name} (last 40 lines)\n{}", lines[lines.len().saturating_sub(40)..].join("\n"));
            }
        }
    }
}

fn count(r: &Rollout, f: impl Fn(&flotilla_proto::platform::v1::Wave) -> u32) -> u32 {
    r.waves.iter().map(f).sum()
}

const APPROVAL_WAVES: &str = "waves:\n- {name: first, selector: {matchLabels: {ring: '1'}}, bakeSeconds: 3, progressDeadlineSeconds: 6}\n- {name: second, selector: {matchLabels: {ring: '2'}}, approval: true, progressDeadlineSeconds: 6}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_survive_unrelated_commits_failures_and_removals() {
    let w = World::new(
        &[
            ("rollout.yaml", APPROVAL_WAVES.into()),
            ("apps/web/app.yaml", "namespace: web\ntargets: [{selector: {}}]\n".into()),
            ("apps/web/web.yaml", deployment("web:1")),
            (
                "apps/other/app.yaml",
                "namespace: other\ntargets: [{selector: {}}]\nrollout: {waves: [{name: all}]}\n".into(),
            ),
            ("apps/other/cm.yaml", cm("other", "1")),
        ],
        &[],
    )
    .await;
    let rev1 = flotilla_e2e::git(&w.repo, &["rev-parse", "HEAD"]);
    w.wait_rollout("web", "awaiting approval", 90, |r| r.revision == rev1 && r.waves[1].phase == "awaiting approval")
        .await;
    assert!(w.cli(&["rollout", "approve", "web", "second"]).0);
    w.wait_rollout("web", "rev1 complete", 90, |r| r.revision == rev1 && r.phase == "complete").await;

    // web:2 passes its first wave, bakes, and waits for approval.
    let rev2 = w.commit(&[("apps/web/web.yaml", Some(deployment("web:2")))], "web 2");
    let waiting = w
        .wait_rollout("web", "web:2 awaiting approval", 90, |r| {
            r.revision == rev2 && r.waves[1].phase == "awaiting approval"
        })
        .await;
    let bakes = |r: &Rollout| r.timeline.iter().filter(|e| e.contains("wave first baking")).count();
    // An unrelated commit (only app other changes): web's rollout stays exactly where it is.
    let rev3 = w.commit(&[("apps/other/cm.yaml", Some(cm("other", "2")))], "other 2");
    eventually(60, "other 2 everywhere", || async {
        w.values("other", "other").await.values().all(|v| v.as_deref() == Some("2")).then_some(())
    })
    .await;
    let still = w.rollout("web").await.unwrap();
    assert_eq!(still.revision, rev2, "not restarted by {rev3}");
    assert_eq!(still.waves[1].phase, "awaiting approval");
    assert_eq!(still.waves[0].phase, "passed");
    assert_eq!(bakes(&still), bakes(&waiting), "the bake is not redone: {:#?}", still.timeline);
    assert!(!still.timeline.iter().any(|e| e.contains("superseded")), "{:#?}", still.timeline);
    assert_eq!(w.image("c3").await.as_deref(), Some("web:1"), "the second wave still waits");
    // The fleet view counts the held-back app: c3 is not "in sync" on everything.
    let (ok, text) = w.cli(&["cluster", "c3", "-o", "json"]);
    assert!(ok, "{text}");
    let view: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((view["appsTotal"].as_u64(), view["appsHeldBack"].as_u64()), (Some(2), Some(1)), "{view:#}");
    let web = view["apps"].as_array().unwrap().iter().find(|a| a["app"] == "web").unwrap();
    assert_eq!((web["state"].as_str(), web["heldBackRevision"].as_str()), (Some("held back"), Some(rev2.as_str())));
    assert!(w.cli(&["rollout", "approve", "web", "second"]).0);
    w.wait_rollout("web", "web:2 complete", 90, |r| r.revision == rev2 && r.phase == "complete").await;
    for c in CLUSTERS {
        assert_eq!(w.image(c).await.as_deref(), Some("web:2"), "{c}");
    }

    // web:3 never becomes ready on the first wave: the rollout halts there.
    for c in ["c1", "c2"] {
        w.behaviour(c, r#"{"fail_images": ":3$", "progress_deadline_cap_s": 2}"#);
    }
    let rev4 = w.commit(&[("apps/web/web.yaml", Some(deployment("web:3")))], "web 3");
    let failed =
        w.wait_rollout("web", "web:3 failed", 90, |r| r.revision == rev4 && r.phase.starts_with("failed")).await;
    assert!(failed.phase.contains("wave first failed"), "{}", failed.phase);
    // An unrelated commit does not roll the failed content out again.
    w.commit(&[("apps/other/cm.yaml", Some(cm("other", "3")))], "other 3");
    eventually(60, "other 3 everywhere", || async {
        w.values("other", "other").await.values().all(|v| v.as_deref() == Some("3")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = w.rollout("web").await.unwrap();
    assert_eq!((r.revision.as_str(), r.phase.starts_with("failed")), (rev4.as_str(), true), "{r:#?}");
    assert_eq!(w.image("c3").await.as_deref(), Some("web:2"));
    let (ok, text) = w.cli(&["rollout", "resume", "web"]);
    assert!(!ok && text.contains("rollout retry web"), "resume says how to retry: {text}");
    assert!(!text.contains("status:") && !text.contains("FailedPrecondition"), "no gRPC wording: {text}");
    // Fixed on the clusters (the failure rule lifted, the stuck Deployments deleted and re-created by their
    // agents); retried by an operator: the same content goes out again and completes.
    for c in ["c1", "c2"] {
        w.behaviour(c, r#"{"fail_images": "^nothing$"}"#);
        let api: Api<Deployment> = Api::namespaced(kube(&w.path().join("kc"), c).await, "web");
        api.delete("web", &Default::default()).await.unwrap();
    }
    eventually(60, "web re-created on the first wave", || async {
        let mut all = true;
        for c in ["c1", "c2"] {
            all &= w.image(c).await.as_deref() == Some("web:3");
        }
        all.then_some(())
    })
    .await;
    let (ok, text) = w.cli(&["rollout", "retry", "web"]);
    assert!(ok && text.contains("retrying"), "{text}");
    w.wait_rollout("web", "web:3 approval after retry", 90, |r| {
        r.revision == rev4 && r.waves[1].phase == "awaiting approval"
    })
    .await;
    assert!(w.cli(&["rollout", "approve", "web", "second"]).0);
    w.wait_rollout("web", "web:3 complete", 90, |r| r.revision == rev4 && r.phase == "complete").await;
    assert_eq!(w.image("c6").await.as_deref(), Some("web:3"));
    let r = w.rollout("web").await.unwrap();
    assert!(r.timeline.iter().any(|e| e.contains("retrying") && e.ends_with("by alice")), "{:#?}", r.timeline);

    // A rollout waits for approval; meanwhile cluster c6 leaves the fleet and app other is removed.
    let rev6 = w.commit(&[("apps/web/web.yaml", Some(deployment("web:4")))], "web 4");
    w.wait_rollout("web", "web:4 awaiting approval", 90, |r| {
        r.revision == rev6 && r.waves[1].phase == "awaiting approval"
    })
    .await;
    w.commit(
        &[("clusters/c6.yaml", None), ("apps/other/app.yaml", None), ("apps/other/cm.yaml", None)],
        "drop c6 and other",
    );
    eventually(60, "other pruned", || async {
        let v = w.values("other", "other").await;
        ["c1", "c2", "c3", "c4", "c5"].iter().all(|c| v[*c].is_none()).then_some(())
    })
    .await;
    let r = w.rollout("web").await.unwrap();
    assert_eq!(r.revision, rev6, "the rollout goes on: {r:#?}");
    assert_eq!(r.waves[1].phase, "awaiting approval");
    assert_eq!(count(&r, |w| w.clusters), 5, "c6 left the rollout: {r:#?}");
    assert!(w.cli(&["rollout", "approve", "web", "second"]).0);
    w.wait_rollout("web", "web:4 complete without c6", 90, |r| r.revision == rev6 && r.phase == "complete").await;
    assert_eq!(w.image("c6").await.as_deref(), Some("web:3"), "a cluster out of the inventory gets nothing new");
    let (ok, text) = w.cli(&["clusters"]);
    assert!(ok && !text.lines().any(|l| l.starts_with("c6 ")), "{text}");
}

const OFFLINE: &str = "waves:\n- {name: first, selector: {matchLabels: {ring: '1'}}}\n- {name: second, selector: {matchLabels: {ring: '2'}}, bakeSeconds: 6}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_or_on_a_wiped_store_fails_skips_and_deletes_nothing() {
    let fail = "namespace: hard\ntargets: [{selector: {}}]\nrollout:\n  offline: fail\n  waves:\n  - {name: first, selector: {matchLabels: {ring: '1'}}}\n  - {name: second, selector: {matchLabels: {ring: '2'}}, progressDeadlineSeconds: 120}\n".to_string();
    let skip = format!(
        "namespace: soft\ntargets: [{{selector: {{}}}}]\nrollout:\n  offline: skip\n{}",
        OFFLINE.replace("waves:", "  waves:").replace("\n-", "\n  -")
    );
    let mut w = World::new(
        &[
            ("apps/hard/app.yaml", fail),
            ("apps/hard/web.yaml", deployment("hard:1")),
            ("apps/soft/app.yaml", skip),
            ("apps/soft/cm.yaml", cm("soft", "1")),
        ],
        &["--restart-grace-seconds", "50"],
    )
    .await;
    let rev1 = flotilla_e2e::git(&w.repo, &["rev-parse", "HEAD"]);
    w.wait_rollout("hard", "rev1 complete", 120, |r| r.revision == rev1 && r.phase == "complete").await;
    w.wait_rollout("soft", "rev1 complete", 120, |r| r.revision == rev1 && r.phase == "complete").await;

    // A duplicate session with c1's certificate: it replaces the agent's, the agent's replaces it back, and
    // when the duplicate ends the cluster stays connected.
    {
        let certs = w.certs();
        let read = |f: &str| std::fs::read_to_string(certs.join(f)).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
            .identity(tonic::transport::Identity::from_pem(read("clusters/c1.pem"), read("clusters/c1-key.pem")))
            .domain_name("localhost");
        let channel = tonic::transport::Channel::from_shared(format!("https://localhost:{}", w.port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let hello = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                agent_version: "duplicate".into(),
                applied: vec![],
                protocol: 1,
                ..Default::default()
            })),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(hello).await.unwrap();
        let mut inbound = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        let ended = tokio::time::timeout(Duration::from_secs(40), async {
            loop {
                match inbound.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return "closed".to_string(),
                    Err(s) => return s.message().to_string(),
                }
            }
        })
        .await
        .expect("the agent's next session replaces the duplicate");
        assert!(ended.contains("replaced this one"), "{ended}");
        drop(tx);
        for _ in 0..20 {
            assert!(w.connected("c1").await, "c1 stays connected when the replaced session ends");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    // Slow clusters in the second wave, so the hub dies while they update.
    for c in ["c3", "c4"] {
        w.behaviour(c, r#"{"ready_after_ms": 6000}"#);
    }
    let rev2 = w.commit(
        &[("apps/hard/web.yaml", Some(deployment("hard:2"))), ("apps/soft/cm.yaml", Some(cm("soft", "2")))],
        "both 2",
    );
    w.wait_rollout("hard", "the second wave updating", 90, |r| r.revision == rev2 && r.waves[1].updating > 0).await;
    w.kill_hub();
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.start_hub();
    // soft: killed again while its second wave bakes, so the last wave starts right after the restart.
    w.wait_rollout("soft", "the second wave baking", 90, |r| r.revision == rev2 && r.waves[1].phase == "baking").await;
    w.kill_hub();
    tokio::time::sleep(Duration::from_secs(8)).await;
    w.start_hub();
    let hard = w.wait_rollout("hard", "rev2 complete", 120, |r| r.revision == rev2 && r.phase == "complete").await;
    assert_eq!(count(&hard, |w| w.failed), 0, "nobody failed because the hub was down: {hard:#?}");
    let soft = w.wait_rollout("soft", "rev2 complete", 120, |r| r.revision == rev2 && r.phase == "complete").await;
    assert_eq!(count(&soft, |w| w.skipped), 0, "nobody skipped because the hub was down: {soft:#?}");
    assert_eq!(w.values("soft", "soft").await.values().filter(|v| v.as_deref() == Some("2")).count(), 6);

    // The hub's data directory is lost: a new hub on an empty store deletes nothing and rebuilds its view.
    w.kill_hub();
    std::fs::remove_dir_all(w.path().join("hub-data")).unwrap();
    w.start_hub();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        let v = w.values("soft", "soft").await;
        assert!(v.values().all(|v| v.as_deref() == Some("2")), "nothing deleted or changed: {v:?}");
        for c in CLUSTERS {
            assert_eq!(w.image_in(c, "hard").await.as_deref(), Some("hard:2"), "{c}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let certs = w.certs();
    eventually(90, "the fleet view rebuilt: every cluster in sync on the current commit", || {
        let certs = certs.clone();
        let port = w.port;
        let rev2 = rev2.clone();
        async move {
            let mut c = operator_client(&certs, port).await;
            let r =
                c.list_clusters(flotilla_proto::platform::v1::ListClustersRequest::default()).await.ok()?.into_inner();
            (r.clusters.len() == 6 && r.clusters.iter().all(|c| c.revision == rev2 && c.apps_in_sync == 2))
                .then_some(())
        }
    })
    .await;
    let (ok, text) = w.cli(&["clusters", "--problems"]);
    assert!(ok && !CLUSTERS.iter().any(|c| text.lines().any(|l| l.starts_with(&format!("{c} ")))), "{text}");
}

/// A cluster whose API server goes away: its agent says so at once, and every view an operator reads shows it
/// (clusters, cluster, explain), with the apps Unknown rather than Healthy; it clears when the server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_api_server_is_down_says_so_everywhere() {
    let w = World::new(
        &[
            ("apps/shop/app.yaml", "namespace: shop\ntargets: [{selector: {}}]\n".into()),
            ("apps/shop/cm.yaml", cm("c", "1")),
        ],
        &[],
    )
    .await;
    eventually(120, "shop on every cluster", || async {
        let v = w.values("shop", "c").await;
        v.values().all(|x| x.as_deref() == Some("1")).then_some(())
    })
    .await;
    flotilla_e2e::admin_patch(&w.server, "/admin/clusters/c3/faults", r#"{"offline": true}"#);
    let started = std::time::Instant::now();
    let shown = eventually(40, "clusters shows c3's API unreachable", || async {
        let (_, out) = w.cli(&["clusters", "--problems"]);
        out.contains("c3: API unreachable since ").then_some(out)
    })
    .await;
    eprintln!("shown {:?} after the API server went away:\n{shown}", started.elapsed());
    let (ok, out) = w.cli(&["explain", "c3"]);
    assert!(ok && out.contains("API unreachable since "), "{out}");
    eventually(20, "c3's app Unknown, not Healthy", || async {
        let (ok, out) = w.cli(&["cluster", "c3"]);
        (ok && out.contains("Unknown") && out.contains("has not answered since")).then_some(())
    })
    .await;
    let (_, out) = w.cli(&["clusters", "--problems"]);
    assert!(!out.contains("c2: API unreachable"), "only c3: {out}");
    flotilla_e2e::admin_patch(&w.server, "/admin/clusters/c3/faults", r#"{"offline": false}"#);
    eventually(60, "the problem clears", || async {
        let (_, out) = w.cli(&["clusters", "--problems"]);
        (!out.contains("API unreachable")).then_some(())
    })
    .await;
}
