//! Booting a kernel under QEMU TCG, and booting it again when it dies before its first case
//! (an infrastructure failure, not a result).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Boots the kernel with the initramfs under QEMU TCG; returns the serial console output.
pub(super) fn boot(kernel: &Path, initrd: &Path, log: &Path, timeout: Duration) -> Result<String> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            // One host thread runs both vCPUs: under multi-threaded TCG, code the kernel
            // patches with int3 (static keys, fentry and kprobe sites) was seen executing
            // stale on the other vCPU after the patch ended ("Oops: int3" in
            // sched_clock_cpu and handle_softirqs, once in a few boots of 6.12).
            "-accel",
            "tcg,thread=single",
            "-cpu",
            "max",
            "-m",
            "2048",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log)?)
        .stderr(Stdio::inherit())
        .spawn()
        .context("qemu-system-x86_64 (apt install qemu-system-x86)")?;
    loop {
        if let Some(status) = child.try_wait()? {
            eprintln!(
                "vmtest: VM exited ({status}) after {:.0} s",
                started.elapsed().as_secs_f64()
            );
            break;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the VM did not finish within {} s; console in {}",
                timeout.as_secs(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(String::from_utf8_lossy(&std::fs::read(log)?).replace('\r', ""))
}

/// How many times a kernel is booted when it dies before running its first case.
pub(super) const BOOT_ATTEMPTS: usize = 3;

/// The console line that shows the kernel died, if it did so before the first case started.
///
/// Such a death is the emulator's, not a test result: the Debian 6.12 kernel has been seen to
/// oops on an int3 in `sched_clock_cpu` while booting under multi-threaded TCG (static keys
/// are patched with int3 while the other vCPU runs), once in several boots.
pub(super) fn died_before_cases(console: &str) -> Option<&str> {
    if console.contains("@@CASE ") {
        return None;
    }
    console.lines().find(|line| {
        ["Kernel panic", "Oops:", "Fatal exception", "BUG:"]
            .iter()
            .any(|marker| line.contains(marker))
    })
}

/// Boots until the VM gets as far as its cases, retrying a kernel that dies while booting.
pub(super) fn boot_until_cases_run(
    release: &str,
    vmlinuz: &Path,
    initrd: &Path,
    log: &Path,
    timeout_s: u64,
) -> Result<String> {
    let mut attempt = 1;
    loop {
        let console = boot(vmlinuz, initrd, log, Duration::from_secs(timeout_s))?;
        match died_before_cases(&console) {
            Some(line) if attempt < BOOT_ATTEMPTS => {
                attempt += 1;
                eprintln!(
                    "vmtest: {release}: the kernel died while booting, before any case ({}); \
                     booting again (attempt {attempt} of {BOOT_ATTEMPTS})",
                    line.trim()
                );
            }
            _ => return Ok(console),
        }
    }
}
