//! Who may do what, with real processes: operator roles from a file the hub reloads, every mutating call and
//! every refusal in `flotilla audit` (and shipped as JSON lines), revoked certificates and clusters removed or
//! disabled in the inventory cut off within seconds, with nothing deleted in their clusters.

use flotilla_e2e::{commit, eventually, free_port, kube, platform_client_as, start_agent, start_hub_with, Proc};
use flotilla_proto::platform::v1::control_rollout_request::Action;
use flotilla_proto::platform::v1::{
    ControlRolloutRequest, ListAuditRequest, ListClustersRequest, ListRolloutsRequest, WhoAmIRequest,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use tonic::Code;

fn note(v: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: note}}\ndata: {{v: '{v}'}}\n")
}

/// Two clusters in two rings; `notes` rolls out ring by ring, the second after an approval.
fn ringed_repo(tmp: &Path) -> PathBuf {
    let app = "namespace: notes\ntargets: [{selector: {}}]\nrollout:\n  waves:\n  - {name: one, selector: {matchLabels: {ring: '1'}}}\n  - {name: two, selector: {matchLabels: {ring: '2'}}, approval: true}\n";
    flotilla_e2e::fleet_repo_with(
        tmp,
        &[
            ("clusters/c1.yaml", Some("labels: {ring: '1'}\n")),
            ("clusters/c2.yaml", Some("labels: {ring: '2'}\n")),
            ("apps/notes/app.yaml", Some(app)),
            ("apps/notes/cm.yaml", Some(&note("1"))),
        ],
    )
}

async fn versions(clients: &[kube::Client]) -> Vec<Option<u32>> {
    let mut out = Vec::new();
    for c in clients {
        out.push(flotilla_e2e::value(c, "notes", "note", "v").await.and_then(|v| v.parse().ok()));
    }
    out
}

async fn control(
    certs: &Path,
    port: u16,
    who: &str,
    action: Action,
    wave: &str,
    revision: &str,
) -> Result<String, tonic::Status> {
    let mut op = platform_client_as(certs, port, &format!("operators/{who}")).await;
    let req = ControlRolloutRequest {
        app: "notes".into(),
        action: action as i32,
        wave: wave.into(),
        revision: revision.into(),
        ..Default::default()
    };
    op.control_rollout(req).await.map(|r| r.into_inner().message)
}

async fn wave_two(certs: &Path, port: u16) -> Option<(String, String)> {
    let mut op = platform_client_as(certs, port, "operators/ada").await;
    let r = op.list_rollouts(ListRolloutsRequest { app: "notes".into() }).await.ok()?.into_inner();
    let ro = r.rollouts.into_iter().next()?;
    Some((ro.revision.clone(), ro.waves.get(1)?.phase.clone()))
}

