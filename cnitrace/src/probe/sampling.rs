//! The sampling backend's own part: a `perf_event` program on every online CPU that aggregates
//! kernel stacks in per-CPU maps, on hardware cycles where the PMU exists, else cpu-clock.

use aya::programs::{
    PerfEvent,
    perf_event::{HardwareEvent, PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
};

use super::clock;
use crate::{
    contract::{Clock, ClockSource},
    error::Error,
};

/// Highest sampling frequency accepted; perf_event_max_sample_rate may lower it further.
pub const MAX_FREQUENCY_HZ: u64 = 20_000;
pub const DEFAULT_FREQUENCY_HZ: u64 = 999;

/// What the sampler counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ClockChoice {
    /// Hardware cycles when the PMU is present, else cpu-clock.
    #[default]
    Auto,
    /// cpu-clock even when a PMU exists.
    CpuClock,
}

/// Where the packet denominator comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PacketSource {
    /// Each device's own transmit counters (skbs and bytes, read per network namespace);
    /// segments derived from bytes and the device's MTU. No program runs per packet.
    #[default]
    Devices,
    /// A raw tracepoint on every transmit of every device, reading each skb's `gso_segs`:
    /// exact, at the cost of a program run per skb on the whole node.
    Exact,
}

/// Where softirq runs and times come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SoftirqSource {
    /// Runs from /proc/softirqs, time per vector from the sampled stacks (the handler on the
    /// stack). No program runs per softirq.
    #[default]
    Sampled,
    /// Entry and exit tracepoints on every softirq run: exact times, a program pair per run.
    Exact,
}

/// What is attached: the sampler's rate and clock, and the packet and softirq sources.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub frequency_hz: u64,
    pub clock: ClockChoice,
    pub packets: PacketSource,
    pub softirq: SoftirqSource,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            frequency_hz: DEFAULT_FREQUENCY_HZ,
            clock: ClockChoice::Auto,
            packets: PacketSource::default(),
            softirq: SoftirqSource::default(),
        }
    }
}

/// Checks a sampling frequency against our bound and the kernel's perf_event_max_sample_rate.
pub fn validate_frequency(hz: u64) -> Result<(), Error> {
    if hz == 0 || hz > MAX_FREQUENCY_HZ {
        return Err(Error::InvalidArgument(format!(
            "--frequency {hz} is out of range: use 1..={MAX_FREQUENCY_HZ} Hz (default {DEFAULT_FREQUENCY_HZ})"
        )));
    }
    let limit = std::fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(limit) = limit
        && hz > limit
    {
        return Err(Error::InvalidArgument(format!(
            "--frequency {hz} exceeds kernel.perf_event_max_sample_rate={limit}: lower it, or raise \
             the sysctl"
        )));
    }
    Ok(())
}

pub(super) fn attach(
    prog: &mut PerfEvent,
    cpus: &[u32],
    config: &ProbeConfig,
) -> Result<Clock, Error> {
    let (pmu, _) = clock::pmu_present();
    let calibration = clock::calibrate(std::time::Duration::from_millis(100));
    if pmu && config.clock == ClockChoice::Auto {
        let hardware = PerfEventConfig::Hardware(HardwareEvent::CpuCycles);
        let mut links = Vec::with_capacity(cpus.len());
        let mut failure = None;
        for &cpu in cpus {
            match prog.attach(
                hardware,
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(config.frequency_hz),
                false,
            ) {
                Ok(link) => links.push(link),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        match failure {
            None => {
                return Ok(Clock {
                    source: ClockSource::PmuCycles,
                    cycles_per_ns: calibration.cycles_per_ns,
                    calibration: format!(
                        "sample periods are PMU cycles; cycles_per_ns from {}",
                        calibration.method
                    ),
                });
            }
            Some(e) => {
                tracing::warn!("hardware cycles unavailable ({e}); sampling cpu-clock instead");
                for link in links {
                    // Best effort: the program is dropped with the Ebpf object anyway.
                    let _ = prog.detach(link);
                }
            }
        }
    }
    let period_ns = 1_000_000_000 / config.frequency_hz;
    for &cpu in cpus {
        prog.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Period(period_ns),
            false,
        )
        .map_err(|e| Error::program(format!("attach cpu-clock sampler on CPU {cpu}"), e))?;
    }
    Ok(Clock {
        source: ClockSource::CpuClock,
        cycles_per_ns: calibration.cycles_per_ns,
        calibration: calibration.method,
    })
}
