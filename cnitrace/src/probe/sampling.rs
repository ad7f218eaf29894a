//! The sampling backend: a `perf_event` program on every online CPU aggregates kernel stacks in
//! per-CPU maps, and two `net:` tracepoints count packets per device. Programs are attached
//! once; a window is the difference of two snapshots, so nothing is reset or re-attached.

use std::collections::{BTreeMap, HashMap};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::{
        PerfEvent, RawTracePoint,
        perf_event::{HardwareEvent, PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
    util::online_cpus,
};
use cnitrace_common::{
    IfaceCounters, MAX_TRACE_COMPONENTS, NR_SOFTIRQS, SampleKey, SampleValue, SoftirqStats,
    StackFrames, TraceCost, fault, global, map, program,
};

use super::{EBPF_OBJECT, bpf_stats, btf, clock, privileges};
use crate::{
    breakdown::{BpfProgramRun, Clock, ClockSource, CpuTicks, Faults, RawWindow, StackSample},
    error::Error,
    kallsyms::Kallsyms,
    session::Snapshot,
};

/// Highest sampling frequency accepted; perf_event_max_sample_rate may lower it further.
pub const MAX_FREQUENCY_HZ: u64 = 20_000;
pub const DEFAULT_FREQUENCY_HZ: u64 = 999;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockChoice {
    /// Hardware cycles when the PMU is present, else cpu-clock.
    Auto,
    /// cpu-clock even when a PMU exists.
    CpuClock,
}

#[derive(Debug, Clone)]
pub struct SamplerConfig {
    pub frequency_hz: u64,
    pub clock: ClockChoice,
    /// `Some`: the tracing backend (entry/exit probes) instead of the stack sampler.
    pub tracing: Option<super::trace::AttachMode>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            frequency_hz: DEFAULT_FREQUENCY_HZ,
            clock: ClockChoice::Auto,
            tracing: None,
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

/// The loaded and attached probes: the packet and softirq counters, and either the stack
/// sampler or the tracer. Dropping it detaches and unloads every program.
pub struct Sampler {
    ebpf: Ebpf,
    /// Set when this is the tracing backend.
    tracer: Option<super::trace::TracerState>,
    /// Components absent from the kernel, as of the last window's symbol read.
    unavailable: std::sync::Mutex<Option<Vec<crate::breakdown::Unavailable>>>,
    clock: Clock,
    frequency_hz: u64,
    cpus: u32,
}

impl Sampler {
    /// Loads the object, attaches the packet tracepoints and a sampler on every online CPU.
    pub fn start(config: &SamplerConfig) -> Result<Self, Error> {
        validate_frequency(config.frequency_hz)?;
        privileges::check()?;
        privileges::raise_memlock_limit();
        let offsets = btf::packet_offsets()?;
        let mut ebpf = EbpfLoader::new()
            .override_global(global::SKB_LEN, &offsets.skb_len, true)
            .override_global(global::SKB_HEAD, &offsets.skb_head, true)
            .override_global(global::SKB_END, &offsets.skb_end, true)
            .override_global(global::SHINFO_GSO_SEGS, &offsets.shinfo_gso_segs, true)
            .override_global(global::DEV_NAME, &offsets.dev_name, true)
            .override_global(global::DEV_IFINDEX, &offsets.dev_ifindex, true)
            .override_global(global::DEV_ND_NET, &offsets.dev_nd_net, true)
            .override_global(global::NET_NS_INUM, &offsets.net_ns_inum, true)
            .load(EBPF_OBJECT)
            .map_err(|e| Error::Load(Box::new(e)))?;

        let counter: &mut RawTracePoint = program_mut(&mut ebpf, program::TX_COUNTER)?;
        counter
            .load()
            .map_err(|e| Error::program(format!("load {}", program::TX_COUNTER), e))?;
        counter.attach("net_dev_start_xmit").map_err(|e| {
            Error::program(
                format!(
                    "attach {} to raw tracepoint net_dev_start_xmit",
                    program::TX_COUNTER
                ),
                e,
            )
        })?;

        for (name, tracepoint) in [
            (program::SOFTIRQ_ENTRY, "softirq_entry"),
            (program::SOFTIRQ_EXIT, "softirq_exit"),
        ] {
            let prog: &mut RawTracePoint = program_mut(&mut ebpf, name)?;
            prog.load()
                .map_err(|e| Error::program(format!("load {name}"), e))?;
            prog.attach(tracepoint).map_err(|e| {
                Error::program(format!("attach {name} to raw tracepoint {tracepoint}"), e)
            })?;
        }

        let cpus = online_cpus().map_err(|(path, e)| Error::io(format!("read {path}"), e))?;
        if let Some(mode) = config.tracing {
            let kallsyms = Kallsyms::load()?;
            let tracer = super::trace::attach(&mut ebpf, mode, &kallsyms)?;
            let calibration = clock::calibrate(std::time::Duration::from_millis(100));
            return Ok(Self {
                ebpf,
                tracer: Some(tracer),
                unavailable: std::sync::Mutex::new(None),
                clock: Clock {
                    source: ClockSource::CpuClock,
                    cycles_per_ns: calibration.cycles_per_ns,
                    calibration: format!(
                        "probe times are bpf_ktime_get_ns x cycles_per_ns ({})",
                        calibration.method
                    ),
                },
                frequency_hz: 0,
                cpus: cpus.len() as u32,
            });
        }
        let prog: &mut PerfEvent = program_mut(&mut ebpf, program::SAMPLER)?;
        prog.load()
            .map_err(|e| Error::program(format!("load {}", program::SAMPLER), e))?;
        let clock = attach_sampler(prog, &cpus, config)?;
        tracing::debug!(?clock, cpus = cpus.len(), "sampler attached");
        Ok(Self {
            ebpf,
            tracer: None,
            unavailable: std::sync::Mutex::new(None),
            clock,
            frequency_hz: config.frequency_hz,
            cpus: cpus.len() as u32,
        })
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// What the tracer attached, when this is the tracing backend.
    pub fn tracer(&self) -> Option<&super::trace::TracerState> {
        self.tracer.as_ref()
    }

    pub fn frequency_hz(&self) -> u64 {
        self.frequency_hz
    }

    /// Reads the cumulative aggregates. Cheap enough to call every second.
    pub fn snapshot(&self) -> Result<Snapshot, Error> {
        let wall = chrono::Utc::now();
        let mono = std::time::Instant::now();
        let samples_map: PerCpuHashMap<&MapData, SampleKey, SampleValue> =
            map_ref(&self.ebpf, map::SAMPLES)?;
        let mut samples = HashMap::new();
        for entry in &samples_map {
            let (key, per_cpu) = entry.map_err(|e| Error::map(map::SAMPLES, e))?;
            let total = per_cpu
                .iter()
                .fold(SampleValue::default(), |acc, v| acc.plus(v));
            samples.insert(key, total);
        }
        let ifaces_map: PerCpuHashMap<&MapData, u64, IfaceCounters> =
            map_ref(&self.ebpf, map::IFACES)?;
        let mut ifaces = BTreeMap::new();
        for entry in &ifaces_map {
            let (key, per_cpu) = entry.map_err(|e| Error::map(map::IFACES, e))?;
            let total = per_cpu
                .iter()
                .fold(IfaceCounters::default(), |acc, c| acc.plus(c));
            ifaces.insert(key, total);
        }
        let softirq_map: PerCpuArray<&MapData, SoftirqStats> = map_ref(&self.ebpf, map::SOFTIRQ)?;
        let softirq = (0..NR_SOFTIRQS)
            .map(|vector| {
                let per_cpu = softirq_map
                    .get(&vector, 0)
                    .map_err(|e| Error::map(map::SOFTIRQ, e))?;
                Ok(per_cpu
                    .iter()
                    .fold(SoftirqStats::default(), |acc, s| acc.plus(s)))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let cpu = cpu_ticks()?;
        let faults_map: PerCpuArray<&MapData, u64> = map_ref(&self.ebpf, map::FAULTS)?;
        let fault_sum = |index: u32| -> Result<u64, Error> {
            let per_cpu = faults_map
                .get(&index, 0)
                .map_err(|e| Error::map(map::FAULTS, e))?;
            Ok(per_cpu.iter().sum())
        };
        let faults = Faults {
            samples_seen: fault_sum(fault::SAMPLES_SEEN)?,
            stack_lost: fault_sum(fault::STACK_LOST)?,
            sample_map_full: fault_sum(fault::SAMPLE_MAP_FULL)?,
            iface_map_full: fault_sum(fault::IFACE_MAP_FULL)?,
            field_read: fault_sum(fault::FIELD_READ)?,
            trace_overflow: fault_sum(fault::TRACE_OVERFLOW)?,
            trace_unmatched_exit: fault_sum(fault::TRACE_UNMATCHED_EXIT)?,
            trace_unknown_function: fault_sum(fault::TRACE_UNKNOWN_FUNCTION)?,
        };
        let trace = if self.tracer.is_some() {
            let trace_map: PerCpuArray<&MapData, TraceCost> = map_ref(&self.ebpf, map::TRACE)?;
            (0..MAX_TRACE_COMPONENTS)
                .map(|id| {
                    let per_cpu = trace_map
                        .get(&id, 0)
                        .map_err(|e| Error::map(map::TRACE, e))?;
                    Ok(per_cpu
                        .iter()
                        .fold(TraceCost::default(), |acc, c| acc.plus(c)))
                })
                .collect::<Result<Vec<_>, Error>>()?
        } else {
            Vec::new()
        };
        Ok(Snapshot {
            wall,
            mono,
            samples,
            ifaces,
            softirq,
            cpu,
            bpf_programs: bpf_stats::programs(),
            faults,
            trace,
        })
    }

    /// The window between two snapshots, with stacks read from the kernel and symbolized.
    pub fn window(
        &self,
        start: &Snapshot,
        end: &Snapshot,
        kallsyms: &Kallsyms,
        bpf_stats_mode: Option<&str>,
    ) -> Result<RawWindow, Error> {
        let delta = end.delta(start);
        let ifaces_for_names: Vec<IfaceCounters> = end.ifaces.values().copied().collect();
        let stacks: BpfHashMap<&MapData, u64, StackFrames> = map_ref(&self.ebpf, map::STACKS)?;
        let mut frames_by_hash: HashMap<u64, Vec<String>> = HashMap::new();
        let mut samples = Vec::with_capacity(delta.samples.len());
        for (key, value) in delta.samples {
            let frames = if key.stack_hash == 0 {
                Vec::new()
            } else {
                frames_by_hash
                    .entry(key.stack_hash)
                    .or_insert_with(|| match stacks.get(&key.stack_hash, 0) {
                        Ok(stack) => stack
                            .ips
                            .iter()
                            .take_while(|&&ip| ip != 0)
                            .map(|&ip| kallsyms.resolve(ip).unwrap_or("[unknown]").to_owned())
                            .collect(),
                        Err(_) => Vec::new(),
                    })
                    .clone()
            };
            let user = key.flags & cnitrace_common::SAMPLE_FLAG_USER != 0;
            samples.push(StackSample {
                stack_lost: !user && frames.is_empty(),
                frames,
                flags: key.flags,
                count: value.count,
                period: value.period,
            });
        }
        Ok(RawWindow {
            start: start.wall,
            end: end.wall,
            duration_s: end.mono.duration_since(start.mono).as_secs_f64(),
            clock: self.clock.clone(),
            frequency_hz: self.frequency_hz,
            cpus: self.cpus,
            samples,
            ifaces: delta.ifaces.into_values().collect(),
            softirq: delta.softirq,
            cpu: delta.cpu,
            bpf_programs: bpf_window(start, end, &ifaces_for_names),
            bpf_stats: bpf_stats_mode.map(str::to_owned),
            faults: delta.faults,
            trace: self.tracer.as_ref().map(|tracer| {
                let costs = super::trace::costs_by_component(&delta.trace);
                crate::breakdown::TraceWindow {
                    pair_ns: costs
                        .keys()
                        .filter_map(|&name| {
                            tracer
                                .component_pair_ns(name)
                                .map(|ns| (name.to_owned(), ns))
                        })
                        .collect(),
                    costs: costs
                        .into_iter()
                        .map(|(name, cost)| (name.to_owned(), cost))
                        .collect(),
                    functions: tracer.functions.clone(),
                    probe_pair_ns: tracer.pair_ns.values().copied().reduce(f64::max),
                    calibration: tracer.calibration.clone(),
                }
            }),
        })
    }
}

/// Programs that ran in the window, with where they are attached.
fn bpf_window(start: &Snapshot, end: &Snapshot, devices: &[IfaceCounters]) -> Vec<BpfProgramRun> {
    let attachments = bpf_stats::attachments();
    end.bpf_programs
        .iter()
        .filter_map(|(id, now)| {
            let before = start.bpf_programs.get(id);
            let run_count = now
                .run_count
                .saturating_sub(before.map_or(0, |b| b.run_count));
            let run_time_ns = now
                .run_time_ns
                .saturating_sub(before.map_or(0, |b| b.run_time_ns));
            (run_count > 0).then(|| BpfProgramRun {
                id: *id,
                name: now.name.clone(),
                program_type: now.program_type,
                run_count,
                run_time_ns,
                attach: describe_attachments(
                    attachments.get(id).map_or(&[], Vec::as_slice),
                    devices,
                ),
            })
        })
        .collect()
}

/// "tcx ingress on ifindex 7 (veth1)"; the device name comes from the devices that transmitted
/// in the window, all of whose namespaces can hold an ifindex 7, hence every candidate is named.
fn describe_attachments(
    attachments: &[bpf_stats::Attachment],
    devices: &[IfaceCounters],
) -> String {
    if attachments.is_empty() {
        return "no BPF link (legacy tc via netlink, socket, or other)".to_owned();
    }
    attachments
        .iter()
        .map(|a| match a.ifindex {
            Some(ifindex) => {
                let names: Vec<String> = devices
                    .iter()
                    .filter(|d| d.ifindex == ifindex)
                    .map(|d| String::from_utf8_lossy(d.name_bytes()).into_owned())
                    .collect();
                if names.is_empty() {
                    format!("{} on ifindex {ifindex}", a.kind)
                } else {
                    format!("{} on ifindex {ifindex} ({})", a.kind, names.join(" or "))
                }
            }
            None => a.kind.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// CPU time of all CPUs by state, from /proc/stat.
fn cpu_ticks() -> Result<CpuTicks, Error> {
    use procfs::CurrentSI as _;
    let stats = procfs::KernelStats::current()
        .map_err(|e| Error::io("read /proc/stat", std::io::Error::other(e.to_string())))?;
    let t = stats.total;
    Ok(CpuTicks {
        user: t.user,
        nice: t.nice,
        system: t.system,
        idle: t.idle,
        iowait: t.iowait.unwrap_or(0),
        irq: t.irq.unwrap_or(0),
        softirq: t.softirq.unwrap_or(0),
        steal: t.steal.unwrap_or(0),
    })
}

fn attach_sampler(
    prog: &mut PerfEvent,
    cpus: &[u32],
    config: &SamplerConfig,
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

pub(crate) fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Object(format!("program {name} missing from the eBPF object")))?;
    prog.try_into()
        .map_err(|e| Error::program(format!("program {name}"), e))
}

fn map_ref<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .map(name)
        .ok_or_else(|| Error::Object(format!("map {name} missing from the eBPF object")))?;
    T::try_from(map).map_err(|e| Error::map(name, e))
}

impl crate::session::Probe for Sampler {
    fn snapshot(&self) -> Result<Snapshot, Error> {
        Sampler::snapshot(self)
    }

    fn window(
        &self,
        start: &Snapshot,
        end: &Snapshot,
        bpf_stats: Option<&str>,
    ) -> Result<RawWindow, Error> {
        // Fresh symbols for every window: modules and BPF programs come and go. The same read
        // answers which components are absent, so /proc/kallsyms is parsed once per window.
        let kallsyms = Kallsyms::load()?;
        *self
            .unavailable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(crate::session::unavailable_components(&kallsyms));
        Sampler::window(self, start, end, &kallsyms, bpf_stats)
    }

    fn backend(&self) -> &'static str {
        if self.tracer.is_some() {
            "tracing"
        } else {
            "sampling"
        }
    }

    fn unavailable(&self) -> Vec<crate::breakdown::Unavailable> {
        let cached = self
            .unavailable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        cached.unwrap_or_else(|| match Kallsyms::load() {
            Ok(syms) => crate::session::unavailable_components(&syms),
            Err(e) => crate::components::COMPONENTS
                .iter()
                .map(|c| crate::breakdown::Unavailable {
                    name: c.name.to_owned(),
                    reason: e.to_string(),
                })
                .collect(),
        })
    }
}
