//! Hub replicas on a real etcd, with real processes: two hubs on one etcd (one leads, one stands by), an agent
//! that knows both. The leader is killed: the standby leads within the lease, restores the fleet's state from
//! etcd, the agent moves to it and re-applies nothing, and the next commit reaches the cluster.

use flotilla_e2e::{binary, commit, eventually, free_port, issue_certs, kube, operator_client, spawn, Proc};
use flotilla_proto::platform::v1::ListClustersRequest;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

fn hub(tmp: &Path, name: &str, port: u16, repo: &str, etcd: &str) -> Proc {
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--repo",
        repo,
        "--data-dir",
        &tmp.join(format!("hub-{name}")).display().to_string(),
        "--certs",
        &tmp.join("certs").display().to_string(),
        "--poll-seconds",
        "1",
        "--store",
        etcd,
        "--etcd-prefix",
        "/flotilla/replicas-test",
        "--replica",
        name,
        "--lease-seconds",
        "3",
        "--restart-grace-seconds",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    spawn("flotilla-hub", &args, &tmp.join(format!("hub-{name}.log")))
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// `flotilla hubs -o json` against the hub on `port`.
fn hubs(tmp: &Path, port: u16) -> serde_json::Value {
    let out = std::process::Command::new(binary("flotilla"))
        .args(["hubs", "--hub", &format!("https://localhost:{port}"), "--operator", "alice", "--certs"])
        .arg(tmp.join("certs"))
        .args(["-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn state_of(v: &serde_json::Value, name: &str) -> Option<(String, u64)> {
    v["hubs"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)
        .map(|h| (h["state"].as_str().unwrap_or_default().to_string(), h["sessions"].as_u64().unwrap_or(0)))
}

/// A fleet of one cluster `c` and one app `notes` (a ConfigMap `note`, v: 1).
fn notes_repo(tmp: &Path) -> std::path::PathBuf {
    let first = note("1");
    flotilla_e2e::fleet_repo_with(
        tmp,
        &[
            ("clusters/c.yaml", Some("labels: {}\n")),
            ("apps/notes/app.yaml", Some("namespace: notes\ntargets: [{selector: {}}]\n")),
            ("apps/notes/cm.yaml", Some(&first)),
        ],
    )
}

fn note(v: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: note}}\ndata: {{v: '{v}'}}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_dies_and_a_standby_serves_the_fleet_within_seconds() {
    flotilla_common::install_crypto_provider();
    assert!(binary("flotilla-hub").exists());
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    eprintln!("work directory (logs): {}", tmp.display());
    let etcd = flotilla_e2e::etcd::Etcd::start();
    issue_certs(tmp, "c", "alice");
    let repo = notes_repo(tmp);
    let url = format!("file://{}", repo.display());
    let _sim = flotilla_e2e::start_sim(tmp, "c");

    let (pa, pb) = (free_port(), free_port());
    let mut a = hub(tmp, "a", pa, &url, &etcd.url());
    eventually(30, "hub a leads and listens", || async { listening(pa).then_some(()) }).await;
    let _b = hub(tmp, "b", pb, &url, &etcd.url());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!listening(pb), "the standby serves nothing while a leads");
    let log_b = std::fs::read_to_string(tmp.join("hub-b.log")).unwrap_or_default();
    assert!(log_b.contains("standby: another replica leads"), "{log_b}");

    let certs = tmp.join("certs");
    let both = format!("https://localhost:{pa},https://localhost:{pb}");
    let _agent = flotilla_e2e::start_agent_with(tmp, &both, "c", "c", &[], "");
    let client = kube(&tmp.join("kc"), "c").await;
    eventually(60, "the first commit applied through hub a", || async {
        (flotilla_e2e::value(&client, "notes", "note", "v").await.as_deref() == Some("1")).then_some(())
    })
    .await;
    let seen = eventually(20, "flotilla hubs shows a leading with the session, b standing by", || async {
        let v = hubs(tmp, pa);
        (state_of(&v, "a") == Some(("leading".into(), 1)) && state_of(&v, "b").is_some_and(|(s, _)| s == "standby"))
            .then_some(v)
    })
    .await;
    assert_eq!(seen["store"], "etcd");
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> = kube::Api::namespaced(client.clone(), "notes");
    let rv_before = api.get("note").await.unwrap().metadata.resource_version;

    // The leader dies without a word (its lease runs out on its own).
    let killed = Instant::now();
    a.kill();
    eventually(30, "hub b leads and listens", || async { listening(pb).then_some(()) }).await;
    let took_over = killed.elapsed();
    let mut operator = operator_client(&certs, pb).await;
    let view = eventually(30, "hub b shows the fleet as it was", || {
        let mut operator = operator.clone();
        async move {
            let v = operator.list_clusters(ListClustersRequest::default()).await.ok()?.into_inner();
            let c = v.clusters.iter().find(|c| c.name == "c")?;
            c.connected.then_some(v)
        }
    })
    .await;
    let reconnected = killed.elapsed();
    assert!(!view.revision.is_empty(), "the revision restored from etcd");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(api.get("note").await.unwrap().metadata.resource_version, rv_before, "nothing re-applied");

    // The next commit reaches the cluster through hub b.
    commit(&repo, &[("apps/notes/cm.yaml", Some(&note("2")))], "second");
    eventually(60, "the second commit applied through hub b", || async {
        (flotilla_e2e::value(&client, "notes", "note", "v").await.as_deref() == Some("2")).then_some(())
    })
    .await;
    let applied = killed.elapsed();
    eprintln!(
        "fail-over: b led and listened {:.1} s after a was killed, the agent was connected to b after {:.1} s, \
         the next commit was applied {:.1} s after the kill (lease 3 s)",
        took_over.as_secs_f64(),
        reconnected.as_secs_f64(),
        applied.as_secs_f64()
    );
    let _ = operator.list_clusters(ListClustersRequest::default()).await.expect("b answers operators");
    assert!(took_over < Duration::from_secs(10), "{took_over:?}");
    eventually(20, "flotilla hubs shows b leading with the session, a gone", || async {
        let v = hubs(tmp, pb);
        (state_of(&v, "b") == Some(("leading".into(), 1)) && state_of(&v, "a").is_none()).then_some(())
    })
    .await;
    let agent_log = std::fs::read_to_string(tmp.join("agent-c-as-c.log")).unwrap_or_default();
    assert!(agent_log.contains("a new leading hub"), "the agent saw the new leader's higher epoch: {agent_log}");
}

/// `kill -SIG pid`.
fn signal(p: &Proc, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &p.child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_is_deposed_and_stops_when_it_wakes() {
    flotilla_common::install_crypto_provider();
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    eprintln!("work directory (logs): {}", tmp.display());
    let etcd = flotilla_e2e::etcd::Etcd::start();
    issue_certs(tmp, "c", "alice");
    let repo = flotilla_e2e::fleet_repo_with(tmp, &[("clusters/c.yaml", Some("labels: {}\n"))]);
    let url = format!("file://{}", repo.display());
    let (pa, pb) = (free_port(), free_port());
    let mut a = hub(tmp, "a", pa, &url, &etcd.url());
    eventually(30, "hub a leads", || async { listening(pa).then_some(()) }).await;
    let b = hub(tmp, "b", pb, &url, &etcd.url());
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A pause longer than the lease (a stalled VM, a stop-the-world pause): b leads meanwhile.
    signal(&a, "-STOP");
    eventually(30, "hub b leads while a is paused", || async { listening(pb).then_some(()) }).await;
    signal(&a, "-CONT");
    // a wakes up, finds it no longer holds the lease, and stops acting: the process ends.
    let woke = Instant::now();
    let status = eventually(20, "hub a stops", || {
        let done = a.child.try_wait().ok().flatten();
        async move { done }
    })
    .await;
    assert!(!status.success(), "a deposed leader exits with an error: {status:?}");
    let log = std::fs::read_to_string(tmp.join("hub-a.log")).unwrap_or_default();
    assert!(log.contains("lost the leadership lease"), "{log}");
    eprintln!("the deposed leader stopped {:.1} s after it woke", woke.elapsed().as_secs_f64());
    let mut operator = operator_client(&tmp.join("certs"), pb).await;
    operator.list_clusters(ListClustersRequest::default()).await.expect("b serves");
    a.kill();

    // A leader stopped gracefully gives its lease back: a standby leads at once, well inside the lease.
    let pc = free_port();
    let _c = hub(tmp, "c", pc, &url, &etcd.url());
    eventually(20, "hub c stands by", || async {
        std::fs::read_to_string(tmp.join("hub-c.log")).unwrap_or_default().contains("standby").then_some(())
    })
    .await;
    let stopped = Instant::now();
    signal(&b, "-TERM");
    eventually(10, "hub c leads", || async { listening(pc).then_some(()) }).await;
    let handed_over = stopped.elapsed();
    eprintln!("a graceful stop handed over in {:.1} s (lease 3 s)", handed_over.as_secs_f64());
    assert!(handed_over < Duration::from_millis(2500), "{handed_over:?}");
}

fn agent(tmp: &Path, name: &str, hub_port: u16) -> Proc {
    let hub = format!("https://localhost:{hub_port}");
    flotilla_e2e::start_agent_with(
        tmp,
        &hub,
        "c",
        "c",
        &["--replica", name, "--lease-seconds", "3"],
        &format!("-{name}"),
    )
}

fn log(tmp: &Path, name: &str) -> String {
    std::fs::read_to_string(tmp.join(format!("agent-c-as-c-{name}.log"))).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_of_one_cluster_one_active_and_a_standby_takes_over_without_reapplying() {
    flotilla_common::install_crypto_provider();
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    eprintln!("work directory (logs): {}", tmp.display());
    issue_certs(tmp, "c", "alice");
    let repo = notes_repo(tmp);
    let _sim = flotilla_e2e::start_sim(tmp, "c");
    let port = free_port();
    let _hub = flotilla_e2e::start_hub(tmp, port, &format!("file://{}", repo.display()));
    let mut agents = vec![agent(tmp, "agent-a", port)];
    tokio::time::sleep(Duration::from_millis(500)).await;
    agents.push(agent(tmp, "agent-b", port));
    let client = kube(&tmp.join("kc"), "c").await;
    eventually(60, "applied by the active agent", || async {
        (flotilla_e2e::value(&client, "notes", "note", "v").await.as_deref() == Some("1")).then_some(())
    })
    .await;
    let (active, standby) = eventually(20, "one active agent and one standby", || async {
        let (a, b) = (log(tmp, "agent-a"), log(tmp, "agent-b"));
        let is_active = |l: &str| l.contains("this agent is the active one");
        let is_standby = |l: &str| l.contains("standby: another agent of this cluster is active");
        match (is_active(&a), is_active(&b)) {
            (true, false) if is_standby(&b) => Some((0, 1)),
            (false, true) if is_standby(&a) => Some((1, 0)),
            _ => None,
        }
    })
    .await;
    let names = ["agent-a", "agent-b"];
    let mut operator = operator_client(&tmp.join("certs"), port).await;
    let view = operator.list_clusters(ListClustersRequest::default()).await.unwrap().into_inner();
    assert!(view.clusters[0].connected, "one session, the active agent's");
    assert!(!log(tmp, names[standby]).contains("connected to the hub"), "the standby holds no hub session");
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> = kube::Api::namespaced(client.clone(), "notes");
    let rv_before = api.get("note").await.unwrap().metadata.resource_version;

    // The active agent's pod dies.
    let killed = Instant::now();
    agents[active].kill();
    eventually(30, "the standby takes over", || async {
        log(tmp, names[standby]).contains("this agent is the active one").then_some(())
    })
    .await;
    let took_over = killed.elapsed();
    eventually(30, "the new active agent connects to the hub", || async {
        log(tmp, names[standby]).contains("connected to the hub").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(api.get("note").await.unwrap().metadata.resource_version, rv_before, "nothing re-applied");
    commit(&repo, &[("apps/notes/cm.yaml", Some(&note("2")))], "second");
    eventually(60, "the next commit applied by the new active agent", || async {
        (flotilla_e2e::value(&client, "notes", "note", "v").await.as_deref() == Some("2")).then_some(())
    })
    .await;
    eprintln!(
        "agent fail-over: the standby was active {:.1} s after the active agent was killed (lease 3 s); the next \
         commit was applied {:.1} s after the kill",
        took_over.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
}
