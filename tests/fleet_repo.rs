//! The fleet repository end to end, with real processes: a repository served by `git daemon`, the hub
//! (polling once an hour, so only its webhook makes it fetch early), a simulator with three clusters and
//! their agents. Per-cluster rendering (a Kustomize overlay through kubectl, values, variables), a GitHub
//! push webhook, each kind of bad input blocking its app alone while other apps keep flowing, and a
//! repository that goes missing. Also `flotilla diff` on a real repository.

use flotilla_e2e::{
    binary, commit, eventually, free_port, git, git_daemon, kube, operator_client, spawn, start_agent, start_hub_with,
    value,
};
use flotilla_proto::platform::v1::{ListClustersRequest, ListClustersResponse};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};
use std::path::Path;

const CLUSTERS: [&str; 3] = ["eu-1", "eu-2", "us-1"];
const SECRET: &str = "webhook-s3cret";

fn notes(version: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: notes}}\ndata: {{version: {version}}}\n")
}

fn extra(value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: extra}}\ndata: {{value: {value}}}\n")
}

const EXTRA_APP: &str =
    "namespace: extra\ntargets:\n- selector: {matchExpressions: [{key: region, operator: In, values: [eu, us]}]}\n";

fn fleet_files() -> Vec<(&'static str, Option<String>)> {
    vec![
        ("fleet.yaml", Some("values: {tier: standard}\n".into())),
        ("clusters/eu-1.yaml", Some("labels: {region: eu}\nvalues: {replicas: 3}\n".into())),
        ("clusters/eu-2.yaml", Some("labels: {region: eu}\nvalues: {replicas: 3}\n".into())),
        ("clusters/us-1.yaml", Some("labels: {region: us}\n".into())),
        ("apps/notes/app.yaml", Some("namespace: notes\ntargets: [{selector: {}}]\n".into())),
        ("apps/notes/notes.yaml", Some(notes("v1"))),
        ("apps/extra/app.yaml", Some(EXTRA_APP.into())),
        ("apps/extra/extra.yaml", Some(extra("one"))),
        (
            "apps/web/app.yaml",
            Some(
                "namespace: web\nkustomize: {path: base}\nvalues: {replicas: 1}\ntargets:\n- selector: {matchLabels: {region: eu}}\n  kustomize: {path: overlays/eu}\n- selector: {}\n"
                    .into(),
            ),
        ),
        ("apps/web/base/kustomization.yaml", Some("resources: [cm.yaml]\n".into())),
        (
            "apps/web/base/cm.yaml",
            Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata:\n  cluster: '${cluster.name}'\n  replicas: 'r${values.replicas}'\n  tier: '${values.tier}'\n".into()),
        ),
        (
            "apps/web/overlays/eu/kustomization.yaml",
            Some("resources: [../../base]\npatches:\n- patch: |\n    apiVersion: v1\n    kind: ConfigMap\n    metadata: {name: web}\n    data: {overlay: eu}\n".into()),
        ),
    ]
}

