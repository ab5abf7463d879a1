//! The external renderers, run as processes: `kustomize build` or `kubectl kustomize` (whichever is
//! installed), and `helm template`. Each call runs in a box: a private copy of exactly the files it may read
//! in a temporary directory, an empty environment (no credentials, no kubeconfig), no network (a network
//! namespace of its own where the kernel allows one; remote references were refused before it started), and
//! limits on memory, time and output. Errors say what failed or what to install.

use crate::fleet::render::{HelmInvocation, Tools};
use crate::fleet::Tree;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What one kustomize or helm run may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub time: Duration,
    /// Address space (RLIMIT_AS), bytes.
    pub memory: u64,
    /// Bytes of output read; a renderer printing more is stopped.
    pub output: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { time: Duration::from_secs(120), memory: 2 << 30, output: 256 << 20 }
    }
}

/// Whether this machine gives a renderer a network namespace of its own (`unshare -rn`), asked once.
fn can_isolate_network() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        let ok = which("unshare").is_some_and(|u| {
            Command::new(u)
                .args(["-rn", "true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        if !ok {
            tracing::warn!(
                "renderers cannot get a network namespace of their own here (unshare -rn failed): remote \
                 references are still refused before a build starts"
            );
        }
        ok
    })
}

/// Finds `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

#[derive(Debug, Clone)]
enum Kustomize {
    Standalone(PathBuf),
    Kubectl(PathBuf),
}

/// The renderers found on this machine.
#[derive(Debug, Clone)]
pub struct SystemTools {
    kustomize: Option<Kustomize>,
    helm: Option<PathBuf>,
    pub limits: Limits,
}

impl Default for SystemTools {
    fn default() -> Self {
        Self::detect()
    }
}

impl SystemTools {
    pub fn detect() -> Self {
        let kustomize =
            which("kustomize").map(Kustomize::Standalone).or_else(|| which("kubectl").map(Kustomize::Kubectl));
        SystemTools { kustomize, helm: which("helm"), limits: Limits::default() }
    }

    /// Tools as found, but without helm (tests of the "helm is absent" path).
    pub fn without_helm(mut self) -> Self {
        self.helm = None;
        self
    }

    pub fn has_helm(&self) -> bool {
        self.helm.is_some()
    }

    /// `kustomize` or `kubectl`, the program used for Kustomize builds.
    pub fn kustomize_program(&self) -> Option<&Path> {
        match &self.kustomize {
            Some(Kustomize::Standalone(p) | Kustomize::Kubectl(p)) => Some(p),
            None => None,
        }
    }
}

fn materialize(files: &Tree) -> Result<tempfile::TempDir, String> {
    let dir = tempfile::Builder::new().prefix("flotilla-render-").tempdir().map_err(|e| e.to_string())?;
    for (path, bytes) in files {
        // Defense in depth: a tree entry that would land outside the private copy is never written.
        if let Some(why) = crate::fleet::unsafe_path(path) {
            return Err(format!("refusing to write {path:?}: {why}"));
        }
        let p = dir.path().join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(dir)
}

/// Whether `prlimit` (util-linux) is here to set a renderer's memory limit, asked once.
fn can_limit_memory() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        let ok = which("prlimit").is_some();
        if !ok {
            tracing::warn!("prlimit (util-linux) is not installed: renderers run without a memory limit");
        }
        ok
    })
}

/// A renderer's command in its box: the program with `args`, in `dir`, with an empty environment, no network
/// unless `network` (`unshare -rn`), and an address-space limit (`prlimit --as`).
fn boxed(program: &Path, args: &[&std::ffi::OsStr], dir: &Path, network: bool, limits: &Limits) -> Command {
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if !network && can_isolate_network() {
        argv.extend(["unshare".into(), "-rn".into()]);
    }
    if can_limit_memory() {
        argv.extend(["prlimit".into(), format!("--as={}", limits.memory).into(), "--".into()]);
    }
    argv.push(program.as_os_str().to_owned());
    argv.extend(args.iter().map(|a| a.to_os_string()));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).current_dir(dir).env_clear().env("HOME", dir);
    cmd.env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

/// Runs `cmd` to completion within `limit`, returning stdout, or stderr (trimmed) as the error.
pub fn run(cmd: Command, limit: Duration) -> Result<String, String> {
    run_limited(cmd, &Limits { time: limit, ..Limits::default() })
}

