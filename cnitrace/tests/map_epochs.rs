//! The sampler's maps on the real kernel: retiring an epoch freezes its keys, and deleting it
//! once no window measures from before the retirement loses nothing any window needs.

use std::time::{Duration, Instant};

use cnitrace::probe::{KernelProbes, Probes, sampling::ProbeConfig};

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CNITRACE_REQUIRE_PRIVILEGED").is_none(),
        "map_epochs needs root (real BPF maps), and CNITRACE_REQUIRE_PRIVILEGED is set"
    );
    eprintln!("map_epochs: skipped: needs root (real BPF maps)");
    false
}

/// Keeps both CPUs busy in the kernel so samples carry kernel stacks.
fn kernel_work(for_how_long: Duration) {
    let deadline = Instant::now() + for_how_long;
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                while Instant::now() < deadline {
                    let _ = std::fs::read_to_string("/proc/self/status");
                }
            });
        }
    });
}

#[test]
fn retired_epochs_are_deleted_once_no_window_needs_them() {
    if !privileged() {
        return;
    }
    let probes = KernelProbes::start(None, &ProbeConfig::default()).expect("probes");
    kernel_work(Duration::from_millis(500));
    let before = probes.snapshot().unwrap();
    assert!(before.samples.keys().all(|k| k.epoch == 0));
    let epoch0 = before.samples.len();
    assert!(epoch0 > 0, "no samples in 0.5 s of work");

    // Over the threshold (1 key): the epoch advances.
    let done = probes.maintain(Some(before.mono), 1).unwrap();
    assert!(done.advanced && done.epoch == 1, "{done:?}");
    // Programs that read the old epoch just before the switch have finished by now.
    std::thread::sleep(Duration::from_millis(50));
    let retired = |s: &cnitrace::snapshot::Snapshot| {
        let mut old: Vec<_> = s
            .samples
            .iter()
            .filter(|(k, _)| k.epoch == 0)
            .map(|(k, v)| (*k, v.count, v.period))
            .collect();
        old.sort_unstable();
        old
    };
    let at_retirement = probes.snapshot().unwrap();
    kernel_work(Duration::from_millis(500));
    let during = probes.snapshot().unwrap();
    assert!(
        during.samples.keys().any(|k| k.epoch == 1),
        "new samples use the new epoch"
    );
    // The retired keys are frozen: nothing was added to them after the retirement.
    assert!(retired(&at_retirement).len() >= epoch0);
    assert_eq!(
        retired(&at_retirement),
        retired(&during),
        "retired keys still grow"
    );

    // A window opened before the retirement still needs the old keys: nothing is deleted.
    let kept = probes.maintain(Some(before.mono), 1).unwrap();
    assert_eq!((kept.keys_deleted, kept.advanced), (0, false), "{kept:?}");
    // Once the oldest baseline is younger than the retirement, they go, with their stacks.
    let deleted = probes.maintain(Some(during.mono), 1).unwrap();
    assert!(
        deleted.keys_deleted > 0 && deleted.stacks_deleted > 0,
        "{deleted:?}"
    );
    kernel_work(Duration::from_millis(300));
    let after = probes.snapshot().unwrap();
    assert!(
        after.samples.keys().all(|k| k.epoch == 1),
        "retired keys left"
    );

    // A window across the deletion: every sample of the new epoch still has its stack.
    let window = probes.window(&during, &after, None).unwrap();
    let samples: u64 = window.samples.iter().map(|s| s.count).sum();
    let lost: u64 = window
        .samples
        .iter()
        .filter(|s| s.stack_lost)
        .map(|s| s.count)
        .sum();
    assert!(samples > 0);
    assert!(
        lost * 100 <= samples,
        "{lost} of {samples} samples lost their stack across the deletion"
    );
}
