//! `flotilla certs` as a user runs it.

use std::process::Command;

fn flotilla(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla")).args(args).output().expect("run flotilla")
}

#[test]
fn certs_writes_a_fleet_and_rejects_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = flotilla(&["certs", "--dir", d, "--cluster", "eu-1,eu-2", "--operator", "alice"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in [
        "ca.pem",
        "ca-key.pem",
        "hub.pem",
        "hub-key.pem",
        "clusters/eu-1.pem",
        "clusters/eu-2-key.pem",
        "operators/alice.pem",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    let out = flotilla(&["certs", "--dir", d, "--cluster", "Bad Name"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid name \"Bad Name\""), "{err}");
}
