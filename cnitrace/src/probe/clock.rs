//! Cycle clock: a hardware PMU when the node has one, else cpu-clock time converted to cycles
//! with a cycles-per-nanosecond calibrated here (TSC against the monotonic clock).

use std::{path::Path, time::Duration, time::Instant};

/// Where the PMU lists itself; hybrid CPUs name theirs cpu_core / cpu_atom.
const PMU_DIRS: &[&str] = &[
    "/sys/bus/event_source/devices/cpu",
    "/sys/bus/event_source/devices/cpu_core",
    "/sys/bus/event_source/devices/armv8_pmuv3_0",
];

/// Whether a hardware cycles PMU is exposed, and what was looked at.
pub fn pmu_present() -> (bool, String) {
    match PMU_DIRS.iter().find(|dir| Path::new(dir).exists()) {
        Some(dir) => (true, format!("{dir} exists")),
        None => (
            false,
            "no CPU PMU under /sys/bus/event_source/devices (common in VMs without vPMU)"
                .to_owned(),
        ),
    }
}

/// Measured cycles per nanosecond and how.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub cycles_per_ns: f64,
    pub method: String,
}

/// Counts TSC ticks over `span` of CLOCK_MONOTONIC. With an invariant TSC (every x86 CPU of the
/// last decade) this is the nominal core clock, which is what cpu-clock time converts to.
#[cfg(target_arch = "x86_64")]
pub fn calibrate(span: Duration) -> Calibration {
    // SAFETY: rdtsc has no preconditions on x86_64.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(span);
    let (c1, elapsed) = (tsc(), t0.elapsed());
    let cycles_per_ns = (c1.wrapping_sub(c0)) as f64 / elapsed.as_nanos() as f64;
    Calibration {
        cycles_per_ns,
        method: format!(
            "TSC against CLOCK_MONOTONIC over {} ms",
            elapsed.as_millis()
        ),
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub fn calibrate(_span: Duration) -> Calibration {
    let khz = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok());
    match khz {
        Some(khz) => Calibration {
            cycles_per_ns: khz / 1e6,
            method: "cpufreq cpuinfo_max_freq (no TSC on this architecture)".to_owned(),
        },
        None => Calibration {
            cycles_per_ns: 1.0,
            method: "no TSC and no cpufreq: 1 cycle per ns assumed".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_is_a_plausible_cpu_frequency() {
        let c = calibrate(Duration::from_millis(20));
        // 0.5 to 7 GHz covers every server CPU and keeps a broken calibration from passing.
        assert!((0.5..7.0).contains(&c.cycles_per_ns), "{c:?}");
    }
}
