//! The external renderers, run as processes: `kustomize build` or `kubectl kustomize` (whichever is
//! installed), and `helm template`. Each call gets a private copy of the app's files in a temporary
//! directory, a time limit, and an error that says what failed or what to install.

use crate::fleet::render::{HelmInvocation, Tools};
use crate::fleet::Tree;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one kustomize or helm run may take.
const TIME_LIMIT: Duration = Duration::from_secs(120);

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
        SystemTools { kustomize, helm: which("helm") }
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

/// Runs `cmd` to completion within `limit`, returning stdout, or stderr (trimmed) as the error.
pub fn run(mut cmd: Command, limit: Duration) -> Result<String, String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{program} did not finish within {} s", limit.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("waiting for {program}: {e}")),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if status.success() {
        String::from_utf8(stdout).map_err(|e| format!("{program} printed invalid UTF-8: {e}"))
    } else {
        let msg = String::from_utf8_lossy(&stderr).trim().to_string();
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
    fn kustomize(&self, files: &Tree, dir: &str) -> Result<String, String> {
        let Some(k) = &self.kustomize else {
            return Err("neither kustomize nor kubectl is installed: install kubectl (it includes kustomize, \
                        https://kubernetes.io/docs/tasks/tools/) or kustomize \
                        (https://kubectl.docs.kubernetes.io/installation/kustomize/)"
                .into());
        };
        let tmp = materialize(files)?;
        let target = tmp.path().join(dir);
        let mut cmd = match k {
            Kustomize::Standalone(p) => {
                let mut c = Command::new(p);
                c.arg("build");
                c
            }
            Kustomize::Kubectl(p) => {
                let mut c = Command::new(p);
                c.arg("kustomize");
                c
            }
        };
        cmd.arg(&target).current_dir(tmp.path());
        // Paths in messages are the app's own, not the temporary directory's.
        let root = format!("{}/", tmp.path().display());
        run(cmd, TIME_LIMIT)
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
        let mut cmd = Command::new(program);
        cmd.args(helm.args(&chart.to_string_lossy(), &values.to_string_lossy())).current_dir(tmp.path());
        let root = format!("{}/", tmp.path().display());
        run(cmd, TIME_LIMIT).map_err(|e| e.replace(&root, ""))
    }
}
