//! Running the `loupe` binary from tests, and checking its failures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A command that runs the `loupe` under test: through `LOUPE_TEST_RUNNER` when it is set (the
/// aarch64 binary under qemu, tools/aarch64.sh), else directly.
pub fn loupe_command() -> Command {
    let mut runner = std::env::var("LOUPE_TEST_RUNNER")
        .map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .unwrap_or_default();
    if runner.is_empty() {
        return Command::new(env!("CARGO_BIN_EXE_loupe"));
    }
    let mut cmd = Command::new(runner.remove(0));
    cmd.args(runner).arg(env!("CARGO_BIN_EXE_loupe"));
    cmd
}

/// Runs `loupe` with an empty Hugging Face cache, so nothing outside the test is found.
pub fn loupe(args: &[&str]) -> Out {
    let o = loupe_command()
        .args(args)
        .env("HF_HUB_CACHE", "/nonexistent-loupe-test-cache")
        .output()
        .expect("run loupe");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a clean failure: exit code 2, one line on stderr, naming `what`, no panic.
pub fn fails_clearly(out: &Out, what: &str) {
    assert_eq!(out.code, 2, "exit code for {what}: stderr {}", out.stderr);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "one line for {what}, got: {}", out.stderr);
    assert!(lines[0].contains(what), "`{}` should name {what}", lines[0]);
    assert!(!out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"));
}
