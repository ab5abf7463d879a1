//! The Git follower against real repositories made with the git CLI, over file:// and git:// (git daemon).

use flotilla_e2e::{self as support, git, git_daemon, Proc};
use flotilla_hub::git::{Follower, GitError};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn commit(repo: &Path, files: &[(&str, &str)], msg: &str) -> String {
    let files: Vec<(&str, Option<&str>)> = files.iter().map(|(p, c)| (*p, Some(*c))).collect();
    support::commit(repo, &files, msg)
}

fn fleet_repo(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    commit(
        dir,
        &[("clusters/eu-1.yaml", "labels: {region: eu}\n"), ("apps/shop/app.yaml", "namespace: shop\n")],
        "first",
    )
}

#[test]
fn follows_a_branch_over_file_urls_incrementally() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("fleet");
    let first = fleet_repo(&repo);
    let f = Follower::new(format!("file://{}", repo.display()), "main", tmp.path().join("cache"));
    let snap = f.fetch().unwrap();
    assert_eq!(snap.revision, first);
    assert_eq!(snap.tree["clusters/eu-1.yaml"], b"labels: {region: eu}\n");
    assert_eq!(snap.tree.len(), 2);

    let second = commit(&repo, &[("apps/shop/cm.yaml", "kind: ConfigMap\n")], "second");
    let snap = f.fetch().unwrap();
    assert_eq!(snap.revision, second);
    assert!(snap.tree.contains_key("apps/shop/cm.yaml"));
    // The second fetch reused the clone: one pack from the clone, more only for new objects.
    assert!(f.dir().join("HEAD").exists());
}

#[test]
fn follows_a_branch_served_by_git_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("served");
    let repo = base.join("fleet.git");
    let first = fleet_repo(&repo);
    let (_daemon, port) = git_daemon(&base);
    let f = Follower::new(format!("git://127.0.0.1:{port}/fleet.git"), "main", tmp.path().join("cache"));
    assert_eq!(f.fetch().unwrap().revision, first);
    let second = commit(&repo, &[("clusters/us-1.yaml", "labels: {region: us}\n")], "second");
    let snap = f.fetch().unwrap();
    assert_eq!(snap.revision, second);
    assert!(snap.tree.contains_key("clusters/us-1.yaml"));
}

#[test]
fn errors_name_the_url_or_branch() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("fleet");
    fleet_repo(&repo);
    let f = Follower::new(format!("file://{}", repo.display()), "release", tmp.path().join("cache"));
    match f.fetch() {
        Err(e @ GitError::BranchMissing { .. }) => assert!(e.to_string().contains("\"release\""), "{e}"),
        other => panic!("expected BranchMissing, got {other:?}"),
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("git://127.0.0.1:{port}/nothing.git");
    let f = Follower::new(url.clone(), "main", tmp.path().join("cache2"));
    let e = f.fetch().unwrap_err();
    assert!(e.to_string().contains(&url), "{e}");
    assert!(!tmp.path().join("cache2/HEAD").exists(), "a failed clone leaves nothing behind");
}

/// Smart HTTP: `git http-backend` behind Python's CGI server.
#[test]
fn follows_a_branch_over_smart_http() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    // The CGI server runs scripts as nobody when started as root: let it read the repository.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let served = tmp.path().join("served");
    let repo = served.join("fleet.git");
    let first = fleet_repo(&repo);
    let cgi = tmp.path().join("www/cgi-bin");
    std::fs::create_dir_all(&cgi).unwrap();
    std::fs::write(
        cgi.join("git"),
        format!(
            "#!/bin/sh\nexport GIT_PROJECT_ROOT={}\nexport GIT_HTTP_EXPORT_ALL=1\nexport GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*'\nexec git http-backend\n",
            served.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(cgi.join("git"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("python3")
        .args(["-m", "http.server", "--cgi", "--bind", "127.0.0.1", &port.to_string()])
        .current_dir(tmp.path().join("www"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 (apt-get install -y python3)");
    let _server = Proc { name: "http-server".into(), child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the HTTP server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let f = Follower::new(format!("http://127.0.0.1:{port}/cgi-bin/git/fleet.git"), "main", tmp.path().join("cache"));
    assert_eq!(f.fetch().unwrap().revision, first);
    let second = commit(&repo, &[("apps/web/app.yaml", "namespace: web\n")], "second");
    assert_eq!(f.fetch().unwrap().revision, second);
}
