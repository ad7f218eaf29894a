//! The sampling backend's own part: a `perf_event` program on every online CPU that aggregates
//! kernel stacks in per-CPU maps, on hardware cycles where the PMU exists, else cpu-clock.

use aya::programs::{
    PerfEvent,
    perf_event::{
        HardwareEvent, PerfEventConfig, PerfEventLink, PerfEventScope, SamplePolicy, SoftwareEvent,
    },
};

use super::clock;
use crate::{
    contract::{Clock, ClockSource},
    error::Error,
};

/// Highest sampling frequency accepted; perf_event_max_sample_rate may lower it further.
pub const MAX_FREQUENCY_HZ: u64 = 20_000;
pub const DEFAULT_FREQUENCY_HZ: u64 = 999;
/// The agent's rate while only scrapes and rolling windows read it: what continuous
/// profilers use (19-97 Hz), at a cost below what throughput can resolve on a VM.
pub const DEFAULT_CONTINUOUS_HZ: u64 = 49;

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

/// The sampler's perf events, one per CPU: detached when dropped.
pub(super) type SamplerLinks = Vec<PerfEventLink>;

/// Attaches the sampler on every CPU at `hz`: hardware cycles when the PMU exists and the
/// choice allows it, else cpu-clock. Returns the links and what their periods count.
pub(super) fn attach(
    prog: &mut PerfEvent,
    cpus: &[u32],
    hz: u64,
    choice: ClockChoice,
) -> Result<(SamplerLinks, ClockSource), Error> {
    let (pmu, _) = clock::pmu_present();
    if pmu && choice == ClockChoice::Auto {
        let hardware = PerfEventConfig::Hardware(HardwareEvent::CpuCycles);
        match attach_each(prog, cpus, hardware, SamplePolicy::Frequency(hz)) {
            Ok(links) => return Ok((links, ClockSource::PmuCycles)),
            Err(e) => {
                tracing::warn!("hardware cycles unavailable ({e}); sampling cpu-clock instead");
            }
        }
    }
    let software = PerfEventConfig::Software(SoftwareEvent::CpuClock);
    let links = attach_each(
        prog,
        cpus,
        software,
        SamplePolicy::Period(1_000_000_000 / hz),
    )?;
    Ok((links, ClockSource::CpuClock))
}

/// Attaches again at another rate, counting what the first attachment counted (a window
/// spanning the change must not mix cycles and nanoseconds).
pub(super) fn reattach(
    prog: &mut PerfEvent,
    cpus: &[u32],
    hz: u64,
    source: ClockSource,
) -> Result<SamplerLinks, Error> {
    match source {
        ClockSource::PmuCycles => attach_each(
            prog,
            cpus,
            PerfEventConfig::Hardware(HardwareEvent::CpuCycles),
            SamplePolicy::Frequency(hz),
        ),
        ClockSource::CpuClock => attach_each(
            prog,
            cpus,
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            SamplePolicy::Period(1_000_000_000 / hz),
        ),
    }
}

/// One perf event per CPU with the program on it; on a failure the ones made are dropped,
/// which detaches them.
fn attach_each(
    prog: &mut PerfEvent,
    cpus: &[u32],
    event: PerfEventConfig,
    policy: SamplePolicy,
) -> Result<SamplerLinks, Error> {
    let mut links = Vec::with_capacity(cpus.len());
    for &cpu in cpus {
        let id = prog
            .attach(
                event,
                PerfEventScope::AllProcessesOneCpu { cpu },
                policy,
                false,
            )
            .map_err(|e| Error::program(format!("attach the sampler on CPU {cpu}"), e))?;
        let link = prog
            .take_link(id)
            .map_err(|e| Error::program(format!("keep the sampler's link on CPU {cpu}"), e))?;
        links.push(link);
    }
    Ok(links)
}

/// The clock a sampler's periods are read with.
pub(super) fn clock_of(source: ClockSource) -> Clock {
    let calibration = clock::calibrate(std::time::Duration::from_millis(100));
    match source {
        ClockSource::PmuCycles => Clock {
            source,
            cycles_per_ns: calibration.cycles_per_ns,
            calibration: format!(
                "sample periods are PMU cycles; cycles_per_ns from {}",
                calibration.method
            ),
        },
        ClockSource::CpuClock => Clock {
            source,
            cycles_per_ns: calibration.cycles_per_ns,
            calibration: calibration.method,
        },
    }
}

