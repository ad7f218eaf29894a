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
        &["profile", "--backend", "sampling", "--attach", "kprobe"],
        "--attach applies to the tracing backend",
    );
    if privileged("rejects_bad_arguments_before_attaching (bpftool check)") {
        assert!(programs_left_after_exit().unwrap().is_empty());
    }
}

/// Forcing a tracing mode the kernel lacks is a clear error, and nothing stays attached. This
/// machine's kernel has neither kprobes nor BPF trampolines (the QEMU kernels of vmtest have
/// both); on a kernel with them the attach succeeds and this test says so instead.
#[test]
fn tracing_modes_the_kernel_lacks_are_clear_errors() {
    if !privileged("tracing_modes_the_kernel_lacks_are_clear_errors") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    let kprobes = std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists();
    if kprobes {
        eprintln!(
            "this kernel has kprobes: the forced-kprobe error path is covered by vmtest's absence checks only"
        );
    } else {
        fails_with(
            &[
                "profile",
                "--duration",
                "1",
                "--backend",
                "tracing",
                "--attach",
                "kprobe",
            ],
            "this kernel has no kprobes",
        );
    }
    let fentry = Command::new("bpftool")
        .args(["feature", "probe", "kernel"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).contains("eBPF program_type tracing is available")
        });
    if !fentry && !kprobes {
        fails_with(
            &[
                "profile",
                "--duration",
                "1",
                "--backend",
                "tracing",
                "--attach",
                "fentry",
            ],
            "BPF trampolines do not work on this kernel",
        );
        fails_with(
            &["profile", "--duration", "1", "--backend", "tracing"],
            "could not attach to any function",
        );
    }
    assert!(programs_left_after_exit().unwrap().is_empty());
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
