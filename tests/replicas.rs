//! Hub replicas on real etcd, with real processes: a three-member etcd cluster on loopback, three hubs, the
//! simulator and real agents that know every hub. Every replica serves agents and operators; one leads. The
//! leader is killed ten times in a row in the middle of a rollout; etcd members stop; a leader is frozen past
//! its lease; controls and webhooks sent to standbys take effect.

use flotilla_e2e::{binary, commit, eventually, free_port, http_get, issue_certs, kube, operator_client, spawn, Proc};
use flotilla_proto::platform::v1::control_rollout_request::Action;
use flotilla_proto::platform::v1::{ControlRolloutRequest, ListAuditRequest, ListClustersRequest, ListRolloutsRequest};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PREFIX: &str = "/flotilla/replicas-test";

/// One hub replica process: its name, ports and the log of its current incarnation.
struct Hub {
    name: String,
    port: u16,
    webhook: u16,
    health: u16,
    proc: Option<Proc>,
    log: PathBuf,
    runs: u32,
}

impl Hub {
    fn start(tmp: &Path, name: &str, repo: &str, etcd: &str) -> Hub {
        Self::start_with(tmp, name, repo, etcd, &[])
    }

    fn start_with(tmp: &Path, name: &str, repo: &str, etcd: &str, extra: &[&str]) -> Hub {
        let mut h = Hub {
            name: name.into(),
            port: free_port(),
            webhook: free_port(),
            health: free_port(),
            proc: None,
            log: PathBuf::new(),
            runs: 0,
        };
        h.run(tmp, repo, etcd, extra);
        h
    }

