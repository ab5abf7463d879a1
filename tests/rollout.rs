//! Staged rollouts end to end: a fleet repository served by `git daemon`, the hub and a simulator with 200
//! clusters as processes, and 200 agents (in this process: 200 agent processes would swamp two cores; the
//! agent is the same library code the binary runs). Five waves complete in order; a failure rule on wave 3
//! halts a rollout there and waves 4 and 5 never see it; the hub killed (kill -9) mid-rollout resumes where it
//! was; pause, resume, approve, abort and rollback through the CLI; explain says why a cluster waits.

use flotilla_agent::apply::Applier;
use flotilla_agent::session::AgentConfig;
use flotilla_e2e::{
    admin_patch, binary, commit, eventually, free_port, git_daemon, operator_client, spawn, start_hub, Proc,
};
use flotilla_proto::platform::v1::{ListRolloutsRequest, Rollout};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const N: usize = 200;

fn ring(i: usize) -> usize {
    // 2, 18, 40, 60, 80 clusters in rings 1..5.
    match i {
        1..=2 => 1,
        3..=20 => 2,
        21..=60 => 3,
        61..=120 => 4,
        _ => 5,
    }
}

fn name(i: usize) -> String {
    format!("c-{i:03}")
}

fn web(image: &str) -> String {
    format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: web, image: '{image}'}}]}}\n")
}

const WAVES: &str = "waves:\n- {name: canary, selector: {matchLabels: {ring: '1'}}, progressDeadlineSeconds: 20}\n- {name: early, selector: {matchLabels: {ring: '2'}}, progressDeadlineSeconds: 20}\n- {name: middle, selector: {matchLabels: {ring: '3'}}, progressDeadlineSeconds: 8}\n- {name: late, selector: {matchLabels: {ring: '4'}}, progressDeadlineSeconds: 20}\n- {name: last, selector: {matchLabels: {ring: '5'}}, progressDeadlineSeconds: 20}\n";

async fn rollout(certs: &Path, port: u16, app: &str) -> Option<Rollout> {
    let mut c = operator_client(certs, port).await;
    c.list_rollouts(ListRolloutsRequest { app: app.into() }).await.ok()?.into_inner().rollouts.into_iter().next()
}

fn cli(tmp: &Path, port: u16, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(binary("flotilla"))
        .args(args)
        .args(["--hub", &format!("https://localhost:{port}"), "--operator", "alice", "--certs"])
        .arg(tmp.join("certs"))
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

async fn image(client: &kube::Client) -> Option<String> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), "shop");
    let d = api.get_opt("web").await.ok()??;
    d.spec?.template.spec?.containers.first()?.image.clone()
}

/// Every cluster's image of web, by ring.
async fn images(clients: &BTreeMap<String, kube::Client>) -> BTreeMap<usize, BTreeMap<Option<String>, usize>> {
    let mut out: BTreeMap<usize, BTreeMap<Option<String>, usize>> = BTreeMap::new();
    for (i, (_, c)) in clients.iter().enumerate() {
        *out.entry(ring(i + 1)).or_default().entry(image(c).await).or_default() += 1;
    }
    out
}

