//! Helpers for end-to-end tests: the workspace's binaries as child processes, a fleet repository made with
//! the git CLI and served by `git daemon`, free loopback ports, bounded waits.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which `scripts/test.sh` does).

use flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

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

/// `flotilla certs` into `dir/certs` for `clusters` and `operators` (comma-separated).
pub fn issue_certs(dir: &Path, clusters: &str, operators: &str) {
    let out = Command::new(binary("flotilla"))
        .args(["certs", "--dir"])
        .arg(dir.join("certs"))
        .args(["--cluster", clusters, "--operator", operators])
        .output()
        .expect("running flotilla certs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A new repository at `dir/served/fleet.git` (branch main), for `git_daemon(dir/served)`.
pub fn new_repo(dir: &Path) -> PathBuf {
    let repo = dir.join("served").join("fleet.git");
    std::fs::create_dir_all(&repo).expect("mkdir");
    git(&repo, &["init", "-q", "-b", "main"]);
    repo
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

// The hub, agents, clusters and the platform API, as the end-to-end tests use them.

pub async fn kube(kubeconfigs: &Path, cluster: &str) -> kube::Client {
    let kc = Kubeconfig::read_from(kubeconfigs.join(format!("{cluster}.kubeconfig"))).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("config");
    kube::Client::try_from(cfg).expect("client")
}

pub async fn value(client: &kube::Client, ns: &str, name: &str, key: &str) -> Option<String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    api.get_opt(name).await.ok().flatten().and_then(|c| c.data).and_then(|d| d.get(key).cloned())
}

pub async fn operator_client(certs: &Path, port: u16) -> PlatformServiceClient<Channel> {
    platform_client_as(certs, port, "operators/alice").await
}

/// The platform API as whoever holds `certs/<who>.pem` (`operators/alice`, `clusters/eu-1`).
pub async fn platform_client_as(certs: &Path, port: u16, who: &str) -> PlatformServiceClient<Channel> {
    let read = |f: &str| std::fs::read_to_string(certs.join(f)).expect("cert");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(read(&format!("{who}.pem")), read(&format!("{who}-key.pem"))))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting as {who}: {e}"));
    PlatformServiceClient::new(channel)
}

pub fn start_hub(tmp: &Path, port: u16, repo_url: &str) -> Proc {
    start_hub_with(tmp, port, repo_url, &[])
}

/// The hub binary on `port`, data in `tmp/hub-data`, certificates from `tmp/certs`, polling every second
/// unless `extra` says otherwise.
pub fn start_hub_with(tmp: &Path, port: u16, repo_url: &str, extra: &[String]) -> Proc {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--repo".into(),
        repo_url.into(),
        "--data-dir".into(),
        tmp.join("hub-data").display().to_string(),
        "--certs".into(),
        tmp.join("certs").display().to_string(),
    ];
    if !extra.iter().any(|a| a == "--poll-seconds") {
        args.extend(["--poll-seconds".to_string(), "1".to_string()]);
    }
    args.extend_from_slice(extra);
    let p = spawn("flotilla-hub", &args, &tmp.join(format!("hub-{}.log", std::process::id())));
    wait_for_port(port, "flotilla-hub");
    p
}

pub fn start_agent(tmp: &Path, hub_port: u16, cluster: &str, cert_name: &str) -> Proc {
    start_agent_with(tmp, &format!("https://localhost:{hub_port}"), cluster, cert_name, &[], "")
}