/// The sampler's rate over time (0 while detached): a window that spans a change expects
/// samples at the rate in force during each part of it, and its samples are weighted by their
/// own periods, so its shares stay exact.
#[derive(Debug, Clone)]
pub struct RateHistory {
    /// (since, hz), oldest first.
    changes: std::collections::VecDeque<(std::time::Instant, u64)>,
}

/// Changes kept: a window older than the oldest is measured as if that rate held before it.
const RATE_CHANGES_KEPT: usize = 4096;

impl RateHistory {
    pub fn new(at: std::time::Instant, hz: u64) -> Self {
        Self {
            changes: std::collections::VecDeque::from([(at, hz)]),
        }
    }

    pub fn set(&mut self, at: std::time::Instant, hz: u64) {
        self.changes.push_back((at, hz));
        if self.changes.len() > RATE_CHANGES_KEPT {
            self.changes.pop_front();
        }
    }

    /// The rate in force now.
    pub fn current(&self) -> u64 {
        self.changes.back().map_or(0, |&(_, hz)| hz)
    }

    /// Whether the sampler ran (a rate above 0) for all of `[start, end]`.
    pub fn attached_throughout(&self, start: std::time::Instant, end: std::time::Instant) -> bool {
        let at_start = self
            .changes
            .iter()
            .rev()
            .find(|&&(since, _)| since <= start)
            .or(self.changes.front())
            .is_some_and(|&(_, hz)| hz > 0);
        at_start
            && self
                .changes
                .iter()
                .filter(|&&(t, _)| t > start && t < end)
                .all(|&(_, hz)| hz > 0)
    }

    /// The time-weighted mean rate over `[start, end]` (the rate at `end` for an empty one).
    pub fn mean_hz(&self, start: std::time::Instant, end: std::time::Instant) -> f64 {
        let span = end.saturating_duration_since(start).as_secs_f64();
        let rate_at = |t: std::time::Instant| {
            self.changes
                .iter()
                .rev()
                .find(|&&(since, _)| since <= t)
                .or(self.changes.front())
                .map_or(0, |&(_, hz)| hz)
        };
        if span <= 0.0 {
            return rate_at(end) as f64;
        }
        // Segment boundaries inside the window, each carrying the rate from there on.
        let mut from = start;
        let mut hz = rate_at(start);
        let mut integral = 0.0;
        for &(since, next) in self.changes.iter().filter(|&&(t, _)| t > start && t < end) {
            integral += hz as f64 * since.duration_since(from).as_secs_f64();
            (from, hz) = (since, next);
        }
        integral += hz as f64 * end.duration_since(from).as_secs_f64();
        integral / span
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::RateHistory;

    #[test]
    fn mean_rate_weights_each_rate_by_its_time_in_the_window() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut history = RateHistory::new(t0, 19);
        history.set(at(10), 999);
        history.set(at(20), 0);
        history.set(at(30), 19);
        assert!((history.mean_hz(at(0), at(10)) - 19.0).abs() < 1e-9);
        assert!((history.mean_hz(at(5), at(15)) - (19.0 * 5.0 + 999.0 * 5.0) / 10.0).abs() < 1e-9);
        assert!((history.mean_hz(at(10), at(30)) - 999.0 / 2.0).abs() < 1e-9);
        assert!((history.mean_hz(at(25), at(35)) - 19.0 / 2.0).abs() < 1e-9);
        assert!((history.mean_hz(at(12), at(12)) - 999.0).abs() < 1e-9);
        assert_eq!(history.current(), 19);
        assert!(history.attached_throughout(at(0), at(15)));
        assert!(
            !history.attached_throughout(at(15), at(25)),
            "detached from 20 s"
        );
        assert!(!history.attached_throughout(at(22), at(28)));
        assert!(history.attached_throughout(at(31), at(40)));
    }

    #[test]
    fn history_is_bounded() {
        let t0 = Instant::now();
        let mut history = RateHistory::new(t0, 1);
        for i in 0..10_000u64 {
            history.set(t0 + Duration::from_millis(i), i % 7);
        }
        assert_eq!(history.changes.len(), super::RATE_CHANGES_KEPT);
    }
}
