//! The Git follower against real repositories made with the git CLI, over file://, git:// (git daemon) and
//! smart HTTP with and without credentials.

use flotilla_e2e::{self as support, git, git_daemon, git_http_server, git_https_server};
use flotilla_hub::git::{Follower, GitAuth, GitError, Secret};
use flotilla_hub::server::error_chain;
use std::net::TcpListener;
use std::path::Path;

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

/// Smart HTTP: `git http-backend` behind a loopback server.
#[test]
fn follows_a_branch_over_smart_http() {
    let tmp = tempfile::tempdir().unwrap();
    let served = tmp.path().join("served");
    let repo = served.join("fleet.git");
    let first = fleet_repo(&repo);
    let port = git_http_server(&served, None);
    let f = Follower::new(format!("http://127.0.0.1:{port}/fleet.git"), "main", tmp.path().join("cache"));
    assert_eq!(f.fetch().unwrap().revision, first);
    let second = commit(&repo, &[("apps/web/app.yaml", "namespace: web\n")], "second");
    assert_eq!(f.fetch().unwrap().revision, second);
}

/// A private repository over HTTPS: basic credentials, and a token read from a file at every fetch. The
/// server's certificate comes from a private CA, trusted through `SSL_CERT_FILE` as an operator would.
#[test]
fn private_repositories_over_https_need_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let served = tmp.path().join("served");
    let repo = served.join("fleet.git");
    let first = fleet_repo(&repo);
    let (port, ca_pem) = git_https_server(&served, Some(("x-access-token", "s3cret-token")));
    std::fs::write(tmp.path().join("ca.pem"), ca_pem).unwrap();
    // nextest runs each test in its own process: this affects this test alone.
    std::env::set_var("SSL_CERT_FILE", tmp.path().join("ca.pem"));
    let url = format!("https://127.0.0.1:{port}/fleet.git");

    let anonymous = Follower::new(url.clone(), "main", tmp.path().join("anon"));
    let e = error_chain(&anonymous.fetch().unwrap_err());
    assert!(e.starts_with(&format!("cloning {url} failed")), "{e}");
    assert!(!tmp.path().join("anon/HEAD").exists());

    let wrong = Follower::new(url.clone(), "main", tmp.path().join("wrong"))
        .with_auth(GitAuth::Basic { username: "x-access-token".into(), password: Secret::Literal("nope".into()) });
    assert!(wrong.fetch().is_err());

    // Credentials are never sent in clear text.
    let plain_port = git_http_server(&served, Some(("x-access-token", "s3cret-token")));
    let plain =
        Follower::new(format!("http://127.0.0.1:{plain_port}/fleet.git"), "main", tmp.path().join("plain")).with_auth(
            GitAuth::Basic { username: "x-access-token".into(), password: Secret::Literal("s3cret-token".into()) },
        );
    let e = error_chain(&plain.fetch().unwrap_err());
    assert!(e.contains("Will not send credentials in clear text over http"), "{e}");

    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let f = Follower::new(url.clone(), "main", tmp.path().join("cache"))
        .with_auth(GitAuth::Basic { username: "x-access-token".into(), password: Secret::File(token_file.clone()) });
    assert_eq!(f.fetch().unwrap().revision, first);
    let second = commit(&repo, &[("apps/web/app.yaml", "namespace: web\n")], "second");
    assert_eq!(f.fetch().unwrap().revision, second, "incremental fetch with credentials");

    // A revoked token fails the next fetch with the reason; the clone stays for when it is fixed.
    std::fs::write(&token_file, "revoked\n").unwrap();
    let e = error_chain(&f.fetch().unwrap_err());
    assert!(e.starts_with(&format!("fetching {url} failed")), "{e}");
    std::fs::remove_file(&token_file).unwrap();
    let e = error_chain(&f.fetch().unwrap_err());
    assert!(e.contains("reading the Git password or token"), "{e}");
}

