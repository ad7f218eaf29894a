//! Bad input: a one-line error naming the problem and the fix, non-zero exit, nothing attached.

use std::process::Command;

use cnitrace_tests::{cnitrace_bin, privileged, programs_left_after_exit};

fn fails_with(args: &[&str], expected: &str) {
    let out = Command::new(cnitrace_bin())
        .args(args)
        .output()
        .expect("run cnitrace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        stderr.contains(expected),
        "{args:?}: expected `{expected}` in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
}

#[test]
fn rejects_bad_arguments_before_attaching() {
    fails_with(
        &["profile", "--duration", "0"],
        "--duration 0 is out of range",
    );
    fails_with(
        &["profile", "--duration", "-3"],
        "--duration -3 is out of range",
    );
    fails_with(
        &["profile", "--frequency", "0"],
        "--frequency 0 is out of range",
    );
    fails_with(&["profile", "--frequency", "500000"], "out of range");
    fails_with(
        &["profile", "--iface", "cnt-nosuch0"],
        "unknown interface `cnt-nosuch0`",
    );
    fails_with(
        &["profile", "--netns", "cnt-nosuch-ns"],
        "unknown network namespace `cnt-nosuch-ns`",
    );
    fails_with(
        &["profile", "--backend", "tracing"],
        "--backend tracing is not available",
    );
    if privileged("rejects_bad_arguments_before_attaching (bpftool check)") {
        assert!(programs_left_after_exit().unwrap().is_empty());
    }
}

#[test]
fn clap_rejects_unknown_values() {
    let out = Command::new(cnitrace_bin())
        .args(["profile", "--format", "xml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'xml'"));
}

#[test]
fn unprivileged_user_gets_a_capability_error() {
    if !privileged("unprivileged_user_gets_a_capability_error") {
        return;
    }
    // Drop to nobody with no capabilities, as a non-root user would run it.
    let bin = cnitrace_bin();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(&bin)
        .args(["profile", "--duration", "1"])
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("as root"),
        "{stderr}"
    );
}