    fn run(&mut self, tmp: &Path, repo: &str, etcd: &str, extra: &[&str]) {
        self.runs += 1;
        self.log = tmp.join(format!("hub-{}-{}.log", self.name, self.runs));
        let mut args: Vec<String> = [
            "--listen",
            &format!("127.0.0.1:{}", self.port),
            "--webhook-listen",
            &format!("127.0.0.1:{}", self.webhook),
            "--metrics-listen",
            &format!("127.0.0.1:{}", self.health),
            "--repo",
            repo,
            "--data-dir",
            &tmp.join(format!("hub-{}", self.name)).display().to_string(),
            "--certs",
            &tmp.join("certs").display().to_string(),
            "--store",
            etcd,
            "--etcd-prefix",
            PREFIX,
            "--replica",
            &self.name,
            "--lease-seconds",
            "3",
            "--restart-grace-seconds",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !extra.contains(&"--poll-seconds") {
            args.extend(["--poll-seconds".to_string(), "3600".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        self.proc = Some(spawn("flotilla-hub", &args, &self.log));
        flotilla_e2e::wait_for_port(self.port, "flotilla-hub");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How often this incarnation has won the election.
    fn leads(&self) -> usize {
        self.log_text().matches("this replica leads: it follows Git").count()
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// `GET /readyz`: the status code and the text.
    fn ready(&self) -> (u16, String) {
        http_get(self.health, "/readyz")
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
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

fn state_of(v: &serde_json::Value, name: &str) -> Option<String> {
    v["hubs"].as_array()?.iter().find(|h| h["name"] == name).map(|h| h["state"].as_str().unwrap_or_default().into())
}

/// The replica that leads, as the hub on `port` sees it.
fn leader_seen(tmp: &Path, port: u16) -> Option<String> {
    let v = hubs(tmp, port);
    v["hubs"].as_array()?.iter().find(|h| h["leader"] == true).and_then(|h| h["name"].as_str().map(String::from))
}

fn note(v: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: note}}\ndata: {{v: '{v}'}}\n")
}

/// Three clusters in three rings; the app `notes` rolls out ring by ring, the second wave after an approval.
/// A fleet of one cluster `c` and one app `notes` (a ConfigMap `note`, v: 1).
fn notes_repo(tmp: &Path) -> PathBuf {
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

fn ringed_repo(tmp: &Path) -> PathBuf {
    let app = "namespace: notes\ntargets: [{selector: {}}]\nrollout:\n  waves:\n  - {name: one, selector: {matchLabels: {ring: '1'}}}\n  - {name: two, selector: {matchLabels: {ring: '2'}}, approval: true}\n  - {name: three, selector: {matchLabels: {ring: '3'}}}\n";
    let first = note("1");
    flotilla_e2e::fleet_repo_with(
        tmp,
        &[
            ("clusters/c1.yaml", Some("labels: {ring: '1'}\n")),
            ("clusters/c2.yaml", Some("labels: {ring: '2'}\n")),
            ("clusters/c3.yaml", Some("labels: {ring: '3'}\n")),
            ("apps/notes/app.yaml", Some(app)),
            ("apps/notes/cm.yaml", Some(&first)),
        ],
    )
}

/// POSTs a GitHub push event for main to a webhook; returns the HTTP status.
fn push_event(port: u16) -> u16 {
    let body = r#"{"ref": "refs/heads/main", "after": "0000000000000000000000000000000000000000"}"#;
    let req = format!(
        "POST /hooks/git HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-GitHub-Event: push\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("webhook port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

async fn approve(certs: &Path, port: u16, wave: &str) -> Result<String, tonic::Status> {
    let mut op = operator_client(certs, port).await;
    let req = ControlRolloutRequest {
        app: "notes".into(),
        action: Action::Approve as i32,
        wave: wave.into(),
        ..Default::default()
    };
    op.control_rollout(req).await.map(|r| r.into_inner().message)
}

/// The note's value on every cluster (None: not there yet).
async fn versions(clients: &[kube::Client]) -> Vec<Option<u32>> {
    let mut out = Vec::new();
    for c in clients {
        out.push(flotilla_e2e::value(c, "notes", "note", "v").await.and_then(|v| v.parse().ok()));
    }
    out
}

async fn wave_phase(certs: &Path, port: u16, revision: &str, wave: usize) -> Option<String> {
    let mut op = operator_client(certs, port).await;
    let r = op.list_rollouts(ListRolloutsRequest { app: "notes".into() }).await.ok()?.into_inner();
    let ro = r.rollouts.into_iter().next().filter(|r| r.revision == revision)?;
    ro.waves.get(wave).map(|w| w.phase.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hubs_on_three_etcd_members_survive_ten_leader_kills_mid_rollout() {
    flotilla_common::install_crypto_provider();
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    eprintln!("work directory (logs): {}", tmp.display());
    let etcd = flotilla_e2e::etcd::EtcdCluster::start(3);
    issue_certs(tmp, "c1,c2,c3", "alice");
    let certs = tmp.join("certs");
    let repo = ringed_repo(tmp);
    let url = format!("file://{}", repo.display());
    let _sim = flotilla_e2e::start_sim(tmp, "c1,c2,c3");
    let mut hubs_ = [
        Hub::start(tmp, "a", &url, &etcd.url()),
        Hub::start(tmp, "b", &url, &etcd.url()),
        Hub::start(tmp, "c", &url, &etcd.url()),
    ];
    let all: Vec<String> = hubs_.iter().map(Hub::url).collect();
    let _agents: Vec<Proc> =
        ["c1", "c2", "c3"].iter().map(|c| flotilla_e2e::start_agent_with(tmp, &all.join(","), c, c, &[], "")).collect();
    let mut clients = Vec::new();
    for c in ["c1", "c2", "c3"] {
        clients.push(kube(&tmp.join("kc"), c).await);
    }
    let leader = eventually(30, "one replica leads", || async {
        let l: Vec<usize> = (0..3).filter(|i| hubs_[*i].leads() > 0).collect();
        (l.len() == 1).then(|| l[0])
    })
    .await;
    let standby = (leader + 1) % 3;
    eventually(60, "the first wave has the first commit", || async {
        (versions(&clients).await == vec![Some(1), None, None]).then_some(())
    })
    .await;
    // Every replica serves operators: a standby shows the fleet as the leader wrote it.
    let mut op = operator_client(&certs, hubs_[standby].port).await;
    let view = op.list_clusters(ListClustersRequest::default()).await.unwrap().into_inner();
    assert_eq!(view.clusters.len(), 3, "{view:?}");
    assert!(view.clusters.iter().all(|c| c.connected), "every agent is connected somewhere: {view:?}");
    let rev1 = view.revision.clone();
    assert!(!rev1.is_empty());
    // A standby records its own refusals in etcd, where every replica reads them.
    let mut spy = flotilla_e2e::platform_client_as(&certs, hubs_[standby].port, "clusters/c1").await;
    let e = spy.list_clusters(ListClustersRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let at_leader = operator_client(&certs, hubs_[leader].port).await;
    let standby_name = hubs_[standby].name.clone();
    eventually(20, "the standby's refusal in the leader's audit", || {
        let mut c = at_leader.clone();
        let name = standby_name.clone();
        async move {
            let records = c.list_audit(ListAuditRequest::default()).await.ok()?.into_inner().records;
            records.iter().any(|r| r.who == "cluster c1" && !r.allowed && r.replica == name).then_some(())
        }
    })
    .await;

    // A control sent to a standby takes effect: it is forwarded to the leader.
    eventually(30, "wave two awaits approval", || async {
        (wave_phase(&certs, hubs_[standby].port, &rev1, 1).await.as_deref() == Some("awaiting approval")).then_some(())
    })
    .await;
    let answer = approve(&certs, hubs_[standby].port, "two").await.expect("approved through a standby");
    eprintln!("approval through standby {}: {answer}", hubs_[standby].name);
    eventually(60, "every cluster has the first commit", || async {
        (versions(&clients).await == vec![Some(1), Some(1), Some(1)]).then_some(())
    })
    .await;

    // A webhook sent to a standby takes effect: the leader fetches (no replica polls in this test).
    let rev2 = commit(&repo, &[("apps/notes/cm.yaml", Some(&note("2")))], "second");
    assert_eq!(push_event(hubs_[standby].webhook), 202, "the standby's webhook accepts the event");
    eventually(60, "the second commit reaches the first wave", || async {
        (versions(&clients).await == vec![Some(2), Some(1), Some(1)]).then_some(())
    })
    .await;
    let leader_log = hubs_[leader].log_text();
    assert!(
        leader_log.lines().any(|l| l.contains("refresh requested") && l.contains("operator=webhook")),
        "the leader fetched because the standby asked it to: {leader_log}"
    );

    // Ten times: kill -9 the leader; a standby leads within about the lease; the killed one comes back.
    let mut last = versions(&clients).await;
    let mut takeovers = Vec::new();
    let mut current = leader;
    let mut approved_at = None;
    for round in 0..10 {
        let before: Vec<usize> = hubs_.iter().map(Hub::leads).collect();
        let killed = Instant::now();
        hubs_[current].kill();
        let next = eventually(30, "a new leader", || async {
            (0..3).find(|i| *i != current && hubs_[*i].leads() > before[*i])
        })
        .await;
        takeovers.push(killed.elapsed());
        // The new leader's view: every agent connected again (those on the killed replica moved).
        let port = hubs_[next].port;
        eventually(30, "every agent connected again", || async {
            let mut op = operator_client(&certs, port).await;
            let v = op.list_clusters(ListClustersRequest::default()).await.ok()?.into_inner();
            (v.clusters.len() == 3 && v.clusters.iter().all(|c| c.connected)).then_some(())
        })
        .await;
        // No cluster moves backwards, ever.
        let now = versions(&clients).await;
        for (i, (b, a)) in last.iter().zip(&now).enumerate() {
            assert!(a >= b, "round {round}: c{} moved from {b:?} to {a:?}", i + 1);
        }
        last = now;
        // Halfway, the approval of the second commit's wave two, through a standby.
        if round == 3 {
            let s = 3 - current - next; // the standby that was not killed
            eventually(30, "wave two of the second commit awaits approval", || async {
                (wave_phase(&certs, port, &rev2, 1).await.as_deref() == Some("awaiting approval")).then_some(())
            })
            .await;
            let answer = approve(&certs, hubs_[s].port, "two").await.expect("approved through a standby");
            eprintln!("round {round}: approved through standby {}: {answer}", hubs_[s].name);
            approved_at = Some(round);
        }
        let t = takeovers.last().unwrap();
        eprintln!(
            "round {round}: {} killed, {} leads after {:.1} s",
            hubs_[current].name,
            hubs_[next].name,
            t.as_secs_f64()
        );
        hubs_[current].run(tmp, &url, &etcd.url(), &[]);
        current = next;
    }
    assert_eq!(approved_at, Some(3));
    // The approval was not lost: the rollout finishes without another one.
    eventually(90, "every cluster has the second commit", || async {
        (versions(&clients).await == vec![Some(2), Some(2), Some(2)]).then_some(())
    })
    .await;
    let mut sorted = takeovers.clone();
    sorted.sort();
    eprintln!(
        "ten leader kills (lease 3 s): a new leader after {:.1}–{:.1} s (median {:.1} s)",
        sorted[0].as_secs_f64(),
        sorted[9].as_secs_f64(),
        sorted[5].as_secs_f64()
    );
    assert!(sorted[9] < Duration::from_secs(10), "{sorted:?}");
    // The replica killed last registers again once it has started (it may still be loading the state).
    let (v, lags) = eventually(30, "three replicas registered", || async {
        let v = hubs(tmp, hubs_[current].port);
        let lags: BTreeMap<String, i64> = v["hubs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h["name"].as_str().unwrap().to_string(), h["lagRevisions"].as_i64().unwrap_or(-1)))
            .collect();
        (lags.len() == 3).then_some((v, lags))
    })
    .await;
    assert!(lags.values().all(|l| *l >= 0), "every replica says how far behind etcd it is: {v}");
}

/// A hub started while etcd has no leader yet (members still starting, electing) waits for it instead of
/// exiting, and serves once etcd answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_started_before_etcd_has_quorum_waits_for_it_then_serves() {
    flotilla_common::install_crypto_provider();
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    eprintln!("work directory (logs): {}", tmp.display());
    let mut etcd = flotilla_e2e::etcd::EtcdCluster::start(3);
    etcd.stop(1);
    etcd.stop(2);
    issue_certs(tmp, "c", "alice");
    let repo = notes_repo(tmp);
    let url = format!("file://{}", repo.display());
    let _sim = flotilla_e2e::start_sim(tmp, "c");
    let mut a = Hub::start_with(tmp, "a", &url, &etcd.url(), &["--poll-seconds", "1"]);
    eventually(30, "the hub says it waits for etcd", || async {
        a.log_text().contains("etcd does not answer yet").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let exited = a.proc.as_mut().and_then(|p| p.child.try_wait().ok().flatten());
    assert!(exited.is_none(), "the hub waits for etcd instead of exiting: {exited:?}\n{}", a.log_text());
    etcd.resume(1);
    etcd.resume(2);
    let _agent = flotilla_e2e::start_agent_with(tmp, &a.url(), "c", "c", &[], "");
    let client = kube(&tmp.join("kc"), "c").await;
    eventually(90, "the first commit applied once etcd answers", || async {
        (flotilla_e2e::value(&client, "notes", "note", "v").await.as_deref() == Some("1")).then_some(())
    })
    .await;
    a.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_losing_a_member_is_no_outage_losing_two_stops_the_hubs_until_quorum_returns() {
    flotilla_common::install_crypto_provider();
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    eprintln!("work directory (logs): {}", tmp.display());
    let mut etcd = flotilla_e2e::etcd::EtcdCluster::start(3);
    issue_certs(tmp, "c", "alice");
    let repo = notes_repo(tmp);
    let url = format!("file://{}", repo.display());
    let _sim = flotilla_e2e::start_sim(tmp, "c");
    let poll = ["--poll-seconds", "1"];
    let mut a = Hub::start_with(tmp, "a", &url, &etcd.url(), &poll);
    let mut b = Hub::start_with(tmp, "b", &url, &etcd.url(), &poll);
    let _agent = flotilla_e2e::start_agent_with(tmp, &format!("{},{}", a.url(), b.url()), "c", "c", &[], "");
    let client = kube(&tmp.join("kc"), "c").await;
    let v = |want: &'static str| {
        let client = client.clone();
        async move { (flotilla_e2e::value(&client, "notes", "note", "v").await.as_deref() == Some(want)).then_some(()) }
    };
    eventually(60, "the first commit applied", || v("1")).await;

    // One member of three down: the hubs go on.
    etcd.stop(0);
    commit(&repo, &[("apps/notes/cm.yaml", Some(&note("2")))], "second");
    eventually(60, "the second commit applied with one etcd member down", || v("2")).await;

    eventually(20, "hub a ready with one etcd member down", || async { (a.ready().0 == 200).then_some(()) }).await;
    // Two down: no quorum. The hubs write nothing (the leader's lease cannot be renewed) and say so.
    let downs = || (a.log_text() + &b.log_text()).matches("stopped acting and stands by").count();
    let before = downs();
    eprintln!("with one etcd member of three down, the leader stood down {before} time(s)");
    etcd.stop(1);
    let lost = Instant::now();
    commit(&repo, &[("apps/notes/cm.yaml", Some(&note("3")))], "third");
    eventually(30, "the leader says it stopped acting", || async { (downs() > before).then_some(()) }).await;
    eprintln!(
        "without quorum, the leader stood down {:.1} s after the second member stopped",
        lost.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (code, why) = a.ready();
    assert_eq!(code, 503, "without quorum a replica is not ready: {why}");
    eprintln!("without quorum: /readyz {code} {}", why.trim());
    assert_eq!(
        flotilla_e2e::value(&client, "notes", "note", "v").await.as_deref(),
        Some("2"),
        "nothing of the third commit reaches the cluster without quorum"
    );

    // Quorum returns: a replica leads again and the third commit is applied.
    let back = Instant::now();
    etcd.resume(1);
    // On a timeout, what the replicas and the agent said (the work directory is gone after the test).
    let end = Instant::now() + Duration::from_secs(90);
    while v("3").await.is_none() {
        if Instant::now() > end {
            let tail = |t: String| {
                t.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            };
            let agent = std::fs::read_to_string(tmp.join("agent-c-as-c.log")).unwrap_or_default();
            panic!(
                "timed out after 90s waiting for the third commit after quorum returned\n-- hub a:\n{}\n-- hub b:\n{}\n-- agent:\n{}",
                tail(a.log_text()),
                tail(b.log_text()),
                tail(agent)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the third commit was applied {:.1} s after quorum returned", back.elapsed().as_secs_f64());
    assert!(a.proc.as_mut().unwrap().child.try_wait().unwrap().is_none(), "hub a kept running throughout");
    assert!(b.proc.as_mut().unwrap().child.try_wait().unwrap().is_none(), "hub b kept running throughout");
}

/// `kill -SIG pid`.
fn signal(p: &Proc, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &p.child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_steps_down_when_it_wakes() {
    flotilla_common::install_crypto_provider();
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    eprintln!("work directory (logs): {}", tmp.display());
    let etcd = flotilla_e2e::etcd::Etcd::start();
    issue_certs(tmp, "c", "alice");
    let repo = notes_repo(tmp);
    let url = format!("file://{}", repo.display());
    let _sim = flotilla_e2e::start_sim(tmp, "c");
    let a = Hub::start(tmp, "a", &url, &etcd.url());
    eventually(30, "hub a leads", || async { (a.leads() > 0).then_some(()) }).await;
    // The agent knows only a: what it reports, a holds (soft state, not yet in etcd).
    let _agent = flotilla_e2e::start_agent_with(tmp, &a.url(), "c", "c", &[], "");
    let in_sync = |port: u16| {
        let certs = tmp.join("certs");
        async move {
            let mut op = operator_client(&certs, port).await;
            let v = op.list_clusters(ListClustersRequest::default()).await.ok()?.into_inner();
            v.clusters.iter().find(|c| c.name == "c").filter(|c| c.apps_total == 1 && c.apps_in_sync == 1).map(|_| ())
        }
    };
    eventually(60, "the app in sync on c, as a sees it", || in_sync(a.port)).await;
    let b = Hub::start(tmp, "b", &url, &etcd.url());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(b.leads(), 0);
    // A standby caught up with etcd is ready: it serves current state.
    eventually(20, "the standby is ready", || async { (b.ready().0 == 200).then_some(()) }).await;
    assert_eq!(a.ready().0, 200, "{:?}", a.ready());
    // A pause longer than the lease (a stalled VM, a stop-the-world pause): b leads meanwhile.
    signal(a.proc.as_ref().unwrap(), "-STOP");
    eventually(30, "hub b leads while a is paused", || async { (b.leads() > 0).then_some(()) }).await;
    signal(a.proc.as_ref().unwrap(), "-CONT");
    // a wakes up, finds it no longer holds the lease, and stops acting; it stands by.
    let woke = Instant::now();
    eventually(20, "hub a steps down", || async {
        a.log_text().contains("stopped acting and stands by").then_some(())
    })
    .await;
    eprintln!("the deposed leader stood down {:.1} s after it woke", woke.elapsed().as_secs_f64());
    let seen = eventually(20, "flotilla hubs: b leads, a stands by", || async {
        let v = hubs(tmp, a.port);
        (state_of(&v, "b").as_deref() == Some("leading") && state_of(&v, "a").as_deref() == Some("standby"))
            .then_some(v)
    })
    .await;
    eprintln!("{seen}");
    // What a's sessions reported while it led reaches the new leader when a stands down (its agent stays
    // connected to a and says nothing new).
    eventually(20, "b sees the app in sync on c", || in_sync(b.port)).await;
    let mut operator = operator_client(&tmp.join("certs"), a.port).await;
    operator.list_clusters(ListClustersRequest::default()).await.expect("a serves operators as a standby");

    // A leader stopped gracefully gives its lease back: a standby leads at once, well inside the lease.
    let stopped = Instant::now();
    signal(b.proc.as_ref().unwrap(), "-TERM");
    eventually(10, "hub a leads again", || async { (a.leads() > 1).then_some(()) }).await;
    let handed_over = stopped.elapsed();
    eprintln!("a graceful stop handed over in {:.1} s (lease 3 s)", handed_over.as_secs_f64());
    assert!(handed_over < Duration::from_millis(2500), "{handed_over:?}");
    assert_eq!(leader_seen(tmp, a.port).as_deref().map(|n| n == "a" || n == "b"), Some(true));
}

/// An agent replica of cluster `c`, serving `/metrics` and `/readyz` on `metrics`.
fn agent(tmp: &Path, name: &str, hub_port: u16, metrics: u16) -> Proc {
    let hub = format!("https://localhost:{hub_port}");
    let listen = format!("127.0.0.1:{metrics}");
    flotilla_e2e::start_agent_with(
        tmp,
        &hub,
        "c",
        "c",
        &["--replica", name, "--lease-seconds", "3", "--metrics-listen", &listen],
        &format!("-{name}"),
    )
}

fn agent_log(tmp: &Path, name: &str) -> String {
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
    let (port, health) = (free_port(), free_port());
    let extra = ["--metrics-listen".to_string(), format!("127.0.0.1:{health}")];
    let _hub = flotilla_e2e::start_hub_with(tmp, port, &format!("file://{}", repo.display()), &extra);
    // A single hub on its embedded store is alive and ready once it has a commit to serve.
    assert_eq!(http_get(health, "/healthz").0, 200);
    eventually(20, "the hub to be ready", || async { (http_get(health, "/readyz").0 == 200).then_some(()) }).await;
    assert_eq!(http_get(health, "/readyz"), (200, "ready\n".to_string()));
    assert_eq!(http_get(health, "/nothing").0, 404);
    let metrics = [free_port(), free_port()];
    let mut agents = vec![agent(tmp, "agent-a", port, metrics[0])];
    tokio::time::sleep(Duration::from_millis(500)).await;
    agents.push(agent(tmp, "agent-b", port, metrics[1]));
    let client = kube(&tmp.join("kc"), "c").await;
    eventually(60, "applied by the active agent", || async {
        (flotilla_e2e::value(&client, "notes", "note", "v").await.as_deref() == Some("1")).then_some(())
    })
    .await;
    let (active, standby) = eventually(20, "one active agent and one standby", || async {
        let (a, b) = (agent_log(tmp, "agent-a"), agent_log(tmp, "agent-b"));
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
    assert!(!agent_log(tmp, names[standby]).contains("connected to the hub"), "the standby holds no hub session");
    // Both are ready (the standby does its job: waiting); only the active one is connected.
    for (i, connected) in [(active, "1"), (standby, "0")] {
        assert_eq!(http_get(metrics[i], "/readyz").0, 200, "{}", names[i]);
        let (_, body) = http_get(metrics[i], "/metrics");
        assert!(body.lines().any(|l| l == format!("flotilla_agent_connected {connected}")), "{}: {body}", names[i]);
    }
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> = kube::Api::namespaced(client.clone(), "notes");
    let rv_before = api.get("note").await.unwrap().metadata.resource_version;

    // The active agent's pod dies.
    let killed = Instant::now();
    agents[active].kill();
    eventually(30, "the standby takes over", || async {
        agent_log(tmp, names[standby]).contains("this agent is the active one").then_some(())
    })
    .await;
    let took_over = killed.elapsed();
    eventually(30, "the new active agent connects to the hub", || async {
        agent_log(tmp, names[standby]).contains("connected to the hub").then_some(())
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