/// A private repository over SSH: a real sshd on a loopback port, a key file, the host key pinned on first use.
#[test]
fn follows_a_private_repository_over_ssh_with_a_key() {
    let sshd = std::path::Path::new("/usr/sbin/sshd");
    assert!(sshd.exists(), "sshd is not installed; install it with: apt-get install -y openssh-server");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let keygen = |name: &str| {
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(name))
            .output()
            .expect("ssh-keygen (apt-get install -y openssh-client)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    keygen("host_key");
    keygen("hub_key");
    keygen("stranger_key");
    std::fs::copy(dir.join("hub_key.pub"), dir.join("authorized_keys")).unwrap();
    let port = support::free_port();
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nPidFile {d}/sshd.pid\n",
            d = dir.display()
        ),
    )
    .unwrap();
    // Privilege separation needs this directory when sshd starts as root.
    let _ = std::fs::create_dir_all("/run/sshd");
    let child = std::process::Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .expect("starting sshd");
    let _sshd = support::Proc { name: "sshd".into(), child };
    support::wait_for_port(port, "sshd");

    let repo = dir.join("fleet.git");
    let first = fleet_repo(&repo);
    let id = std::process::Command::new("id").arg("-un").output().expect("id");
    let user = String::from_utf8_lossy(&id.stdout).trim().to_string();
    let url = format!("ssh://{user}@127.0.0.1:{port}{}", repo.display());

    let stranger = Follower::new(url.clone(), "main", dir.join("stranger"))
        .with_auth(GitAuth::Ssh { key_file: dir.join("stranger_key"), known_hosts: None });
    let e = error_chain(&stranger.fetch().unwrap_err());
    assert!(e.starts_with(&format!("cloning {url} failed")), "{e}");

    let f = Follower::new(url.clone(), "main", dir.join("cache"))
        .with_auth(GitAuth::Ssh { key_file: dir.join("hub_key"), known_hosts: None });
    assert_eq!(
        f.fetch().unwrap().revision,
        first,
        "sshd log: {}",
        std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
    );
    let pinned = std::fs::read_to_string(dir.join("cache.known_hosts")).expect("the host key is pinned on first use");
    assert!(pinned.contains("ssh-ed25519"), "{pinned}");
    let second = commit(&repo, &[("apps/web/app.yaml", "namespace: web\n")], "second");
    assert_eq!(f.fetch().unwrap().revision, second, "incremental fetch over SSH");

    // A changed host key is refused: the pinned key protects against a server in the middle.
    let wrong = format!("[127.0.0.1]:{port} {}", std::fs::read_to_string(dir.join("stranger_key.pub")).unwrap());
    std::fs::write(dir.join("cache.known_hosts"), wrong).unwrap();
    assert!(f.fetch().is_err(), "a host key other than the pinned one is refused");
}

#[test]
fn ssh_uses_the_key_file_and_pins_host_keys() {
    let auth = GitAuth::Ssh { key_file: "/etc/flotilla/id_ed25519".into(), known_hosts: None };
    assert_eq!(
        auth.config_overrides(std::path::Path::new("/data/repo.git")),
        vec!["core.sshCommand=ssh -i '/etc/flotilla/id_ed25519' -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile='/data/repo.known_hosts' -o StrictHostKeyChecking=accept-new"]
    );
    let pinned = GitAuth::Ssh { key_file: "/k".into(), known_hosts: Some("/etc/ssh/known".into()) };
    assert!(pinned
        .config_overrides(std::path::Path::new("/d"))
        .join(" ")
        .ends_with("UserKnownHostsFile='/etc/ssh/known' -o StrictHostKeyChecking=yes"));
    assert_eq!(format!("{:?}", Secret::Literal("hunter2".into())), "Secret(<redacted>)");
}

