//! `flotilla demo --once`, as the README's first command runs it.

#[test]
fn demo_once_converges_on_both_commits() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["demo", "--once", "--timeout-seconds", "90"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run flotilla demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("== every cluster runs"), "{stdout}");
    assert!(stdout.contains("eu-1") && stdout.contains("ap-4"), "{stdout}");
}