async fn wait_phase(certs: &Path, port: u16, app: &str, revision: &str, phase: &str, secs: u64) -> Rollout {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let r = rollout(certs, port, app).await;
        if let Some(r) = r.as_ref().filter(|r| r.revision == revision && r.phase.starts_with(phase)) {
            return r.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for {app} {phase} at {revision}; last seen: {r:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_waves_over_200_clusters_with_failure_halt_restart_and_controls() {
    flotilla_common::install_crypto_provider();
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    eprintln!("work directory (logs): {}", tmp.display());
    let names: Vec<String> = (1..=N).map(name).collect();
    flotilla_e2e::issue_certs(tmp, &names.join(","), "alice");
    let repo = flotilla_e2e::new_repo(tmp);
    let mut files: Vec<(String, String)> =
        (1..=N).map(|i| (format!("clusters/{}.yaml", name(i)), format!("labels: {{ring: '{}'}}\n", ring(i)))).collect();
    files.push(("rollout.yaml".into(), WAVES.into()));
    files.push(("apps/web/app.yaml".into(), "namespace: shop\ntargets: [{selector: {}}]\n".into()));
    files.push(("apps/web/web.yaml".into(), web("web:1")));
    // An app with its own waves: a canary, then everyone after an operator approves.
    files.push((
        "apps/gated/app.yaml".into(),
        "namespace: gated\ntargets: [{selector: {}}]\nrollout:\n  waves:\n  - {name: canary, selector: {matchLabels: {ring: '1'}}}\n  - {name: everyone, approval: true}\n".into(),
    ));
    files.push((
        "apps/gated/cm.yaml".into(),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: gated}\ndata: {v: '1'}\n".into(),
    ));
    let borrowed: Vec<(&str, Option<&str>)> = files.iter().map(|(p, c)| (p.as_str(), Some(c.as_str()))).collect();
    commit(&repo, &borrowed, "first");
    let (_daemon, git_port) = git_daemon(&tmp.join("served"));
    let url = format!("git://127.0.0.1:{git_port}/fleet.git");

    let sim_args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--clusters",
        &N.to_string(),
        "--name-prefix",
        "c-",
        "--ready-after-ms",
        "200",
        "--kubeconfig-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([tmp.join("kc").display().to_string()])
    .collect();
    let _sim = spawn("flotilla-sim", &sim_args, &tmp.join("sim.log"));
    eventually(30, "the simulator", || async { tmp.join("kc/server").exists().then_some(()) }).await;
    let server = std::fs::read_to_string(tmp.join("kc/server")).unwrap().trim().to_string();

    let port = free_port();
    let mut hub: Proc = start_hub(tmp, port, &url);
    let certs = tmp.join("certs");
    let shutdown = CancellationToken::new();
    let mut clients = BTreeMap::new();
    for n in &names {
        let kc = kube::config::Kubeconfig::read_from(tmp.join(format!("kc/{n}.kubeconfig"))).unwrap();
        let client =
            kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap())
                .unwrap();
        clients.insert(n.clone(), client.clone());
        let read = |f: String| std::fs::read_to_string(certs.join(f)).unwrap();
        let cfg = AgentConfig {
            hub: format!("https://localhost:{port}"),
            hub_name: Some("localhost".into()),
            ca_pem: read("ca.pem".into()),
            cert_pem: read(format!("clusters/{n}.pem")),
            key_pem: read(format!("clusters/{n}-key.pem")),
            in_process: None,
            credentials: None,
        };
        let engine =
            flotilla_agent::engine::start(Arc::new(Applier::new(client)), Default::default(), shutdown.clone())
                .await
                .unwrap();
        tokio::spawn(flotilla_agent::session::run(cfg, engine, shutdown.clone()));
    }

    // The first commit goes out wave by wave, in order.
    let rev1 = flotilla_e2e::git(&repo, &["rev-parse", "HEAD"]);
    let r = wait_phase(&certs, port, "web", &rev1, "complete", 180).await;
    let started: Vec<&str> = ["canary", "early", "middle", "late", "last"].to_vec();
    let order: Vec<String> = r
        .timeline
        .iter()
        .filter(|e| e.contains(" started ("))
        .map(|e| e.split(" wave ").nth(1).unwrap_or("").split(' ').next().unwrap_or("").to_string())
        .collect();
    assert_eq!(order, started, "{:#?}", r.timeline);
    let all = images(&clients).await;
    assert!(all.values().all(|m| m.keys().all(|k| k.as_deref() == Some("web:1"))), "{all:?}");

    // The gated app: the canary, then approval.
    let gated = eventually(60, "gated awaiting approval", || async {
        rollout(&certs, port, "gated").await.filter(|r| r.waves.get(1).is_some_and(|w| w.phase == "awaiting approval"))
    })
    .await;
    assert_eq!(gated.waves[0].phase, "passed");
    let (ok, text) = cli(tmp, port, &["explain", "c-100", "gated"]);
    assert!(ok && text.contains("waits: wave everyone awaits approval"), "{text}");
    let (ok, text) = cli(tmp, port, &["rollout", "status", "gated"]);
    assert!(ok && text.contains("awaits approval") && text.contains("everyone"), "{text}");
    let (ok, text) = cli(tmp, port, &["rollout", "approve", "gated", "everyone"]);
    assert!(ok, "{text}");
    wait_phase(&certs, port, "gated", &rev1, "complete", 120).await;

    // A second commit; the hub is killed mid-rollout and resumes where it was.
    commit(&repo, &[("apps/web/web.yaml", Some(&web("web:2")))], "web 2");
    let rev2 = flotilla_e2e::git(&repo, &["rev-parse", "HEAD"]);
    eventually(60, "wave early progressing", || async {
        rollout(&certs, port, "web").await.filter(|r| r.revision == rev2 && r.waves[1].phase != "pending")
    })
    .await;
    hub.kill();
    let before = images(&clients).await;
    assert!(before[&5].keys().all(|k| k.as_deref() == Some("web:1")), "the last wave has not started: {before:?}");
    hub = start_hub(tmp, port, &url);
    let resumed = rollout(&certs, port, "web").await.expect("the rollout after the restart");
    assert_eq!(resumed.revision, rev2);
    assert!(resumed.waves[0].phase == "passed", "resumed where it was: {resumed:?}");
    // Pause holds it; resume lets it go.
    let (ok, text) = cli(tmp, port, &["rollout", "pause", "web"]);
    assert!(ok, "{text}");
    let paused = rollout(&certs, port, "web").await.unwrap();
    assert_eq!(paused.phase, "paused");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = rollout(&certs, port, "web").await.unwrap();
    assert_eq!(
        still.waves.iter().map(|w| w.phase.clone()).collect::<Vec<_>>(),
        paused.waves.iter().map(|w| w.phase.clone()).collect::<Vec<_>>(),
        "nothing moves while paused"
    );
    let (ok, text) = cli(tmp, port, &["explain", "c-200", "web"]);
    assert!(ok && text.contains("the rollout of") && text.contains("is paused"), "{text}");
    let (ok, text) = cli(tmp, port, &["rollout", "resume", "web"]);
    assert!(ok, "{text}");
    wait_phase(&certs, port, "web", &rev2, "complete", 180).await;
    let all = images(&clients).await;
    assert!(all.values().all(|m| m.keys().all(|k| k.as_deref() == Some("web:2"))), "{all:?}");

    // The failure rule on wave 3 (ring 3): the rollout halts there; waves 4 and 5 never see web:3.
    for i in 21..=60 {
        admin_patch(
            &server,
            &format!("/admin/clusters/{}/behaviour", name(i)),
            r#"{"fail_images": ":3$", "progress_deadline_cap_s": 2}"#,
        );
    }
    commit(&repo, &[("apps/web/web.yaml", Some(&web("web:3")))], "web 3");
    let rev3 = flotilla_e2e::git(&repo, &["rev-parse", "HEAD"]);
    let failed = wait_phase(&certs, port, "web", &rev3, "failed", 180).await;
    assert!(failed.phase.contains("wave middle failed: c-0"), "{}", failed.phase);
    assert!(
        failed.phase.contains("ProgressDeadlineExceeded") || failed.phase.contains("not healthy"),
        "{}",
        failed.phase
    );
    let all = images(&clients).await;
    assert!(
        all[&4].keys().chain(all[&5].keys()).all(|k| k.as_deref() == Some("web:2")),
        "waves 4 and 5 never see web:3: {all:?}"
    );
    assert!(all[&1].keys().all(|k| k.as_deref() == Some("web:3")));
    let (ok, text) = cli(tmp, port, &["explain", "c-150", "web"]);
    assert!(ok && text.contains("does not get") && text.contains("wave middle failed"), "{text}");
    let (ok, text) = cli(tmp, port, &["rollout", "status", "web"]);
    assert!(ok && text.contains("failed") && text.contains("middle"), "{text}");

    // Roll back at once to web:2; a rollback to a revision never rendered is refused.
    let (ok, text) = cli(tmp, port, &["rollout", "rollback", "web", "0123456789abcdef", "--now"]);
    assert!(!ok && text.contains("was never rendered"), "{text}");
    let (ok, text) = cli(tmp, port, &["rollout", "rollback", "web", &rev2, "--now"]);
    assert!(ok, "{text}");
    eventually(60, "every cluster back on web:2", || async {
        let all = images(&clients).await;
        all.values().all(|m| m.keys().all(|k| k.as_deref() == Some("web:2"))).then_some(())
    })
    .await;

    // A new commit, aborted after its canary: it stops where it is.
    commit(&repo, &[("apps/web/web.yaml", Some(&web("web:4")))], "web 4");
    let rev4 = flotilla_e2e::git(&repo, &["rev-parse", "HEAD"]);
    eventually(60, "canary passed", || async {
        rollout(&certs, port, "web").await.filter(|r| r.revision == rev4 && r.waves[0].phase == "passed")
    })
    .await;
    let (ok, text) = cli(tmp, port, &["rollout", "abort", "web"]);
    assert!(ok, "{text}");
    let aborted = wait_phase(&certs, port, "web", &rev4, "aborted", 10).await;
    assert_eq!(aborted.phase, "aborted: by alice");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = images(&clients).await;
    assert!(all[&5].keys().all(|k| k.as_deref() == Some("web:2")), "{all:?}");

    // A newer commit mid-rollout supersedes it: clusters released keep what they got until the new rollout
    // reaches them; nobody goes backwards; everyone ends on the newest.
    commit(&repo, &[("apps/web/web.yaml", Some(&web("web:5")))], "web 5");
    let rev5 = flotilla_e2e::git(&repo, &["rev-parse", "HEAD"]);
    eventually(60, "web:5 past its canary", || async {
        rollout(&certs, port, "web").await.filter(|r| r.revision == rev5 && r.waves[0].phase == "passed")
    })
    .await;
    commit(&repo, &[("apps/web/web.yaml", Some(&web("web:6")))], "web 6");
    let rev6 = flotilla_e2e::git(&repo, &["rev-parse", "HEAD"]);
    let done = wait_phase(&certs, port, "web", &rev6, "complete", 180).await;
    assert!(
        done.timeline.iter().any(|e| e.contains(&format!("superseded by {}", &rev6[..12]))),
        "{:#?}",
        done.timeline
    );
    let all = images(&clients).await;
    assert!(all.values().all(|m| m.keys().all(|k| k.as_deref() == Some("web:6"))), "{all:?}");
    shutdown.cancel();
    drop(hub);
}

/// `flotilla rehearse` on a real repository: the change from one revision to the next, over simulated
/// clusters that take the inventory's labels, with its timeline and a failure rule.
#[test]
fn the_rehearsal_prints_the_timeline_of_a_change() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("fleet");
    std::fs::create_dir_all(&repo).unwrap();
    flotilla_e2e::git(&repo, &["init", "-q", "-b", "main"]);
    commit(
        &repo,
        &[
            ("clusters/eu-1.yaml", Some("labels: {region: eu, tier: staging}\n")),
            ("clusters/eu-2.yaml", Some("labels: {region: eu, tier: prod}\n")),
            ("clusters/us-1.yaml", Some("labels: {region: us, tier: prod}\n")),
            ("rollout.yaml", Some("waves:\n- {name: staging, selector: {matchLabels: {tier: staging}}, progressDeadlineSeconds: 30}\n- {name: eu, selector: {matchLabels: {region: eu}}, progressDeadlineSeconds: 30}\n")),
            ("apps/web/app.yaml", Some("namespace: web\ntargets: [{selector: {}}]\n")),
            ("apps/web/web.yaml", Some(&web("web:1"))),
        ],
        "one",
    );
    commit(&repo, &[("apps/web/web.yaml", Some(&web("web:2")))], "two");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(binary("flotilla"))
            .args(["rehearse", "--repo"])
            .arg(&repo)
            .args(["--clusters", "12", "--from", "HEAD~1", "--to", "HEAD", "--timeout-seconds", "120"])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = run(&[]);
    assert!(ok, "{out}\n{err}");
    let waves: Vec<&str> = out.lines().filter(|l| l.contains(" started (")).collect();
    assert_eq!(waves.len(), 3, "{out}");
    assert!(
        waves[0].contains("wave staging started (4 clusters)")
            && waves[1].contains("wave eu started (4 clusters)")
            && waves[2].contains("wave rest started (4 clusters)"),
        "{out}"
    );
    assert!(out.contains("web: complete"), "{out}");
    // Over TCP, more clusters than the open-file limit allows are refused at once, saying how many fit.
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg("ulimit -n 1500 && exec \"$0\" rehearse --repo \"$1\" --clusters 500 --transport tcp --to HEAD")
        .arg(binary("flotilla"))
        .arg(&repo)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("500 clusters need about 2512 open files") && err.contains("at most 247 clusters fit"),
        "{err}"
    );
    // The same rehearsal with agents on in-memory pipes (how thousands of clusters fit one process).
    let (ok, out, err) = run(&["--transport", "memory"]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(out.lines().filter(|l| l.contains(" started (")).count(), 3, "{out}");
    assert!(out.contains("web: complete"), "{out}");
    // With web:2 failing everywhere, the rehearsal shows where it would stop.
    let (ok, out, err) = run(&["--fail-images", ":2$"]);
    assert!(ok, "{out}\n{err}");
    // Every staging cluster fails; whichever reports first is named.
    assert!(out.contains("web: failed: wave staging failed: sim-"), "{out}");
    assert!(!out.contains("wave eu started"), "{out}");
}