/// A committed symbolic link is a link, not the file it names: the hub never reads what it points at (the fleet
/// CA's key, /etc/passwd), on the follower and in the offline snapshot alike.
#[test]
fn committed_symbolic_links_are_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("fleet");
    fleet_repo(&repo);
    std::os::unix::fs::symlink("/etc/passwd", repo.join("apps/shop/passwd.yaml")).unwrap();
    std::os::unix::fs::symlink("../../../secret", repo.join("apps/shop/up.yaml")).unwrap();
    std::fs::write(tmp.path().join("secret"), "-----BEGIN PRIVATE KEY-----").unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "links"]);
    let f = Follower::new(format!("file://{}", repo.display()), "main", tmp.path().join("cache"));
    let snap = f.fetch().unwrap();
    assert!(!snap.tree.keys().any(|k| k.ends_with("passwd.yaml") || k.ends_with("up.yaml")), "{:?}", snap.tree.keys());
    let offline = flotilla_hub::git::snapshot_at(&repo, "HEAD").unwrap();
    assert_eq!(offline.tree.keys().collect::<Vec<_>>(), snap.tree.keys().collect::<Vec<_>>());
    assert!(offline
        .tree
        .values()
        .all(|v| !String::from_utf8_lossy(v).contains("root:") && !String::from_utf8_lossy(v).contains("PRIVATE")));
}

/// A file over the size limit is never loaded whole: the snapshot holds its size, and its app alone is refused.
#[test]
fn a_huge_file_is_not_loaded_and_refuses_only_its_app() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("fleet");
    fleet_repo(&repo);
    let huge = vec![b'#'; (flotilla_common::fleet::MAX_FILE_BYTES + 1) as usize];
    std::fs::write(repo.join("apps/shop/huge.yaml"), &huge).unwrap();
    commit(&repo, &[("apps/other/app.yaml", "namespace: other\n")], "huge");
    let f = Follower::new(format!("file://{}", repo.display()), "main", tmp.path().join("cache"));
    let snap = f.fetch().unwrap();
    let held = &snap.tree["apps/shop/huge.yaml"];
    assert!(held.len() < 100, "the file was loaded: {} bytes", held.len());
    let fleet = flotilla_common::fleet::parse(&snap.tree);
    let e = fleet.apps["shop"].spec.as_ref().unwrap_err().to_string();
    assert!(e.contains("huge.yaml is 8.0 MiB: files over 8.0 MiB are refused"), "{e}");
    assert!(fleet.apps["other"].spec.is_ok());
}

/// Credentials written into the repository URL appear in no error, log field or answer.
#[test]
fn credentials_in_the_url_are_never_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let f = Follower::new("http://alice:s3cret-token@127.0.0.1:9/fleet.git", "main", tmp.path().join("cache"));
    assert_eq!(f.url(), "http://***@127.0.0.1:9/fleet.git");
    let e = f.fetch().unwrap_err();
    let text = error_chain(&e);
    assert!(!text.contains("s3cret-token") && !text.contains("alice:"), "{text}");
    assert!(text.contains("http://***@127.0.0.1:9/fleet.git"), "{text}");
    assert_eq!(flotilla_hub::git::redacted_url("https://github.com/org/fleet.git"), "https://github.com/org/fleet.git");
    assert_eq!(flotilla_hub::git::redacted_url("ssh://git@host/fleet.git"), "ssh://git@host/fleet.git");
    assert_eq!(flotilla_hub::git::redacted_url("ssh://git:pw@host/fleet.git"), "ssh://***@host/fleet.git");
    assert_eq!(
        flotilla_hub::git::redacted_url("https://ghp_token@github.com/o/f.git"),
        "https://***@github.com/o/f.git"
    );
}

/// The store holds reports and bundles (Secrets among them): only the hub's user may read it.
#[test]
fn the_store_file_is_readable_by_the_hub_alone() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("hub").join("store.redb");
    let _store = flotilla_hub::store::RedbStore::open(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
}