type Files = Vec<(&'static str, Option<String>)>;

fn commit_files(repo: &Path, files: &[(&str, Option<String>)], msg: &str) -> String {
    let files: Vec<(&str, Option<&str>)> = files.iter().map(|(p, c)| (*p, c.as_deref())).collect();
    commit(repo, &files, msg)
}

/// POSTs a GitHub push event for `git_ref` to the hub's webhook; returns the HTTP status.
fn github_push(port: u16, git_ref: &str, secret: Option<&str>) -> u16 {
    let body = format!(r#"{{"ref": "{git_ref}", "after": "0000000000000000000000000000000000000000"}}"#);
    let mut headers = format!(
        "POST /hooks/git HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-GitHub-Event: push\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(secret) = secret {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body.as_bytes());
        headers.push_str(&format!("X-Hub-Signature-256: sha256={}\r\n", hex::encode(mac.finalize().into_bytes())));
    }
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("webhook port");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    s.write_all(format!("{headers}\r\n{body}").as_bytes()).unwrap();
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

async fn fleet_view(certs: &Path, port: u16) -> ListClustersResponse {
    let mut client = operator_client(certs, port).await;
    client.list_clusters(ListClustersRequest::default()).await.expect("list clusters").into_inner()
}

fn app_error(view: &ListClustersResponse, cluster: &str, app: &str) -> String {
    let c = view.clusters.iter().find(|c| c.name == cluster).expect("cluster in view");
    c.apps.iter().find(|a| a.app == app).map(|a| a.error.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_cluster_rendering_webhooks_and_bad_input_through_the_whole_path() {
    flotilla_common::install_crypto_provider();
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    eprintln!("work directory (logs): {}", tmp.display());
    flotilla_e2e::issue_certs(tmp, "eu-1,eu-2,us-1", "alice");
    let served = tmp.join("served");
    let repo = flotilla_e2e::new_repo(tmp);
    commit_files(&repo, &fleet_files(), "first");
    let (_daemon, git_port) = git_daemon(&served);

    let sim_args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--cluster".into(),
        CLUSTERS.join(","),
        "--kubeconfig-dir".into(),
        tmp.join("kc").display().to_string(),
    ];
    let _sim = spawn("flotilla-sim", &sim_args, &tmp.join("sim.log"));
    eventually(20, "the simulator", || async { tmp.join("kc/server").exists().then_some(()) }).await;

    std::fs::write(tmp.join("webhook-secret"), format!("{SECRET}\n")).unwrap();
    let (hub_port, hook_port) = (free_port(), free_port());
    let extra_args: Vec<String> = vec![
        "--poll-seconds".into(),
        "3600".into(),
        "--webhook-listen".into(),
        format!("127.0.0.1:{hook_port}"),
        "--webhook-secret-file".into(),
        tmp.join("webhook-secret").display().to_string(),
    ];
    let _hub = start_hub_with(tmp, hub_port, &format!("git://127.0.0.1:{git_port}/fleet.git"), &extra_args);
    let _agents: Vec<_> = CLUSTERS.iter().map(|c| start_agent(tmp, hub_port, c, c)).collect();
    let mut clients = Vec::new();
    for c in CLUSTERS {
        clients.push(kube(&tmp.join("kc"), c).await);
    }
    let certs = tmp.join("certs");

    // Per-cluster rendering: the eu overlay, the cluster's name and values, fleet-wide defaults.
    for (c, client) in CLUSTERS.iter().zip(&clients) {
        eventually(60, &format!("web on {c}"), || async {
            value(client, "web", "web", "cluster").await.filter(|v| v == c)
        })
        .await;
        let replicas = if c.starts_with("eu") { "r3" } else { "r1" };
        assert_eq!(value(client, "web", "web", "replicas").await.as_deref(), Some(replicas), "{c}");
        assert_eq!(value(client, "web", "web", "tier").await.as_deref(), Some("standard"), "{c}");
        let overlay = value(client, "web", "web", "overlay").await;
        assert_eq!(overlay.as_deref(), c.starts_with("eu").then_some("eu"), "{c}");
    }
    let view = fleet_view(&certs, hub_port).await;
    let stats = view.render_stats.expect("render stats");
    assert_eq!(stats.cluster_apps, 9, "{stats:?}");
    assert_eq!(stats.renders, 5, "notes and extra render once each, web once per cluster: {stats:?}");
    assert_eq!(stats.tool_runs, 2, "one kustomize build per overlay: {stats:?}");
    assert!(view.problems.is_empty(), "{:?}", view.problems);

    // A push reaches the clusters through the webhook, long before the hourly poll; a forged one is refused.
    commit_files(&repo, &[("apps/notes/notes.yaml", Some(notes("v2")))], "notes v2");
    assert_eq!(github_push(hook_port, "refs/heads/main", None), 401, "an unsigned event is refused");
    assert_eq!(github_push(hook_port, "refs/heads/main", Some("guess")), 401, "a forged event is refused");
    assert_eq!(github_push(hook_port, "refs/heads/other", Some(SECRET)), 200, "another branch needs no fetch");
    assert_eq!(github_push(hook_port, "refs/heads/main", Some(SECRET)), 202);
    for (c, client) in CLUSTERS.iter().zip(&clients) {
        eventually(30, &format!("notes v2 on {c} after the webhook"), || async {
            value(client, "notes", "notes", "version").await.filter(|v| v == "v2")
        })
        .await;
    }

    // Bad input: each commit breaks one app and changes notes; notes flows, the broken app keeps its last good
    // state everywhere and shows the error in the fleet view.
    let unknown_var =
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: extra}\ndata: {value: bad, region: '${cluster.region}'}\n";
    // (case, files it commits, the app it breaks, the error expected on that app)
    let cases: Vec<(&str, Files, &str, &str)> = vec![
        (
            "invalid YAML",
            vec![("apps/extra/extra.yaml", Some("data: [unclosed\n".into()))],
            "extra",
            "apps/extra/extra.yaml:2: while parsing a flow sequence",
        ),
        (
            "an unknown field in an app file",
            vec![
                ("apps/extra/app.yaml", Some(format!("{EXTRA_APP}prune: maybe\n"))),
                ("apps/extra/extra.yaml", Some(extra("bad"))),
            ],
            "extra",
            "apps/extra/app.yaml:4: unknown field `prune`",
        ),
        (
            "a selector with a bad operator",
            vec![
                ("apps/extra/app.yaml", Some(EXTRA_APP.replace("operator: In", "operator: Inside"))),
                ("apps/extra/extra.yaml", Some(extra("bad"))),
            ],
            "extra",
            "unknown variant `Inside`",
        ),
        (
            "an unknown variable",
            vec![("apps/extra/extra.yaml", Some(unknown_var.into()))],
            "extra",
            "unknown variable ${cluster.region}",
        ),
        (
            "a Kustomize build error",
            vec![
                ("apps/web/base/kustomization.yaml", Some("resources: [cm.yaml, missing.yaml]\n".into())),
                (
                    "apps/web/base/cm.yaml",
                    Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {cluster: bad}\n".into()),
                ),
            ],
            "web",
            "apps/web: kustomize build",
        ),
        (
            "two apps claiming one object",
            vec![
                ("apps/thief/app.yaml", Some("namespace: extra\ntargets: [{selector: {}}]\n".into())),
                ("apps/thief/cm.yaml", Some(extra("stolen"))),
                ("apps/extra/extra.yaml", Some(extra("bad"))),
            ],
            "extra",
            "ConfigMap extra/extra is claimed by apps extra and thief on cluster",
        ),
    ];
    for (i, (case, files, app, expected)) in cases.into_iter().enumerate() {
        let marker = format!("v{}", i + 3);
        let mut change = files.clone();
        change.push(("apps/notes/notes.yaml", Some(notes(&marker))));
        commit_files(&repo, &change, case);
        assert_eq!(github_push(hook_port, "refs/heads/main", Some(SECRET)), 202);
        for (c, client) in CLUSTERS.iter().zip(&clients) {
            eventually(30, &format!("{case}: notes {marker} on {c}"), || async {
                value(client, "notes", "notes", "version").await.filter(|v| *v == marker)
            })
            .await;
        }
        let view = fleet_view(&certs, hub_port).await;
        for (c, client) in CLUSTERS.iter().zip(&clients) {
            let e = app_error(&view, c, app);
            assert!(e.contains(expected), "{case} on {c}: expected {expected:?} in {e:?}");
            let (ns, key, good) =
                if app == "extra" { ("extra", "value", "one".to_string()) } else { ("web", "cluster", c.to_string()) };
            assert_eq!(value(client, ns, app, key).await, Some(good), "{case}: nothing of the broken app reaches {c}");
        }
        if case == "two apps claiming one object" {
            assert!(app_error(&view, "eu-1", "thief").contains("claimed by apps extra and thief"));
        }
        // Put the repository right again before the next case.
        let mut fix: Vec<(&str, Option<String>)> =
            fleet_files().into_iter().filter(|(p, _)| files.iter().any(|(q, _)| q == p)).collect();
        fix.extend(files.iter().filter(|(p, _)| !fleet_files().iter().any(|(q, _)| q == p)).map(|(p, _)| (*p, None)));
        commit_files(&repo, &fix, &format!("fix {case}"));
        assert_eq!(github_push(hook_port, "refs/heads/main", Some(SECRET)), 202);
        let certs2 = certs.clone();
        eventually(30, &format!("{case}: fixed"), || {
            let certs = certs2.clone();
            async move {
                let view = fleet_view(&certs, hub_port).await;
                CLUSTERS.iter().all(|c| app_error(&view, c, app).is_empty()).then_some(())
            }
        })
        .await;
    }

    // The repository goes missing: the hub says so and keeps serving; when it is back, so is the hub.
    std::fs::rename(&repo, served.join("moved.git")).unwrap();
    assert_eq!(github_push(hook_port, "refs/heads/main", Some(SECRET)), 202);
    let certs2 = certs.clone();
    let error = eventually(30, "the source error", || {
        let certs = certs2.clone();
        async move { Some(fleet_view(&certs, hub_port).await.source_error).filter(|e| !e.is_empty()) }
    })
    .await;
    assert!(error.contains("fleet.git"), "{error}");
    assert_eq!(
        value(&clients[0], "notes", "notes", "version").await.as_deref(),
        Some("v8"),
        "clusters keep their state"
    );
    std::fs::rename(served.join("moved.git"), &repo).unwrap();
    assert_eq!(github_push(hook_port, "refs/heads/main", Some(SECRET)), 202);
    eventually(30, "the source error to clear", || {
        let certs = certs.clone();
        async move { fleet_view(&certs, hub_port).await.source_error.is_empty().then_some(()) }
    })
    .await;
}

/// `flotilla diff` on a real repository: a change to one region's values lists exactly that region's clusters.
#[test]
fn flotilla_diff_lists_the_blast_radius_of_a_change() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("fleet");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let mut files = fleet_files();
    for i in 2..=4 {
        files.push((
            ["clusters/eu-", &i.to_string(), ".yaml"].concat().leak(),
            Some("labels: {region: eu}\nvalues: {replicas: 3}\n".into()),
        ));
        files.push((["clusters/us-", &i.to_string(), ".yaml"].concat().leak(), Some("labels: {region: us}\n".into())));
    }
    let first = commit_files(&repo, &files, "first");
    git(&repo, &["checkout", "-q", "-b", "bigger-eu"]);
    let eu: Vec<(&str, Option<String>)> = (1..=4)
        .map(|i| {
            (
                ["clusters/eu-", &i.to_string(), ".yaml"].concat().leak() as &str,
                Some("labels: {region: eu}\nvalues: {replicas: 5}\n".into()),
            )
        })
        .collect();
    commit_files(&repo, &eu, "eu: five replicas");
    let run = |args: &[&str]| {
        let out =
            std::process::Command::new(binary("flotilla")).arg("diff").args(args).current_dir(&repo).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&["main", "bigger-eu"]);
    assert_eq!(code, Some(0), "{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("main..bigger-eu: 4 of 8 clusters change, 1 app"), "{out}");
    assert_eq!(
        lines.next().map(str::split_whitespace).map(Iterator::collect::<Vec<_>>),
        Some(vec!["changed", "web", "eu-1", "eu-2", "eu-3", "eu-4"]),
        "{out}"
    );
    assert_eq!(lines.next(), None, "{out}");
    let (code, same, _) = run(&[&first, "main"]);
    assert_eq!((code, same.as_str()), (Some(0), format!("{first}..main: 0 of 8 clusters change, 0 apps\n").as_str()));

    let (_, patch, _) = run(&["-p", "main", "bigger-eu"]);
    assert!(patch.contains("-  replicas: r3\n+  replicas: r5"), "{patch}");
    let (_, json, _) = run(&["-o", "json", "main", "bigger-eu"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["clusters_changed"], 4);

    // A change that breaks rendering fails the command, naming what is wrong and where.
    commit_files(&repo, &[("apps/notes/notes.yaml", Some("data: [unclosed\n".into()))], "broken");
    let (code, out, err) = run(&["main", "HEAD"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("error    notes") && out.contains("apps/notes/notes.yaml:2: while parsing a flow sequence"),
        "{out}"
    );
    assert!(err.contains("8 cluster apps fail to render at HEAD"), "{err}");
    let (code, _, err) = run(&["main", "no-such-branch"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no-such-branch"), "{err}");
}