/// An agent of `cluster` with `cert_name`'s certificate for the hubs `hubs` (comma-separated URLs), more
/// arguments, its log at `tmp/agent-<cluster>-as-<cert_name><tag>.log`.
pub fn start_agent_with(tmp: &Path, hubs: &str, cluster: &str, cert_name: &str, extra: &[&str], tag: &str) -> Proc {
    let certs = tmp.join("certs");
    let mut args: Vec<String> = vec![
        "--hub".into(),
        hubs.into(),
        "--ca".into(),
        certs.join("ca.pem").display().to_string(),
        "--cert".into(),
        certs.join(format!("clusters/{cert_name}.pem")).display().to_string(),
        "--key".into(),
        certs.join(format!("clusters/{cert_name}-key.pem")).display().to_string(),
        "--kubeconfig".into(),
        tmp.join("kc").join(format!("{cluster}.kubeconfig")).display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    spawn("flotilla-agent", &args, &tmp.join(format!("agent-{cluster}-as-{cert_name}{tag}.log")))
}

/// The simulator serving `clusters` (comma-separated), kubeconfigs in `tmp/kc`; returns once it serves.
pub fn start_sim(tmp: &Path, clusters: &str) -> Proc {
    let args: Vec<String> = ["--listen", "127.0.0.1:0", "--cluster", clusters, "--kubeconfig-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([tmp.join("kc").display().to_string()])
        .collect();
    let p = spawn("flotilla-sim", &args, &tmp.join("sim.log"));
    let end = Instant::now() + Duration::from_secs(20);
    while !tmp.join("kc/server").exists() {
        assert!(Instant::now() < end, "the simulator did not start: {}", tmp.join("sim.log").display());
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

/// A fleet repository at `tmp/fleet` (branch main) with one commit of `files`.
pub fn fleet_repo_with(tmp: &Path, files: &[(&str, Option<&str>)]) -> PathBuf {
    let repo = tmp.join("fleet");
    std::fs::create_dir_all(&repo).expect("repo dir");
    git(&repo, &["init", "-q", "-b", "main"]);
    commit(&repo, files, "first");
    repo
}

/// `GET path` on a loopback port: the status code (0: no answer) and the body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new()) };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes());
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
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

/// Smart HTTP Git: `git http-backend` (CGI) behind a small loopback HTTP/1.1 server that demands Basic
/// credentials when `credentials` is `Some(("user", "password"))`. Serves every repository under `root` at
/// `http://127.0.0.1:PORT/<name>.git`. The server thread ends with the test process.
pub fn git_http_server(root: &Path, credentials: Option<(&str, &str)>) -> u16 {
    serve_git(root, credentials, None)
}

/// [`git_http_server`] over TLS, with a server certificate for 127.0.0.1 from a fresh fleet CA. Returns the
/// port and the CA certificate's PEM: clients trust it through `SSL_CERT_FILE`, as they would a private CA.
pub fn git_https_server(root: &Path, credentials: Option<(&str, &str)>) -> (u16, String) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    flotilla_common::install_crypto_provider();
    let ca = flotilla_common::FleetCa::generate("git-test").expect("CA");
    let issued = ca
        .issue(&flotilla_common::Identity::Hub, &["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("server certificate");
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes()).collect::<Result<_, _>>().expect("cert pem");
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key pem");
    let config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).expect("tls");
    (serve_git(root, credentials, Some(std::sync::Arc::new(config))), ca.cert_pem().to_string())
}

fn serve_git(root: &Path, credentials: Option<(&str, &str)>, tls: Option<std::sync::Arc<rustls::ServerConfig>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let root = root.to_path_buf();
    let expected = credentials.map(|(u, p)| format!("Basic {}", base64_encode(format!("{u}:{p}").as_bytes())));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (root, expected, tls) = (root.clone(), expected.clone(), tls.clone());
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let _ = match tls {
                    Some(config) => match rustls::ServerConnection::new(config) {
                        Ok(conn) => serve_git_http(rustls::StreamOwned::new(conn, stream), &root, expected.as_deref()),
                        Err(_) => Ok(()),
                    },
                    None => serve_git_http(stream, &root, expected.as_deref()),
                };
            });
        }
    });
    port
}

