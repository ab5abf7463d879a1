//! Helpers for end-to-end tests: the workspace's binaries as child processes, a fleet repository made with
//! the git CLI and served by `git daemon`, free loopback ports, bounded waits.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which `scripts/test.sh` does).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `target/<profile>/<name>` next to the running test binary.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} is not built; run: cargo build --workspace --bins", path.display());
    path
}

pub fn spawn(name: &str, args: &[String], log: &Path) -> Proc {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child = Command::new(binary(name))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    Proc { name: name.to_string(), child }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Fleet")
        .env("GIT_AUTHOR_EMAIL", "fleet@example.invalid")
        .env("GIT_COMMITTER_NAME", "Fleet")
        .env("GIT_COMMITTER_EMAIL", "fleet@example.invalid")
        .output()
        .unwrap_or_else(|e| panic!("git is not installed ({e}); install it with: apt-get install -y git"));
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Writes (or with `None` removes) files and commits them; returns the commit id.
pub fn commit(repo: &Path, files: &[(&str, Option<&str>)], msg: &str) -> String {
    for (p, c) in files {
        let path = repo.join(p);
        match c {
            Some(c) => {
                std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
                std::fs::write(&path, c).expect("write");
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-q", "--allow-empty", "-m", msg]);
    git(repo, &["rev-parse", "HEAD"])
}

/// `git daemon` exporting every repository under `base`.
pub fn git_daemon(base: &Path) -> (Proc, u16) {
    let port = free_port();
    // Run git-daemon itself: `git daemon` forks it as a child that outlives a killed parent.
    let exec_path = Command::new("git").arg("--exec-path").output().expect("git (apt-get install -y git)");
    let daemon = std::path::PathBuf::from(String::from_utf8_lossy(&exec_path.stdout).trim()).join("git-daemon");
    let child = Command::new(daemon)
        .args(["--reuseaddr", "--export-all", "--listen=127.0.0.1", &format!("--port={port}")])
        .arg(format!("--base-path={}", base.display()))
        .arg(base)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("git daemon (apt-get install -y git)");
    wait_for_port(port, "git daemon");
    (Proc { name: "git-daemon".into(), child }, port)
}

/// Polls `f` every 100 ms for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {secs}s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
