//! The fleet repository as hostile input, end to end with real processes: a tree crafted with entries named
//! `..` (a Git server without `receive.fsckObjects` accepts it) is refused on its app by the hub, by
//! `flotilla render --rev` and by `flotilla diff`; nothing is written outside their private copies, and every
//! other app keeps flowing.

use flotilla_e2e::{binary, commit, eventually, free_port, git, issue_certs, operator_client, start_hub};
use flotilla_proto::platform::v1::ListClustersRequest;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Writes an object with `git hash-object --literally` (no checks at all); returns its id.
fn object(repo: &Path, kind: &str, bytes: &[u8]) -> String {
    let mut child = Command::new("git")
        .args(["hash-object", "-t", kind, "--literally", "-w", "--stdin"])
        .current_dir(repo)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("git is needed: apt-get install git");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A tree object from (mode, name, id) entries, exactly as given.
fn tree(repo: &Path, entries: &[(&str, &str, &str)]) -> String {
    let mut sorted = entries.to_vec();
    sorted.sort_by_key(|(mode, name, _)| if *mode == "40000" { format!("{name}/") } else { name.to_string() });
    let mut bytes = Vec::new();
    for (mode, name, id) in sorted {
        bytes.extend_from_slice(format!("{mode} {name}\0").as_bytes());
        bytes.extend_from_slice(&hex::decode(id).unwrap());
    }
    object(repo, "tree", &bytes)
}

fn blob(repo: &Path, text: &str) -> String {
    object(repo, "blob", text.as_bytes())
}

/// A commit on top of HEAD whose app `evil` holds `../../…/<target>` and whose app `good` is ordinary.
fn crafted_commit(repo: &Path, target: &Path) -> String {
    let payload = blob(repo, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: pwned}\n");
    // `<target dir>/<name>` reached from apps/evil/ through enough `..` entries to climb to /.
    let name = target.file_name().unwrap().to_str().unwrap();
    let mut t = tree(repo, &[("100644", name, &payload)]);
    let parts: Vec<&str> =
        target.parent().unwrap().components().skip(1).map(|c| c.as_os_str().to_str().unwrap()).collect();
    for dir in parts.iter().rev() {
        t = tree(repo, &[("40000", dir, &t)]);
    }
    for _ in 0..16 {
        t = tree(repo, &[("40000", "..", &t)]);
    }
    let evil = tree(
        repo,
        &[
            ("100644", "app.yaml", &blob(repo, "namespace: evil\nkustomize: {path: .}\ntargets: [{selector: {}}]\n")),
            ("100644", "kustomization.yaml", &blob(repo, "resources: []\n")),
            ("40000", "..", &t),
        ],
    );
    let good = tree(
        repo,
        &[
            ("100644", "app.yaml", &blob(repo, "namespace: good\ntargets: [{selector: {}}]\n")),
            (
                "100644",
                "cm.yaml",
                &blob(repo, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fine}\ndata: {v: '2'}\n"),
            ),
        ],
    );
    let apps = tree(repo, &[("40000", "evil", &evil), ("40000", "good", &good)]);
    let clusters = tree(repo, &[("100644", "c.yaml", &blob(repo, "labels: {}\n"))]);
    let root = tree(repo, &[("40000", "apps", &apps), ("40000", "clusters", &clusters)]);
    let commit = git(repo, &["commit-tree", &root, "-p", "HEAD", "-m", "crafted"]).trim().to_string();
    git(repo, &["update-ref", "refs/heads/main", &commit]);
    commit
}

fn flotilla(args: &[&str]) -> (bool, String) {
    let out = Command::new(binary("flotilla")).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_with_dot_dot_entries_is_refused_everywhere_and_writes_nothing() {
    flotilla_common::install_crypto_provider();
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    let target = tmp.join("outside").join("flotilla-pwned.yaml");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let repo = tmp.join("fleet");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    commit(
        &repo,
        &[
            ("clusters/c.yaml", Some("labels: {}\n")),
            ("apps/good/app.yaml", Some("namespace: good\ntargets: [{selector: {}}]\n")),
            ("apps/good/cm.yaml", Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fine}\ndata: {v: '1'}\n")),
        ],
        "first",
    );
    let crafted = crafted_commit(&repo, &target);
    let bare = tmp.join("bare.git");
    git(tmp, &["clone", "-q", "--bare", repo.to_str().unwrap(), bare.to_str().unwrap()]);

    // flotilla render --rev, from the bare repository.
    let (ok, out) = flotilla(&["render", "--repo", bare.to_str().unwrap(), "--rev", "main", "--cluster", "c"]);
    assert!(!ok, "{out}");
    assert!(out.contains("apps/evil/") && out.contains("with a . or .. path component: refused"), "{out}");
    let (ok, out) =
        flotilla(&["render", "--repo", bare.to_str().unwrap(), "--rev", "main", "--cluster", "c", "--app", "good"]);
    assert!(ok && out.contains("name: fine"), "the good app renders: {out}");

    // flotilla diff between the two revisions.
    let (ok, out) = flotilla(&["diff", "--repo", bare.to_str().unwrap(), "main~1", "main"]);
    assert!(!ok, "a broken newer revision exits 1: {out}");
    assert!(out.contains("with a . or .. path component: refused"), "{out}");
    assert!(out.contains("good"), "the good app's change is shown: {out}");

    // The hub following the repository.
    issue_certs(tmp, "c", "alice");
    let port = free_port();
    let _hub = start_hub(tmp, port, &format!("file://{}", bare.display()));
    let mut client = operator_client(&tmp.join("certs"), port).await;
    let view = eventually(60, "the hub at the crafted commit", || {
        let (mut client, crafted) = (client.clone(), crafted.clone());
        async move {
            let v = client.list_clusters(ListClustersRequest::default()).await.ok()?.into_inner();
            (!v.revision.is_empty() && crafted.starts_with(&v.revision[..7.min(v.revision.len())])).then_some(v)
        }
    })
    .await;
    let problems = view.problems.join("\n");
    assert!(
        problems.contains("apps/evil/") && problems.contains("with a . or .. path component: refused"),
        "{problems}"
    );
    let c = view.clusters.iter().find(|c| c.name == "c").unwrap();
    assert!(c.apps.iter().all(|a| a.app != "evil"), "the refused app reaches no cluster: {c:?}");
    let good = c.apps.iter().find(|a| a.app == "good").unwrap();
    assert!(good.error.is_empty(), "{good:?}");
    let _ = client.list_clusters(ListClustersRequest::default()).await.expect("the hub keeps answering");
    assert!(!target.exists(), "nothing was written outside");
    assert!(!Path::new("/flotilla-pwned.yaml").exists());
}

fn kubectl(kc: &Path, args: &[&str]) -> String {
    let out = Command::new("kubectl").arg("--kubeconfig").arg(kc).args(args).output().expect("kubectl");
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every file under `dir`, as bytes.
fn all_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p.display().to_string(), b));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// One connection from `src` that sends a webhook's headers and then a byte every few seconds.
async fn slow_body(src: std::net::Ipv4Addr, port: u16) -> Option<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4().ok()?;
    sock.bind((src, 0).into()).ok()?;
    let mut s = sock.connect(([127, 0, 0, 1], port).into()).await.ok()?;
    let head = "POST /hooks/git HTTP/1.1\r\nHost: hub\r\nX-GitHub-Event: push\r\nContent-Length: 1000\r\n\r\n{";
    s.write_all(head.as_bytes()).await.ok()?;
    Some(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifted_secret_shows_nowhere_and_a_webhook_flood_stops_nothing() {
    flotilla_common::install_crypto_provider();
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    eprintln!("work directory (logs): {}", tmp.display());
    issue_certs(tmp, "c", "alice");
    let repo = tmp.join("fleet");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let vault = "apiVersion: v1\nkind: Secret\nmetadata: {name: db}\nstringData: {password: from-git}\n";
    let note = |v: &str| format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: note}}\ndata: {{v: '{v}'}}\n");
    commit(
        &repo,
        &[
            ("clusters/c.yaml", Some("labels: {}\n")),
            ("apps/vault/app.yaml", Some("namespace: vault\ntargets: [{selector: {}}]\nsync: {drift: report}\n")),
            ("apps/vault/secret.yaml", Some(vault)),
            ("apps/notes/app.yaml", Some("namespace: notes\ntargets: [{selector: {}}]\n")),
            ("apps/notes/cm.yaml", Some(&note("1"))),
        ],
        "first",
    );
    let _sim = flotilla_e2e::start_sim(tmp, "c");
    let (port, hook) = (free_port(), free_port());
    let hook_args = vec!["--webhook-listen".to_string(), format!("127.0.0.1:{hook}")];
    let _hub = flotilla_e2e::start_hub_with(tmp, port, &format!("file://{}", repo.display()), &hook_args);
    let _agent = flotilla_e2e::start_agent(tmp, port, "c", "c");
    let certs = tmp.join("certs");
    let client = operator_client(&certs, port).await;
    let cluster = |client: &flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient<_>| {
        let mut client = client.clone();
        async move {
            client
                .get_cluster(flotilla_proto::platform::v1::GetClusterRequest { name: "c".into() })
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    };
    eventually(60, "both apps applied", || async {
        let c = cluster(&client).await?;
        (c.apps
            .iter()
            .filter(|a| a.applied.as_ref().is_some_and(|s| s.objects_applied == s.objects && s.objects > 0))
            .count()
            == 2)
            .then_some(())
    })
    .await;

    // Someone edits the Secret in the cluster; the app reports drift.
    let kc = tmp.join("kc/c.kubeconfig");
    let live = "live-hunter2";
    let live_b64 = "bGl2ZS1odW50ZXIy";
    kubectl(
        &kc,
        &[
            "patch",
            "-n",
            "vault",
            "secret/db",
            "--type=merge",
            "-p",
            &format!(r#"{{"data":{{"password":"{live_b64}"}}}}"#),
        ],
    );
    let c = eventually(60, "the drift reported", || async {
        let c = cluster(&client).await?;
        let v = c.apps.iter().find(|a| a.app == "vault")?.applied.clone()?;
        (v.drifted == 1).then_some(c)
    })
    .await;
    let v = c.apps.iter().find(|a| a.app == "vault").unwrap().applied.clone().unwrap();
    assert_eq!(v.drift[0].path, "/data/password", "{v:?}");
    let mut seen = Vec::new();
    for output in ["yaml", "json", "table"] {
        let (_, out) = flotilla(&[
            "cluster",
            "c",
            "--hub",
            &format!("https://localhost:{port}"),
            "--operator",
            "alice",
            "--certs",
            certs.to_str().unwrap(),
            "-o",
            output,
        ]);
        assert!(out.contains("vault"), "{out}");
        seen.push((format!("flotilla cluster -o {output}"), out.into_bytes()));
    }
    assert!(
        contains(&seen[0].1, "/data/password") && contains(&seen[0].1, "(redacted)"),
        "the drift is shown, redacted"
    );
    let store = all_bytes(&tmp.join("hub-data"));
    assert!(!store.is_empty(), "the hub's store was read");
    seen.extend(store);
    seen.extend(all_bytes(tmp).into_iter().filter(|(p, _)| p.ends_with(".log")));
    for (what, bytes) in &seen {
        assert!(!contains(bytes, live) && !contains(bytes, live_b64), "the live Secret value is in {what}");
    }
    assert_eq!(
        kubectl(&kc, &["get", "-n", "vault", "secret/db", "-o", "jsonpath={.data.password}"]),
        live_b64,
        "report only"
    );

    // A slow-body flood from many sources on the webhook: operators and agents are still served.
    let mut flood = Vec::new();
    for i in 0..400usize {
        let src = std::net::Ipv4Addr::new(127, 3 + (i / 250) as u8, 1, 2 + (i % 250) as u8);
        if let Some(s) = slow_body(src, hook).await {
            flood.push(s);
        }
    }
    assert!(flood.len() >= 300, "{} flood connections", flood.len());
    let started = std::time::Instant::now();
    let mut answered = client.clone();
    answered.list_clusters(ListClustersRequest::default()).await.expect("operators are answered during the flood");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "answered in {:?}", started.elapsed());
    commit(&repo, &[("apps/notes/cm.yaml", Some(&note("2")))], "second");
    let kube = flotilla_e2e::kube(&tmp.join("kc"), "c").await;
    eventually(60, "the new commit reaches the agent during the flood", || async {
        (flotilla_e2e::value(&kube, "notes", "note", "v").await.as_deref() == Some("2")).then_some(())
    })
    .await;
    drop(flood);
}