fn base64_encode(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn serve_git_http<S: std::io::Read + std::io::Write>(
    stream: S,
    root: &Path,
    expected: Option<&str>,
) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("/").to_string());
    let mut headers = std::collections::HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if let Some(len) = headers.get("content-length").and_then(|l| l.parse::<usize>().ok()) {
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else if headers.get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    if let Some(want) = expected {
        if headers.get("authorization").map(String::as_str) != Some(want) {
            let msg = "authentication required\n";
            let out = reader.get_mut();
            write!(
                out,
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"fleet\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}",
                msg.len()
            )?;
            return out.flush();
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut cmd = Command::new("git");
    cmd.arg("http-backend")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", "fleet")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "safe.directory")
        .env("GIT_CONFIG_VALUE_0", "*");
    for (h, env) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "GIT_PROTOCOL"),
    ] {
        if let Some(v) = headers.get(h) {
            cmd.env(env, v);
        }
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let output = child.wait_with_output()?;
    let _ = writer.join();
    let raw = output.stdout;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    let split = split.or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let (head, content) = match split {
        Some((i, n)) => (String::from_utf8_lossy(&raw[..i]).to_string(), &raw[i + n..]),
        None => (String::new(), &raw[..]),
    };
    let mut status = "200 OK".to_string();
    let mut response = Vec::new();
    for h in head.lines() {
        match h.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("status") => status = v.trim().to_string(),
            Some(_) => response.extend_from_slice(format!("{h}\r\n").as_bytes()),
            None => {}
        }
    }
    let out = reader.get_mut();
    write!(out, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", content.len())?;
    out.write_all(&response)?;
    out.write_all(b"\r\n")?;
    out.write_all(content)?;
    out.flush()
}

/// PATCHes the simulator's admin API.
pub fn admin_patch(server: &str, path: &str, body: &str) {
    let addr = server.trim_start_matches("http://").trim_end_matches('/');
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("simulator admin API");
    write!(
        s,
        "PATCH {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{path}: {out}");
}

/// A real etcd (Debian's etcd-server) on loopback ports, for the hub's replicas.
pub mod etcd {
    use super::*;

    pub struct Etcd {
        pub port: u16,
        child: std::process::Child,
        _dir: tempfile::TempDir,
    }

    impl Etcd {
        /// Starts etcd with its data in a temporary directory and waits until it answers.
        pub fn start() -> Etcd {
            Self::start_with(None)
        }

        /// Starts etcd serving TLS with the fleet's hub certificate and asking clients for a certificate of the
        /// fleet's CA (`certs` as `flotilla certs` writes it).
        pub fn start_tls(certs: &Path) -> Etcd {
            Self::start_with(Some(certs))
        }

        fn start_with(certs: Option<&Path>) -> Etcd {
            let program =
                ["etcd", "/usr/bin/etcd"].into_iter().find(|p| Command::new(p).arg("--version").output().is_ok());
            let program = program.expect("etcd is needed: apt-get install etcd-server (scripts/test.sh installs it)");
            let dir = tempfile::tempdir().expect("temp dir");
            let (client, peer) = (free_port(), free_port());
            let scheme = if certs.is_some() { "https" } else { "http" };
            let c = format!("{scheme}://127.0.0.1:{client}");
            let p = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log");
            let mut cmd = Command::new(program);
            if let Some(certs) = certs {
                cmd.arg("--cert-file").arg(certs.join("hub.pem"));
                cmd.arg("--key-file").arg(certs.join("hub-key.pem"));
                cmd.arg("--trusted-ca-file").arg(certs.join("ca.pem"));
                cmd.arg("--client-cert-auth");
            }
            let child = cmd
                .args(["--name", "t", "--data-dir"])
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
                .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
                .args(["--initial-cluster", &format!("t={p}"), "--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("starting etcd");
            wait_for_port(client, "etcd");
            Etcd { port: client, child, _dir: dir }
        }

        /// `etcd://127.0.0.1:PORT`, as `flotilla-hub --store` takes it.
        pub fn url(&self) -> String {
            format!("etcd://127.0.0.1:{}", self.port)
        }
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A cluster of etcd members on loopback, each of which can be stopped and started again (same data).
    pub struct EtcdCluster {
        members: Vec<Member>,
        _dir: tempfile::TempDir,
    }

    struct Member {
        name: String,
        client: u16,
        args: Vec<String>,
        child: Option<std::process::Child>,
        log: std::path::PathBuf,
    }

    impl Member {
        fn start(&mut self) {
            let program = ["etcd", "/usr/bin/etcd"]
                .into_iter()
                .find(|p| Command::new(p).arg("--version").output().is_ok())
                .expect("etcd is needed: apt-get install etcd-server (scripts/test.sh installs it)");
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
            let child = Command::new(program)
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("starting etcd");
            self.child = Some(child);
        }
    }

    impl EtcdCluster {
        /// Starts `n` members and waits until every one answers.
        pub fn start(n: usize) -> EtcdCluster {
            let dir = tempfile::tempdir().expect("temp dir");
            let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
            let initial: Vec<String> =
                ports.iter().enumerate().map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}")).collect();
            let mut members: Vec<Member> = ports
                .iter()
                .enumerate()
                .map(|(i, (c, p))| {
                    let (c, p) = (format!("http://127.0.0.1:{c}"), format!("http://127.0.0.1:{p}"));
                    let args: Vec<String> = [
                        "--name",
                        &format!("m{i}"),
                        "--data-dir",
                        &dir.path().join(format!("m{i}")).display().to_string(),
                        "--listen-client-urls",
                        &c,
                        "--advertise-client-urls",
                        &c,
                        "--listen-peer-urls",
                        &p,
                        "--initial-advertise-peer-urls",
                        &p,
                        "--initial-cluster",
                        &initial.join(","),
                        "--initial-cluster-token",
                        "flotilla-test",
                        "--heartbeat-interval",
                        "100",
                        "--election-timeout",
                        "1000",
                        "--log-level",
                        "warn",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                    Member {
                        name: format!("m{i}"),
                        client: ports[i].0,
                        args,
                        child: None,
                        log: dir.path().join(format!("m{i}.log")),
                    }
                })
                .collect();
            for m in &mut members {
                m.start();
            }
            for m in &members {
                wait_for_port(m.client, "etcd");
            }
            EtcdCluster { members, _dir: dir }
        }

        /// `etcd://` with every member, as `flotilla-hub --store` takes it.
        pub fn url(&self) -> String {
            let all: Vec<String> = self.members.iter().map(|m| format!("127.0.0.1:{}", m.client)).collect();
            format!("etcd://{}", all.join(","))
        }

        /// Kills member `i` (kill -9).
        pub fn stop(&mut self, i: usize) {
            if let Some(mut c) = self.members[i].child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            eprintln!("etcd member {} stopped", self.members[i].name);
        }

        /// Starts member `i` again on its data.
        pub fn resume(&mut self, i: usize) {
            self.members[i].start();
            wait_for_port(self.members[i].client, "etcd");
            eprintln!("etcd member {} started again", self.members[i].name);
        }
    }

    impl Drop for EtcdCluster {
        fn drop(&mut self) {
            for i in 0..self.members.len() {
                self.stop(i);
            }
        }
    }
}
