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