/// `flotilla ARGS --hub … --certs … --operator WHO`: (exit code, stdout, stderr).
fn cli(tmp: &Path, port: u16, who: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(flotilla_e2e::binary("flotilla"))
        .args(args)
        .args(["--hub", &format!("https://localhost:{port}"), "--operator", who, "--certs"])
        .arg(tmp.join("certs"))
        .output()
        .expect("running flotilla");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn serial(tmp: &Path, cert: &str) -> String {
    let pem = std::fs::read_to_string(tmp.join("certs").join(cert)).unwrap();
    flotilla_common::identity::serial_of(&flotilla_common::identity::pem_der(&pem).unwrap()).unwrap()
}

/// Replaces `path` as a whole (a new file: what a ConfigMap mount or `mv` does).
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Fleet {
    _dir: tempfile::TempDir,
    tmp: PathBuf,
    repo: PathBuf,
    port: u16,
    bootstrap: u16,
    clients: Vec<kube::Client>,
    _procs: Vec<Proc>,
}

const ROLES: &str = "bindings:\n  - operators: [vera]\n    role: viewer\n  - operators: [olga]\n    role: operator\n  - operators: [ada]\n    role: admin\n";

async fn fleet() -> Fleet {
    flotilla_common::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().to_path_buf();
    eprintln!("work directory (logs): {}", tmp.display());
    flotilla_e2e::issue_certs(&tmp, "c1,c2", "vera,olga,ada,mallory");
    let repo = ringed_repo(&tmp);
    std::fs::write(tmp.join("roles.yaml"), ROLES).unwrap();
    std::fs::write(tmp.join("revoked.txt"), "# revoked certificate serials\n").unwrap();
    // c3 is simulated but not in the inventory: it joins with a token.
    let sim = flotilla_e2e::start_sim(&tmp, "c1,c2,c3");
    let (port, bootstrap) = (free_port(), free_port());
    let extra: Vec<String> = [
        "--bootstrap-listen",
        &format!("127.0.0.1:{bootstrap}"),
        // Short-lived certificates for joining and renewing agents, so a test sees a renewal.
        "--cert-ttl",
        "2m",
        "--roles",
        &tmp.join("roles.yaml").display().to_string(),
        "--revoked",
        &tmp.join("revoked.txt").display().to_string(),
        "--audit-log",
        &tmp.join("audit.jsonl").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let hub = start_hub_with(&tmp, port, &format!("file://{}", repo.display()), &extra);
    let mut procs = vec![sim, hub];
    procs.push(start_agent(&tmp, port, "c1", "c1"));
    procs.push(start_agent(&tmp, port, "c2", "c2"));
    let mut clients = Vec::new();
    for c in ["c1", "c2"] {
        clients.push(kube(&tmp.join("kc"), c).await);
    }
    Fleet { _dir: dir, tmp, repo, port, bootstrap, clients, _procs: procs }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_cannot_approve_an_operator_cannot_roll_back_an_admin_can_and_all_of_it_is_audited() {
    let f = fleet().await;
    let (tmp, port, certs) = (&f.tmp, f.port, f.tmp.join("certs"));
    let first = eventually(60, "wave two awaits approval", || async {
        wave_two(&certs, port).await.filter(|(_, p)| p == "awaiting approval").map(|(r, _)| r)
    })
    .await;
    assert_eq!(versions(&f.clients).await, vec![Some(1), None]);

    // A viewer sees, and cannot approve: the refusal names the role it lacks.
    let e = control(&certs, port, "vera", Action::Approve, "two", "").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("needs the operator role") && e.message().contains("holds viewer"), "{e:?}");
    let mut vera = platform_client_as(&certs, port, "operators/vera").await;
    assert_eq!(vera.list_clusters(ListClustersRequest::default()).await.unwrap().into_inner().clusters.len(), 2);
    let e = vera.list_audit(ListAuditRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Someone with a certificate of the fleet and no role sees nothing.
    let mut mallory = platform_client_as(&certs, port, "operators/mallory").await;
    let e = mallory.list_clusters(ListClustersRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("holds no role"), "{e:?}");
    let me = mallory.who_am_i(WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!((me.who.as_str(), me.role.as_str(), me.open), ("mallory", "", false));
    assert!(me.certificate_expires_unix_ms > chrono::Utc::now().timestamp_millis());

    // An operator approves; the next wave starts.
    let ok = control(&certs, port, "olga", Action::Approve, "two", "").await.expect("an operator approves");
    assert!(ok.contains("approved"), "{ok}");
    eventually(60, "wave two has the first commit", || async {
        (versions(&f.clients).await == vec![Some(1), Some(1)]).then_some(())
    })
    .await;

    // A second commit; an operator cannot roll back, an admin can.
    commit(&f.repo, &[("apps/notes/cm.yaml", Some(&note("2")))], "two");
    eventually(60, "the second commit on c1", || async { (versions(&f.clients).await[0] == Some(2)).then_some(()) })
        .await;
    let e = control(&certs, port, "olga", Action::Rollback, "", &first).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("needs the admin role") && e.message().contains("holds operator"), "{e:?}");
    assert_eq!(versions(&f.clients).await[0], Some(2), "the refused rollback did nothing");
    control(&certs, port, "ada", Action::Rollback, "", &first).await.expect("an admin rolls back");
    eventually(60, "c1 back on the first commit", || async {
        (versions(&f.clients).await[0] == Some(1)).then_some(())
    })
    .await;

    // Every one of those calls is in `flotilla audit`, read by an operator.
    let (code, out, err) = cli(tmp, port, "olga", &["audit", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let records: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let has = |who: &str, action: &str, allowed: bool| {
        records.iter().any(|r| r["who"] == who && r["action"] == action && r["allowed"] == allowed)
    };
    assert!(has("vera", "approve", false), "{out}");
    assert!(has("vera", "read-audit", false), "{out}");
    assert!(has("mallory", "view", false), "{out}");
    assert!(has("olga", "approve", true), "{out}");
    assert!(has("olga", "rollback", false), "{out}");
    assert!(has("ada", "rollback", true), "{out}");
    // Filtered by who, and since a time.
    let (_, out, _) = cli(tmp, port, "ada", &["audit", "--who", "vera", "-o", "json"]);
    let only: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert!(!only.is_empty() && only.iter().all(|r| r["who"] == "vera"), "{out}");
    let (_, out, _) = cli(tmp, port, "ada", &["audit", "--since", "2099-01-01T00:00:00Z", "-o", "json"]);
    assert_eq!(out.trim(), "[]");
    let (code, _, err) = cli(tmp, port, "vera", &["audit"]);
    assert_ne!(code, 0);
    assert!(err.contains("permission denied") && err.contains("needs the operator role"), "{err}");
    let (_, table, _) = cli(tmp, port, "ada", &["audit"]);
    assert!(table.starts_with("WHEN") && table.contains("rollback"), "{table}");
    // And shipped as JSON lines, as they were decided.
    let shipped = std::fs::read_to_string(tmp.join("audit.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = shipped.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|r| r["who"] == "olga" && r["action"] == "rollback" && r["allowed"] == false));
    assert!(
        lines.iter().any(|r| r["who"] == "olga" && r["action"] == "approve" && r["allowed"] == true),
        "controls that took effect are shipped too: {shipped}"
    );

    // The roles file is read again when it changes: vera becomes an operator.
    replace(&tmp.join("roles.yaml"), &ROLES.replace("role: viewer", "role: operator"));
    eventually(20, "vera may pause once the roles file changed", || async {
        control(&certs, port, "vera", Action::Pause, "", "").await.ok()
    })
    .await;
    // A broken roles file keeps the roles in force.
    replace(&tmp.join("roles.yaml"), "bindings: [oops\n");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    control(&certs, port, "vera", Action::Resume, "", "").await.expect("the roles in force stay");
    let mut ada = platform_client_as(&certs, port, "operators/ada").await;
    let view = ada.list_clusters(ListClustersRequest::default()).await.unwrap().into_inner();
    assert!(view.problems.iter().any(|p| p.starts_with("roles file: ") && p.contains("roles.yaml")), "{view:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificates_and_removed_or_disabled_clusters_are_cut_off_within_seconds() {
    let f = fleet().await;
    let (tmp, port, certs) = (&f.tmp, f.port, f.tmp.join("certs"));
    eventually(60, "wave two awaits approval", || async {
        wave_two(&certs, port).await.filter(|(_, p)| p == "awaiting approval")
    })
    .await;
    control(&certs, port, "olga", Action::Approve, "two", "").await.unwrap();
    eventually(60, "both clusters run the app", || async {
        (versions(&f.clients).await == vec![Some(1), Some(1)]).then_some(())
    })
    .await;
    let connected = |name: &'static str| {
        let certs = certs.clone();
        async move {
            let mut ada = platform_client_as(&certs, port, "operators/ada").await;
            let view = ada.list_clusters(ListClustersRequest::default()).await.ok()?.into_inner();
            view.clusters.iter().find(|c| c.name == name).map(|c| c.connected)
        }
    };
    assert_eq!(connected("c2").await, Some(true));

    // Revoke olga's certificate and c2's: olga is refused, c2's session ends, c2 keeps what it runs.
    let revoked = format!("{}\n# c2's agent\n{}\n", serial(tmp, "operators/olga.pem"), serial(tmp, "clusters/c2.pem"));
    let t0 = std::time::Instant::now();
    replace(&tmp.join("revoked.txt"), &revoked);
    eventually(15, "c2 disconnected", || async { (connected("c2").await == Some(false)).then_some(()) }).await;
    eprintln!("c2 cut off {:?} after its certificate was revoked", t0.elapsed());
    let mut olga = platform_client_as(&certs, port, "operators/olga").await;
    let e = olga.list_clusters(ListClustersRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked"), "{e:?}");
    let log = std::fs::read_to_string(tmp.join("agent-c2-as-c2.log")).unwrap_or_default();
    assert!(log.contains("revoked"), "the agent hears why: {log}");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(connected("c2").await, Some(false), "its reconnects are refused too");
    assert_eq!(versions(&f.clients).await[1], Some(1), "nothing was deleted in c2");

    // Disabling c1 in the inventory ends its session at the commit; its objects stay.
    commit(&f.repo, &[("clusters/c1.yaml", Some("labels: {ring: '1'}\ndisabled: true\n"))], "disable c1");
    eventually(30, "c1 disconnected", || async { (connected("c1").await == Some(false)).then_some(()) }).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(connected("c1").await, Some(false), "its reconnects are refused too");
    assert_eq!(versions(&f.clients).await[0], Some(1), "nothing was deleted in c1");
    let log = std::fs::read_to_string(tmp.join("agent-c1-as-c1.log")).unwrap_or_default();
    assert!(log.contains("disabled in the fleet inventory"), "{log}");

    // Enabled again, it reconnects; removed from the inventory, it is refused again.
    commit(&f.repo, &[("clusters/c1.yaml", Some("labels: {ring: '1'}\n"))], "enable c1");
    eventually(60, "c1 reconnected", || async { (connected("c1").await == Some(true)).then_some(()) }).await;
    commit(&f.repo, &[("clusters/c1.yaml", None)], "remove c1");
    eventually(30, "c1 refused once removed", || async {
        let log = std::fs::read_to_string(tmp.join("agent-c1-as-c1.log")).unwrap_or_default();
        log.contains("is not in the fleet inventory").then_some(())
    })
    .await;
    assert_eq!(versions(&f.clients).await[0], Some(1), "nothing was deleted in c1");

    // Every refusal of a platform call is audited.
    let (code, out, err) = cli(tmp, port, "ada", &["audit", "--who", "olga", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"), "{out}");
}

/// An agent of c3 joining with `token` as `cluster`, its certificate in `tmp/joined/<tag>.pem`.
fn joining_agent(f: &Fleet, cluster: &str, token: &str, tag: &str) -> Proc {
    joining_agent_with(f, cluster, token, tag, &[])
}

fn joining_agent_with(f: &Fleet, cluster: &str, token: &str, tag: &str, extra: &[&str]) -> Proc {
    let joined = f.tmp.join("joined");
    let args: Vec<String> = [
        "--hub",
        &format!("https://localhost:{}", f.port),
        "--ca",
        &f.tmp.join("certs/ca.pem").display().to_string(),
        "--cert",
        &joined.join(format!("{tag}.pem")).display().to_string(),
        "--key",
        &joined.join(format!("{tag}-key.pem")).display().to_string(),
        "--kubeconfig",
        &f.tmp.join("kc/c3.kubeconfig").display().to_string(),
        "--cluster",
        cluster,
        "--bootstrap-token",
        token,
        "--bootstrap-url",
        &format!("https://localhost:{}", f.bootstrap),
        "--renew-before",
        "110s",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    flotilla_e2e::spawn("flotilla-agent", &args, &f.tmp.join(format!("agent-join-{tag}.log")))
}

fn token(f: &Fleet, cluster: &str, ttl: &str) -> String {
    let (code, out, err) = cli(&f.tmp, f.port, "ada", &["join-token", "create", cluster, "--ttl", ttl, "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["token"].as_str().unwrap().to_string()
}

/// Waits for `p` to exit (at most `secs`); its log.
async fn exits(p: &mut Proc, log: &Path, secs: u64) -> String {
    eventually(secs, "the agent exits", || {
        let done = p.child.try_wait().ok().flatten().is_some();
        async move { done.then_some(()) }
    })
    .await;
    std::fs::read_to_string(log).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_joins_with_a_token_once_only_in_the_inventory_and_renews_without_dropping_its_session() {
    let f = fleet().await;
    let (tmp, port, certs) = (&f.tmp, f.port, f.tmp.join("certs"));
    let c3 = kube(&tmp.join("kc"), "c3").await;
    let started = std::time::Instant::now();
    let short = token(&f, "c3", "1m");
    // A viewer or an operator may not make tokens.
    let (code, _, err) = cli(tmp, port, "olga", &["join-token", "create", "c3"]);
    assert!(code != 0 && err.contains("needs the admin role"), "{err}");

    // Not in the inventory: refused, whatever the token; the token is not spent.
    let t = token(&f, "c3", "1h");
    let mut early = joining_agent(&f, "c3", &t, "early");
    let log = exits(&mut early, &tmp.join("agent-join-early.log"), 30).await;
    assert!(log.contains("cluster c3 is not in the fleet inventory"), "{log}");
    assert!(!tmp.join("joined/early.pem").exists(), "no certificate was issued");

    // In the inventory: the same token joins, the agent makes its key and runs the app.
    commit(&f.repo, &[("clusters/c3.yaml", Some("labels: {ring: '1'}\n"))], "c3 joins the inventory");
    let mut ok_agent = None;
    eventually(60, "c3 joined once the inventory lists it", || {
        // The hub reads the commit within a second or two; until then the join is refused (and the agent exits).
        let a = joining_agent(&f, "c3", &t, "c3");
        let path = tmp.join("joined/c3.pem");
        ok_agent = Some(a);
        async move {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            path.exists().then_some(())
        }
    })
    .await;
    let _agent = ok_agent;
    let pem = std::fs::read_to_string(tmp.join("joined/c3.pem")).unwrap();
    assert_eq!(flotilla_common::identity::identity_of_pem(&pem).unwrap().to_string(), "cluster c3");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.join("joined/c3-key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key made in the cluster is its owner's only");
    }
    eventually(60, "c3 runs the app", || async {
        (flotilla_e2e::value(&c3, "notes", "note", "v").await.is_some()).then_some(())
    })
    .await;

    // The token is spent: a second join with it is refused.
    let mut again = joining_agent(&f, "c3", &t, "again");
    let log = exits(&mut again, &tmp.join("agent-join-again.log"), 30).await;
    assert!(log.contains("has been used already"), "{log}");
    // A token for c2 does not let anyone join as c3 (the request names c3).
    let for_c2 = token(&f, "c2", "1h");
    let mut foreign = joining_agent(&f, "c3", &for_c2, "foreign");
    let log = exits(&mut foreign, &tmp.join("agent-join-foreign.log"), 30).await;
    assert!(log.contains("is for cluster c2, not for cluster c3"), "{log}");

    // Renewal over the live session: a new certificate (new key, new serial), no reconnect, nothing applied again.
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> = kube::Api::namespaced(c3.clone(), "notes");
    let version = api.get("note").await.unwrap().metadata.resource_version;
    let serial =
        |pem: &str| flotilla_common::identity::serial_of(&flotilla_common::identity::pem_der(pem).unwrap()).unwrap();
    let first_serial = serial(&pem);
    eventually(60, "the certificate renewed", || async {
        let now = std::fs::read_to_string(tmp.join("joined/c3.pem")).unwrap_or_default();
        (!now.is_empty() && serial(&now) != first_serial).then_some(())
    })
    .await;
    let log = std::fs::read_to_string(tmp.join("agent-join-c3.log")).unwrap();
    assert!(log.contains("certificate renewed over the live session"), "{log}");
    assert_eq!(log.matches("connected to the hub").count(), 1, "the session was not dropped: {log}");
    assert!(!log.contains("session with the hub ended"), "{log}");
    assert_eq!(api.get("note").await.unwrap().metadata.resource_version, version, "nothing applied again");

    // The short token expired unused.
    let wait = std::time::Duration::from_secs(62).saturating_sub(started.elapsed());
    tokio::time::sleep(wait).await;
    let mut late = joining_agent(&f, "c3", &short, "late");
    let log = exits(&mut late, &tmp.join("agent-join-late.log"), 30).await;
    assert!(log.contains("expired"), "{log}");

    // Joins, refusals and renewals are in the audit.
    let (code, out, err) = cli(tmp, port, "ada", &["audit", "--who", "cluster c3", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let records: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let has = |action: &str, allowed: bool| records.iter().any(|r| r["action"] == action && r["allowed"] == allowed);
    assert!(has("join", true) && has("join", false) && has("renew", true), "{out}");
    let _ = certs;
}

/// A platform client trusting `ca` (PEM) for the hub, holding `who`'s certificate from `dir`.
async fn client_with(
    ca_pem: &str,
    dir: &Path,
    who: &str,
    port: u16,
) -> Result<
    flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient<tonic::transport::Channel>,
    String,
> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let read = |f: String| std::fs::read_to_string(dir.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(read(format!("operators/{who}.pem")), read(format!("operators/{who}-key.pem"))))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient::new(channel))
}

/// Whether `who` (its certificate in `dir`), trusting `ca_pem`, gets an answer from the hub.
async fn answered(ca_pem: &str, dir: &Path, who: &str, port: u16) -> bool {
    match client_with(ca_pem, dir, who, port).await {
        Ok(mut c) => c.who_am_i(WhoAmIRequest {}).await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_trusts_old_and_new_during_the_overlap_without_a_hub_restart_or_a_dropped_session() {
    let f = fleet().await;
    let (tmp, port) = (&f.tmp, f.port);
    let certs = tmp.join("certs");
    eventually(60, "c1 runs the app", || async { (versions(&f.clients).await[0] == Some(1)).then_some(()) }).await;
    let old_ca = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
    // 1. A new CA, with an operator and the hub's next certificate.
    let newdir = tmp.join("new");
    let out = Command::new(flotilla_e2e::binary("flotilla"))
        .args(["certs", "--fleet", "next", "--operator", "nina", "--dir"])
        .arg(&newdir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let new_ca = std::fs::read_to_string(newdir.join("ca.pem")).unwrap();
    assert!(answered(&old_ca, &certs, "ada", port).await);
    assert!(!answered(&old_ca, &newdir, "nina", port).await, "the new CA is not trusted yet");

    // 2. The overlap: the hub trusts both (its CA bundle replaced; no restart).
    replace(&certs.join("ca.pem"), &format!("{old_ca}{new_ca}"));
    eventually(15, "a certificate of the new CA is accepted", || async {
        answered(&old_ca, &newdir, "nina", port).await.then_some(())
    })
    .await;
    assert!(answered(&old_ca, &certs, "ada", port).await, "and the old CA's still are");

    // 3. The hub's own certificate from the new CA (read again; clients trusting both see it).
    let both = format!("{old_ca}{new_ca}");
    replace(&certs.join("hub-key.pem"), &std::fs::read_to_string(newdir.join("hub-key.pem")).unwrap());
    replace(&certs.join("hub.pem"), &std::fs::read_to_string(newdir.join("hub.pem")).unwrap());
    eventually(15, "the hub serves its new certificate", || async {
        answered(&new_ca, &newdir, "nina", port).await.then_some(())
    })
    .await;
    assert!(answered(&both, &certs, "ada", port).await);
    assert!(!answered(&old_ca, &certs, "ada", port).await, "a client trusting only the old CA refuses the hub now");

    // 4. Issue from the new CA (its key installed, the new CA first in the bundle): a cluster joining now gets a
    // certificate of the new CA, without a restart of the hub.
    replace(&certs.join("ca-key.pem"), &std::fs::read_to_string(newdir.join("ca-key.pem")).unwrap());
    replace(&certs.join("ca.pem"), &format!("{new_ca}{old_ca}"));
    // The hub looks at its files every second (a key without its certificate in between is refused).
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    commit(&f.repo, &[("clusters/c3.yaml", Some("labels: {ring: '1'}\n"))], "c3 joins the inventory");
    let t = token(&f, "c3", "1h");
    let mut joined = None;
    eventually(60, "c3 joined", || {
        joined = Some(joining_agent(&f, "c3", &t, "rotated"));
        let path = tmp.join("joined/rotated.pem");
        async move {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            path.exists().then_some(())
        }
    })
    .await;
    let pem = std::fs::read_to_string(tmp.join("joined/rotated.pem")).unwrap();
    let der = flotilla_common::identity::pem_der(&pem).unwrap();
    let issuer = x509_issuer(&der);
    assert!(issuer.contains("Flotilla fleet CA next"), "issued by the new CA: {issuer}");

    // 5. The end of the overlap: the old CA is no longer trusted.
    replace(&certs.join("ca.pem"), &new_ca);
    eventually(15, "the old CA's certificates are refused", || async {
        (!answered(&both, &certs, "ada", port).await).then_some(())
    })
    .await;
    assert!(answered(&new_ca, &newdir, "nina", port).await);

    // The cluster that joined under the new CA stays connected after the overlap ended.
    let log = std::fs::read_to_string(tmp.join("agent-join-rotated.log")).unwrap_or_default();
    assert!(log.contains("connected to the hub") && !log.contains("session with the hub ended"), "{log}");
    drop(joined);
    // Live sessions kept theirs: no agent reconnected through all of it.
    for c in ["c1", "c2"] {
        let log = std::fs::read_to_string(tmp.join(format!("agent-{c}-as-{c}.log"))).unwrap_or_default();
        assert_eq!(log.matches("connected to the hub").count(), 1, "{c}: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_keeps_its_joined_certificate_in_a_secret_and_finds_it_again_after_a_restart() {
    let f = fleet().await;
    let c3 = kube(&f.tmp.join("kc"), "c3").await;
    commit(&f.repo, &[("clusters/c3.yaml", Some("labels: {ring: '1'}\n"))], "c3 joins the inventory");
    let mut ada = platform_client_as(&f.tmp.join("certs"), f.port, "operators/ada").await;
    eventually(30, "the hub has c3 in its inventory", || {
        let mut ada = ada.clone();
        async move {
            let view = ada.list_clusters(ListClustersRequest::default()).await.ok()?.into_inner();
            view.clusters.iter().any(|c| c.name == "c3").then_some(())
        }
    })
    .await;
    let _ = &mut ada;
    let t = token(&f, "c3", "1h");
    let secret = ["--cert-secret", "flotilla-agent-cert"];
    let mut agent = joining_agent_with(&f, "c3", &t, "secret", &secret);
    eventually(60, "c3 runs the app", || async {
        (flotilla_e2e::value(&c3, "notes", "note", "v").await.is_some()).then_some(())
    })
    .await;
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(c3.clone(), "flotilla-system");
    let kept = api.get("flotilla-agent-cert").await.expect("the Secret");
    assert_eq!(kept.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = kept.data.unwrap();
    let pem = String::from_utf8(data["tls.crt"].0.clone()).unwrap();
    assert_eq!(flotilla_common::identity::identity_of_pem(&pem).unwrap().to_string(), "cluster c3");
    assert!(data.contains_key("tls.key"));
    assert!(!f.tmp.join("joined/secret.pem").exists(), "no file: the Secret keeps it");
    // Restarted (the token is spent): it finds its certificate and connects again.
    agent.kill();
    let _again = joining_agent_with(&f, "c3", &t, "secret", &secret);
    eventually(60, "the restarted agent connected with the kept certificate", || async {
        let log = std::fs::read_to_string(f.tmp.join("agent-join-secret.log")).unwrap_or_default();
        assert!(!log.contains("refused"), "{log}");
        log.contains("connected to the hub").then_some(())
    })
    .await;
}

/// The issuer of a DER certificate, as text.
fn x509_issuer(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.issuer().to_string()
}
