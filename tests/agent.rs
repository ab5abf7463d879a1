//! The agent through a hub outage, with real processes (git daemon, hub, simulator, agent): with the hub
//! stopped, a restarted agent still enforces the last desired state and corrects drift; after the hub comes
//! back, the fleet view shows the truth (health, counts, drift reported with path and values).

use flotilla_e2e::{
    binary, commit, eventually, free_port, git_daemon, kube, operator_client, spawn, start_agent, start_hub,
};
use flotilla_proto::agent::v1 as pb;
use flotilla_proto::platform::v1::{Cluster, GetClusterRequest};
use std::path::Path;
use std::process::Command;

async fn cluster(certs: &Path, port: u16) -> Option<Cluster> {
    let mut c = operator_client(certs, port).await;
    c.get_cluster(GetClusterRequest { name: "eu-1".into() }).await.ok().map(|r| r.into_inner())
}

fn app<'a>(c: &'a Cluster, name: &str) -> Option<&'a pb::AppStatus> {
    c.apps.iter().find(|a| a.app == name).and_then(|a| a.applied.as_ref())
}

fn kubectl(kc: &Path, args: &[&str]) -> String {
    let out = Command::new("kubectl").arg("--kubeconfig").arg(kc).args(args).output().expect("kubectl");
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_enforces_without_the_hub_and_the_view_shows_the_truth_after() {
    flotilla_common::install_crypto_provider();
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    eprintln!("work directory (logs): {}", tmp.display());
    flotilla_e2e::issue_certs(tmp, "eu-1", "alice");
    let served = tmp.join("served");
    let repo = flotilla_e2e::new_repo(tmp);
    let deploy = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: 'web:1'}]}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {mode: strict}\n";
    commit(
        &repo,
        &[
            ("clusters/eu-1.yaml", Some("labels: {region: eu}\n")),
            ("apps/shop/app.yaml", Some("namespace: shop\ntargets: [{selector: {}}]\n")),
            ("apps/shop/web.yaml", Some(deploy)),
            ("apps/notes/app.yaml", Some("namespace: notes\ntargets: [{selector: {}}]\nsync: {drift: report}\n")),
            ("apps/notes/cm.yaml", Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata: {k: v}\n")),
        ],
        "first",
    );
    let (_daemon, git_port) = git_daemon(&served);
    let sim_args: Vec<String> = ["--listen", "127.0.0.1:0", "--cluster", "eu-1", "--kubeconfig-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([tmp.join("kc").display().to_string()])
        .collect();
    let _sim = spawn("flotilla-sim", &sim_args, &tmp.join("sim.log"));
    eventually(20, "the simulator", || async { tmp.join("kc/server").exists().then_some(()) }).await;
    let kc = tmp.join("kc/eu-1.kubeconfig");
    let certs = tmp.join("certs");
    let url = format!("git://127.0.0.1:{git_port}/fleet.git");
    let port = free_port();
    let mut hub = start_hub(tmp, port, &url);
    let mut agent = start_agent(tmp, port, "eu-1", "eu-1");
    eventually(60, "both apps applied and healthy", || async {
        let c = cluster(&certs, port).await?;
        ["shop", "notes"]
            .iter()
            .all(|a| {
                app(&c, a)
                    .is_some_and(|s| s.phase == pb::Phase::Applied as i32 && s.health == pb::Health::Healthy as i32)
            })
            .then_some(())
    })
    .await;

    // The hub goes away; so does the agent; someone edits the cluster by hand.
    hub.kill();
    agent.kill();
    kubectl(&kc, &["patch", "-n", "shop", "configmap/settings", "--type=merge", "-p", r#"{"data":{"mode":"lax"}}"#]);
    kubectl(&kc, &["patch", "-n", "notes", "configmap/notes", "--type=merge", "-p", r#"{"data":{"k":"edited"}}"#]);

    // A restarted agent, no hub: the state it kept in the cluster is enforced.
    let _agent = start_agent(tmp, port, "eu-1", "eu-1");
    let client = kube(&tmp.join("kc"), "eu-1").await;
    eventually(30, "the hand edit corrected with the hub down", || async {
        (flotilla_e2e::value(&client, "shop", "settings", "mode").await.as_deref() == Some("strict")).then_some(())
    })
    .await;
    assert_eq!(flotilla_e2e::value(&client, "notes", "notes", "k").await.as_deref(), Some("edited"), "report only");

    // The hub is back: the fleet view shows what happened.
    let _hub = start_hub(tmp, port, &url);
    let c = eventually(60, "the view after the reconnect", || async {
        let c = cluster(&certs, port).await?;
        let (notes, shop) = (app(&c, "notes")?, app(&c, "shop")?);
        // The agent's watch may deliver its own correction a moment after the reconnect: wait for the truth.
        let truth = notes.drifted == 1 && shop.drifted == 0 && shop.health == pb::Health::Healthy as i32;
        (c.connected && truth).then_some(c)
    })
    .await;
    assert_eq!(c.apps_in_sync, 2, "nothing to re-apply: {c:?}");
    let notes = app(&c, "notes").unwrap();
    assert_eq!(notes.drift.len(), 1);
    let d = &notes.drift[0];
    assert_eq!(
        (d.object.as_str(), d.path.as_str(), d.desired.as_str(), d.live.as_str()),
        ("ConfigMap notes/notes", "/data/k", "\"v\"", "\"edited\"")
    );
    let shop = app(&c, "shop").unwrap();
    assert_eq!((shop.ready, shop.objects, shop.drifted, shop.missing), (2, 2, 0, 0), "{shop:?}");
    let agent_log = std::fs::read_to_string(tmp.join("agent-eu-1-as-eu-1.log")).unwrap_or_default();
    assert!(agent_log.contains("enforcing the state kept in the cluster"), "{agent_log}");

    // The CLI shows the same.
    let out = Command::new(binary("flotilla"))
        .args(["cluster", "eu-1", "--hub", &format!("https://localhost:{port}"), "--operator", "alice", "--certs"])
        .arg(&certs)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("notes: drifted: ConfigMap notes/notes /data/k: desired \"v\" live \"edited\""), "{text}");
}