fn bytes(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

/// Runs `cmd` within `limits` (time and output; memory is set where the command is made).
pub fn run_limited(mut cmd: Command, limits: &Limits) -> Result<String, String> {
    // The renderer's name, not its box's (`unshare -rn prlimit --as=… -- kubectl …`).
    let mut words = std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy());
    let program = match cmd.get_program().to_string_lossy().as_ref() {
        "unshare" | "prlimit" => words
            .find(|w| w.starts_with('/') && !w.ends_with("/unshare") && !w.ends_with("/prlimit"))
            .map_or_else(|| "the renderer".to_string(), |w| w.rsplit('/').next().unwrap_or(&w).to_string()),
        _ => cmd.get_program().to_string_lossy().into_owned(),
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let cap = limits.output;
    let over = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let over_out = over.clone();
    let out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = (&mut stdout).take(cap as u64 + 1).read_to_end(&mut s);
        if s.len() > cap {
            over_out.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = (&mut stderr).take(1 << 20).read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + limits.time;
    let status = loop {
        if over.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{program} printed more than {}: stopped", bytes(cap)));
        }
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{program} did not finish within {} s", limits.time.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("waiting for {program}: {e}")),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if over.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(format!("{program} printed more than {}: stopped", bytes(cap)));
    }
    if status.success() {
        String::from_utf8(stdout).map_err(|e| format!("{program} printed invalid UTF-8: {e}"))
    } else {
        let msg = String::from_utf8_lossy(&stderr).trim().to_string();
        if msg.contains("fatal error: out of memory") || msg.contains("runtime: out of memory") {
            return Err(format!("{program} ran out of its memory limit ({} MiB)", limits.memory >> 20));
        }
        Err(if msg.is_empty() { format!("{program} exited with {status}") } else { msg })
    }
}

/// kubectl logs failures as `E1126 16:53:07.654 6194 run.go:72] "command failed" err="..."`; keep the `err`.
fn klog_message(stderr: &str) -> String {
    let Some(start) = stderr.find(" err=\"") else { return stderr.to_string() };
    let quoted = &stderr[start + 5..];
    let end = quoted.lines().next().map_or(quoted.len(), str::len);
    serde_json::from_str::<String>(quoted[..end].trim_end()).unwrap_or_else(|_| stderr.to_string())
}

impl Tools for SystemTools {
    fn kustomize(&self, files: &Tree, dir: &str, network: bool) -> Result<String, String> {
        let Some(k) = &self.kustomize else {
            return Err("neither kustomize nor kubectl is installed: install kubectl (it includes kustomize, \
                        https://kubernetes.io/docs/tasks/tools/) or kustomize \
                        (https://kubectl.docs.kubernetes.io/installation/kustomize/)"
                .into());
        };
        let tmp = materialize(files)?;
        let target = tmp.path().join(dir);
        let (program, verb) = match k {
            Kustomize::Standalone(p) => (p, "build"),
            Kustomize::Kubectl(p) => (p, "kustomize"),
        };
        let cmd = boxed(program, &[verb.as_ref(), target.as_os_str()], tmp.path(), network, &self.limits);
        // Paths in messages are the app's own, not the temporary directory's.
        let root = format!("{}/", tmp.path().display());
        run_limited(cmd, &self.limits)
            .map_err(|e| klog_message(&e).replace(&root, "").replace(&tmp.path().display().to_string(), "."))
    }

    fn helm_template(&self, files: &Tree, helm: &HelmInvocation) -> Result<String, String> {
        let Some(program) = &self.helm else {
            return Err(
                "helm is not installed: install helm to render Helm charts (https://helm.sh/docs/intro/install/)"
                    .into(),
            );
        };
        let tmp = materialize(files)?;
        let values = tmp.path().join(".flotilla-values.yaml");
        std::fs::write(&values, &helm.values_yaml).map_err(|e| e.to_string())?;
        let chart = tmp.path().join(&helm.chart);
        let args = helm.args(&chart.to_string_lossy(), &values.to_string_lossy());
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        // `helm template` of a local chart needs no network: its dependencies must be vendored (charts/).
        let cmd = boxed(program, &args, tmp.path(), false, &self.limits);
        let root = format!("{}/", tmp.path().display());
        run_limited(cmd, &self.limits).map_err(|e| e.replace(&root, ""))
    }
}
