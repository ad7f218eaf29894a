//! The sampler's maps on the real kernel: retiring an epoch freezes its keys, moving them out
//! of the kernel map keeps their final values for the windows that still measure them.

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
fn retired_epochs_leave_the_kernel_map_and_still_count_for_older_windows() {
    if !privileged() {
        return;
    }
    let probes = KernelProbes::start(None, &ProbeConfig::default()).expect("probes");
    kernel_work(Duration::from_millis(500));
    let before = probes.snapshot().unwrap();
    assert!(before.samples.keys().all(|k| k.epoch == 0));
    assert!(!before.samples.is_empty(), "no samples in 0.5 s of work");
    // Growth of the old epoch inside a window that began before its retirement.
    kernel_work(Duration::from_millis(300));

    // Over the threshold (1 key): the epoch advances.
    let done = probes.maintain(Some(before.mono), 1).unwrap();
    assert!(done.advanced && done.epoch == 1, "{done:?}");
    // Programs that read the old epoch just before the switch have finished by now.
    std::thread::sleep(Duration::from_millis(50));
    let sum = |s: &cnitrace::snapshot::Snapshot, epoch: u32| -> u64 {
        s.samples
            .iter()
            .filter(|(k, _)| k.epoch == epoch)
            .map(|(_, v)| v.count)
            .sum()
    };
    let at_retirement = probes.snapshot().unwrap();
    kernel_work(Duration::from_millis(500));
    let during = probes.snapshot().unwrap();
    assert!(sum(&during, 1) > 0, "new samples use the new epoch");
    // The retired keys are frozen: nothing was added to them after the retirement.
    assert_eq!(
        sum(&at_retirement, 0),
        sum(&during, 0),
        "retired keys still grow"
    );
    let retired_growth = sum(&during, 0) - sum(&before, 0);
    assert!(
        retired_growth > 0,
        "no samples between the baseline and the retirement"
    );

    // The next call moves the retired keys out of the kernel, although a window opened
    // before the retirement is still open: their final values stay in user space.
    let moved = probes.maintain(Some(before.mono), 1).unwrap();
    assert!(
        moved.keys_deleted > 0 && moved.stacks_deleted > 0 && !moved.advanced,
        "{moved:?}"
    );
    assert_eq!(moved.keys_held, moved.keys_deleted, "{moved:?}");
    kernel_work(Duration::from_millis(300));
    let after = probes.snapshot().unwrap();
    assert!(
        after.samples.keys().all(|k| k.epoch == 1),
        "retired keys left in the kernel map"
    );

    // The window from before the retirement counts the old epoch's growth up to it, and
    // the new epoch's, exactly; and the moved keys kept their stacks.
    let window = probes.window(&before, &after, None).unwrap();
    let samples: u64 = window.samples.iter().map(|s| s.count).sum();
    assert_eq!(samples, retired_growth + sum(&after, 1));
    let lost: u64 = window
        .samples
        .iter()
        .filter(|s| s.stack_lost)
        .map(|s| s.count)
        .sum();
    assert!(
        lost * 100 <= samples,
        "{lost} of {samples} samples lost their stack across the move"
    );

    // Once the oldest baseline is younger than the retirement, the kept values go too.
    let forgotten = probes.maintain(Some(after.mono), 1).unwrap();
    assert_eq!(forgotten.keys_held, 0, "{forgotten:?}");
}
