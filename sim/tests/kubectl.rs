//! Runs the real kubectl against the `flotilla-sim` binary: `tests/kubectl/kubectl-suite.sh` drives every
//! kubectl command the simulator promises to support.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Sim(Child);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn require_tool(tool: &str, install: &str) {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
    assert!(found, "{tool} is not installed; install it with: {install}");
}

fn start_sim(dir: &Path, cluster: &str) -> (Sim, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_flotilla-sim"))
        .args(["--listen", "127.0.0.1:0", "--cluster", cluster, "--ready-after-ms", "200", "--bookmark-ms", "1000"])
        .arg("--kubeconfig-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start flotilla-sim");
    let sim = Sim(child);
    let server_file = dir.join("server");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = std::fs::read_to_string(&server_file) {
            if !s.trim().is_empty() {
                return (sim, s.trim().to_string());
            }
        }
        assert!(Instant::now() < deadline, "flotilla-sim did not write {}", server_file.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `tests/kubectl/<name>` with bash against the cluster `cluster` of a fresh simulator in `dir`, with
/// `env` besides KUBECONFIG and HOME; returns (success, stdout, stderr), stdout printed.
fn run_script(dir: &Path, name: &str, cluster: &str, env: &[(&str, &std::ffi::OsStr)]) -> (bool, String, String) {
    let (_sim, server) = start_sim(dir, cluster);
    let script: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "kubectl", name].iter().collect();
    let out = Command::new("bash")
        .arg(&script)
        .env("KUBECONFIG", dir.join(format!("{cluster}.kubeconfig")))
        .env("SIM_ADMIN", format!("{server}/admin"))
        .env("SIM_CLUSTER", cluster)
        .env("HOME", dir)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    println!("{stdout}");
    (out.status.success(), stdout, String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn kubectl_accepts_the_simulator() {
    require_tool("kubectl", "see https://kubernetes.io/docs/tasks/tools/ (Debian: apt-get install -y kubectl)");
    require_tool("python3", "apt-get install -y python3");
    require_tool("diff", "apt-get install -y diffutils");
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, stdout, stderr) = run_script(dir.path(), "kubectl-suite.sh", "kubectl-suite", &[]);
    eprintln!("{stderr}");
    assert!(ok, "kubectl suite failed:\n{stdout}\n{stderr}");
    let script: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "kubectl", "kubectl-suite.sh"].iter().collect();
    let steps =
        std::fs::read_to_string(&script).expect("read the suite").lines().filter(|l| l.starts_with("step \"")).count();
    assert!(steps >= 20, "the suite has its steps");
    assert!(stdout.contains(&format!("{steps} passed, 0 failed")), "the suite did not run every step:\n{stdout}");
}

/// Where the kube-prometheus manifests are: `FLOTILLA_KUBE_PROMETHEUS`, or `shared/fixtures/kube-prometheus`
/// beside the repository.
fn kube_prometheus() -> PathBuf {
    if let Ok(p) = std::env::var("FLOTILLA_KUBE_PROMETHEUS") {
        return PathBuf::from(p);
    }
    [env!("CARGO_MANIFEST_DIR"), "..", "..", "shared", "fixtures", "kube-prometheus", "manifests"].iter().collect()
}

#[test]
#[ignore = "needs the kube-prometheus manifests: set FLOTILLA_KUBE_PROMETHEUS to their manifests/ directory (docs/sim.md)"]
fn kube_prometheus_applies_verbatim() {
    require_tool("kubectl", "see https://kubernetes.io/docs/tasks/tools/ (Debian: apt-get install -y kubectl)");
    let manifests = kube_prometheus();
    assert!(
        manifests.join("setup").is_dir(),
        "{} is not kube-prometheus' manifests/ directory (set FLOTILLA_KUBE_PROMETHEUS)",
        manifests.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, stdout, stderr) =
        run_script(dir.path(), "kube-prometheus.sh", "kube-prometheus", &[("MANIFESTS", manifests.as_os_str())]);
    assert!(ok, "kube-prometheus did not apply verbatim:\n{stdout}\n{stderr}");
    assert!(stdout.contains("objects applied and served"), "{stdout}");
}
