//! The Kubernetes manifests in deploy/ pass a server-side dry-run apply with kubectl against a simulated
//! cluster, and the dry run creates nothing.

use flotilla_e2e::{eventually, spawn};
use std::path::PathBuf;
use std::process::Command;

fn kubectl(kubeconfig: &std::path::Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("KUBECACHEDIR", kubeconfig.with_extension("cache"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl is not installed; install it with: apt-get install -y kubectl");
    if let Some(s) = stdin {
        child.stdin.take().expect("stdin").write_all(s.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("kubectl");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test]
async fn deploy_manifests_pass_a_server_side_dry_run() {
    let tmp = tempfile::tempdir().unwrap();
    let kc_dir = tmp.path().join("kc");
    let args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--cluster".into(),
        "target".into(),
        "--kubeconfig-dir".into(),
        kc_dir.display().to_string(),
    ];
    let _sim = spawn("flotilla-sim", &args, &tmp.path().join("sim.log"));
    eventually(20, "the simulator", || async { kc_dir.join("server").exists().then_some(()) }).await;
    let kc = kc_dir.join("target.kubeconfig");
    // A dry run persists nothing, so the namespace the manifests use must exist for real first.
    let (ok, out) = kubectl(
        &kc,
        &["apply", "--server-side", "-f", "-"],
        Some("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: flotilla-system\n"),
    );
    assert!(ok, "{out}");
    let deploy: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "deploy", "kubernetes"].iter().collect();
    for (file, kinds) in [
        (
            "hub.yaml",
            &[
                "secret/flotilla-hub-certs",
                "secret/flotilla-hub-git",
                "persistentvolumeclaim/flotilla-hub-data",
                "deployment.apps/flotilla-hub",
                "service/flotilla-hub",
                "service/flotilla-hub-webhook",
            ][..],
        ),
        (
            "hub-replicas.yaml",
            &[
                "secret/flotilla-hub-certs",
                "secret/flotilla-hub-etcd",
                "deployment.apps/flotilla-hub",
                "poddisruptionbudget.policy/flotilla-hub",
                "service/flotilla-hub",
                "service/flotilla-hub-webhook",
            ][..],
        ),
        (
            "agent.yaml",
            &[
                "serviceaccount/flotilla-agent",
                "clusterrole.rbac.authorization.k8s.io/flotilla-agent",
                "clusterrolebinding.rbac.authorization.k8s.io/flotilla-agent",
                "secret/flotilla-agent-certs",
                "deployment.apps/flotilla-agent",
            ][..],
        ),
        (
            "agent-join.yaml",
            &[
                "serviceaccount/flotilla-agent",
                "clusterrole.rbac.authorization.k8s.io/flotilla-agent",
                "deployment.apps/flotilla-agent",
            ][..],
        ),
    ] {
        let path = deploy.join(file);
        let (ok, out) =
            kubectl(&kc, &["apply", "--server-side", "--dry-run=server", "-f", path.to_str().unwrap()], None);
        assert!(ok, "{file}: {out}");
        for k in kinds {
            assert!(
                out.contains(&format!("{k} serverside-applied (server dry run)")),
                "{file}: {k} missing in:\n{out}"
            );
        }
    }
    let (ok, out) =
        kubectl(&kc, &["get", "deployments,secrets,serviceaccounts", "-n", "flotilla-system", "-o", "name"], None);
    assert!(ok, "{out}");
    assert!(!out.contains("flotilla-hub") && !out.contains("flotilla-agent"), "the dry run created objects: {out}");
}
