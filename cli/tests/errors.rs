//! The CLI behaves: output into a closed pipe ends it quietly, and a user's error is one message without a
//! stack trace or gRPC's status wording, even with RUST_BACKTRACE set.

use std::io::Read;
use std::process::{Command, Stdio};

fn flotilla() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flotilla"));
    c.env("RUST_BACKTRACE", "1");
    c
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/fleet");
    let mut child = flotilla()
        .args(["render", "--repo", examples, "--cluster", "eu-1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one byte, then close the pipe (as `| head -c1` does).
    let mut out = child.stdout.take().unwrap();
    let mut one = [0u8; 1];
    out.read_exact(&mut one).unwrap();
    drop(out);
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert!(status.success() || std::os::unix::process::ExitStatusExt::signal(&status) == Some(13), "{status:?}");
}

#[test]
fn user_errors_are_one_message_without_a_stack_trace() {
    let dir = tempfile::tempdir().unwrap();
    let out = flotilla()
        .args(["render", "--repo"])
        .arg(dir.path().join("missing"))
        .args(["--cluster", "x"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("Stack backtrace") && !err.contains("panicked"), "{err}");
    // A hub that is not there: no gRPC status wording.
    let out =
        flotilla().args(["clusters", "--hub", "https://127.0.0.1:1", "--certs"]).arg(dir.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("Stack backtrace") && !err.contains("status:"), "{err}");
}
