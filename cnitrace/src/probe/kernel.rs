//! The attached probes of either backend: the packet and softirq counters, and the stack sampler
//! or the tracer. Programs are attached once; a window is the difference of two snapshots, so
//! nothing is reset or re-attached.

use std::collections::{BTreeMap, HashMap};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::{PerfEvent, RawTracePoint},
    util::online_cpus,
};
use cnitrace_common::{
    IfaceCounters, MAX_TRACE_COMPONENTS, NR_SOFTIRQS, SampleKey, SampleValue, SoftirqStats,
    StackFrames, TraceCost, fault, global, map, program,
};

use super::{
    Backend, EBPF_OBJECT, Maintenance, Probes, bpf_stats, btf, clock, devices, map_ref, memory,
    privileges, program_mut,
    sampling::{self, PacketSource, ProbeConfig, SoftirqSource, validate_frequency},
    trace,
};
use crate::{
    breakdown::{BpfProgramRun, CpuTicks, Faults, RawWindow, StackSample, TraceWindow},
    contract::{Clock, ClockSource, Unavailable},
    error::Error,
    kallsyms::Kallsyms,
    snapshot::Snapshot,
};

/// The loaded and attached probes: the packet and softirq counters, and either the stack
/// sampler or the tracer. Dropping it detaches and unloads every program.
pub struct KernelProbes {
    /// Locked to read maps, and to attach or detach the sampler when its rate changes.
    ebpf: std::sync::Mutex<Ebpf>,
    /// The sampler's attachment (`None` for the tracing backend).
    sampler: std::sync::Mutex<Option<Sampler>>,
    packets: PacketSource,
    softirq: SoftirqSource,
    /// Set when this is the tracing backend.
    tracer: Option<trace::TracerState>,
    /// Components absent from the kernel, as of the last window's symbol read.
    unavailable: std::sync::Mutex<Option<Vec<Unavailable>>>,
    /// The symbol table of the last window, with what it was read for.
    symbols: std::sync::Mutex<Option<CachedSymbols>>,
    /// The sampler's epoch and the retired one waiting for deletion.
    epochs: std::sync::Mutex<Epochs>,
    clock: Clock,
    cpu_list: Vec<u32>,
    cpus: u32,
    sample_keys: u32,
}

/// The sampler's perf events at the current rate (none while detached) and the rates it ran
/// at.
struct Sampler {
    links: sampling::SamplerLinks,
    source: ClockSource,
    rates: sampling::RateHistory,
}

impl KernelProbes {
    /// Attaches the backend asked for; auto (`None`) is sampling, whose cost does not grow
    /// with the packet rate (tracing runs a probe pair per traced call: ask for it).
    pub fn start(backend: Option<Backend>, config: &ProbeConfig) -> Result<Self, Error> {
        Self::start_backend(backend.unwrap_or(Backend::Sampling), config)
    }

    /// Loads the object; attaches the exact packet and softirq probes when asked for, then the
    /// sampler on every online CPU or the tracer's probes.
    fn start_backend(backend: Backend, config: &ProbeConfig) -> Result<Self, Error> {
        validate_frequency(config.frequency_hz)?;
        privileges::check()?;
        privileges::raise_memlock_limit();
        let packets = config.packets;
        // The tracer has no stacks to time handlers from: it always times them exactly.
        let softirq = match backend {
            Backend::Tracing(_) => SoftirqSource::Exact,
            Backend::Sampling => config.softirq,
        };
        let mut loader = EbpfLoader::new();
        // Per-CPU maps are allocated for every possible CPU: sized from their number.
        let possible = aya::util::nr_cpus().unwrap_or(1);
        let sample_keys = memory::sample_keys(possible);
        loader
            .map_max_entries(map::SAMPLES, sample_keys)
            .map_max_entries(map::IFACES, memory::iface_slots(possible));
        // Struct offsets (from the kernel's BTF) are only needed by the exact packet counter.
        let offsets = if packets == PacketSource::Exact {
            Some(btf::packet_offsets()?)
        } else {
            None
        };
        if let Some(offsets) = &offsets {
            loader
                .override_global(global::SKB_LEN, &offsets.skb_len, true)
                .override_global(global::SKB_HEAD, &offsets.skb_head, true)
                .override_global(global::SKB_END, &offsets.skb_end, true)
                .override_global(global::SHINFO_GSO_SEGS, &offsets.shinfo_gso_segs, true)
                .override_global(global::DEV_NAME, &offsets.dev_name, true)
                .override_global(global::DEV_IFINDEX, &offsets.dev_ifindex, true)
                .override_global(global::DEV_ND_NET, &offsets.dev_nd_net, true)
                .override_global(global::NET_NS_INUM, &offsets.net_ns_inum, true);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| Error::Load(Box::new(e)))?;

        let mut raw_tracepoints = Vec::new();
        if packets == PacketSource::Exact {
            raw_tracepoints.push((program::TX_COUNTER, "net_dev_start_xmit"));
        }
        if softirq == SoftirqSource::Exact {
            raw_tracepoints.push((program::SOFTIRQ_ENTRY, "softirq_entry"));
            raw_tracepoints.push((program::SOFTIRQ_EXIT, "softirq_exit"));
        }
        for (name, tracepoint) in raw_tracepoints {
            let prog: &mut RawTracePoint = program_mut(&mut ebpf, name)?;
            prog.load()
                .map_err(|e| Error::program(format!("load {name}"), e))?;
            prog.attach(tracepoint).map_err(|e| {
                Error::program(format!("attach {name} to raw tracepoint {tracepoint}"), e)
            })?;
        }

        let cpus = online_cpus().map_err(|(path, e)| Error::io(format!("read {path}"), e))?;
        if let Backend::Tracing(mode) = backend {
            let kallsyms = Kallsyms::load()?;
            let tracer = trace::attach(&mut ebpf, mode, &kallsyms)?;
            let calibration = clock::calibrate(std::time::Duration::from_millis(100));
            return Ok(Self {
                ebpf: std::sync::Mutex::new(ebpf),
                sampler: std::sync::Mutex::new(None),
                packets,
                softirq,
                tracer: Some(tracer),
                unavailable: std::sync::Mutex::new(None),
                symbols: std::sync::Mutex::new(None),
                epochs: std::sync::Mutex::new(Epochs::default()),
                clock: Clock {
                    source: ClockSource::CpuClock,
                    cycles_per_ns: calibration.cycles_per_ns,
                    calibration: format!(
                        "probe times are bpf_ktime_get_ns x cycles_per_ns ({})",
                        calibration.method
                    ),
                },
                cpus: cpus.len() as u32,
                cpu_list: cpus,
                sample_keys,
            });
        }
        let prog: &mut PerfEvent = program_mut(&mut ebpf, program::SAMPLER)?;
        prog.load()
            .map_err(|e| Error::program(format!("load {}", program::SAMPLER), e))?;
        let (links, source) = sampling::attach(prog, &cpus, config.frequency_hz, config.clock)?;
        let clock = sampling::clock_of(source);
        tracing::debug!(?clock, cpus = cpus.len(), "sampler attached");
        let sampler = Sampler {
            links,
            source,
            rates: sampling::RateHistory::new(std::time::Instant::now(), config.frequency_hz),
        };
        Ok(Self {
            ebpf: std::sync::Mutex::new(ebpf),
            sampler: std::sync::Mutex::new(Some(sampler)),
            packets,
            softirq,
            tracer: None,
            unavailable: std::sync::Mutex::new(None),
            symbols: std::sync::Mutex::new(None),
            epochs: std::sync::Mutex::new(Epochs::default()),
            clock,
            cpus: cpus.len() as u32,
            cpu_list: cpus,
            sample_keys,
        })
    }

    fn ebpf(&self) -> std::sync::MutexGuard<'_, Ebpf> {
        self.ebpf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sampler(&self) -> std::sync::MutexGuard<'_, Option<Sampler>> {
        self.sampler
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Samples at `hz` per CPU from now on; 0 detaches the sampler (nothing of it runs).
    /// The perf events are made anew at the new rate: between the old ones' detach and the
    /// new ones' attach (well under a millisecond) no sample is taken.
    pub fn set_rate(&self, hz: u64) -> Result<(), Error> {
        if hz != 0 {
            validate_frequency(hz)?;
        }
        let mut guard = self.sampler();
        let Some(sampler) = guard.as_mut() else {
            return Ok(());
        };
        if sampler.rates.current() == hz {
            return Ok(());
        }
        sampler.links.clear();
        let now = std::time::Instant::now();
        if hz == 0 {
            sampler.rates.set(now, 0);
            tracing::debug!("sampler detached");
            return Ok(());
        }
        let mut ebpf = self.ebpf();
        let prog: &mut PerfEvent = program_mut(&mut ebpf, program::SAMPLER)?;
        match sampling::reattach(prog, &self.cpu_list, hz, sampler.source) {
            Ok(links) => {
                sampler.links = links;
                sampler.rates.set(now, hz);
                tracing::debug!(hz, "sampler rate set");
                Ok(())
            }
            Err(e) => {
                sampler.rates.set(now, 0);
                Err(e)
            }
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// What the tracer attached, when this is the tracing backend.
    pub fn tracer(&self) -> Option<&trace::TracerState> {
        self.tracer.as_ref()
    }

    /// The sampler's rate now (0 when detached or tracing).
    pub fn frequency_hz(&self) -> u64 {
        self.sampler().as_ref().map_or(0, |s| s.rates.current())
    }

    /// The sampler's mean rate between two instants.
    fn mean_frequency_hz(&self, start: std::time::Instant, end: std::time::Instant) -> f64 {
        self.sampler()
            .as_ref()
            .map_or(0.0, |s| s.rates.mean_hz(start, end))
    }

    /// Reads the cumulative aggregates. Cheap enough to call every second.
    pub fn snapshot(&self) -> Result<Snapshot, Error> {
        let wall = chrono::Utc::now();
        let mono = std::time::Instant::now();
        let ebpf = self.ebpf();
        let samples_map: PerCpuHashMap<&MapData, SampleKey, SampleValue> =
            map_ref(&ebpf, map::SAMPLES)?;
        let mut samples = HashMap::new();
        for entry in &samples_map {
            let (key, per_cpu) = entry.map_err(|e| Error::map(map::SAMPLES, e))?;
            let total = per_cpu
                .iter()
                .fold(SampleValue::default(), |acc, v| acc.plus(v));
            samples.insert(key, total);
        }
        let mut ifaces = BTreeMap::new();
        let mut device_mtu = BTreeMap::new();
        match self.packets {
            PacketSource::Exact => {
                let ifaces_map: PerCpuHashMap<&MapData, u64, IfaceCounters> =
                    map_ref(&ebpf, map::IFACES)?;
                for entry in &ifaces_map {
                    let (key, per_cpu) = entry.map_err(|e| Error::map(map::IFACES, e))?;
                    let total = per_cpu
                        .iter()
                        .fold(IfaceCounters::default(), |acc, c| acc.plus(c));
                    ifaces.insert(key, total);
                }
            }
            PacketSource::Devices => {
                for (key, device) in devices::read_all()? {
                    ifaces.insert(key, device.counters);
                    device_mtu.insert(key, device.mtu);
                }
            }
        }
        let softirq = match self.softirq {
            SoftirqSource::Exact => {
                let softirq_map: PerCpuArray<&MapData, SoftirqStats> =
                    map_ref(&ebpf, map::SOFTIRQ)?;
                (0..NR_SOFTIRQS)
                    .map(|vector| {
                        let per_cpu = softirq_map
                            .get(&vector, 0)
                            .map_err(|e| Error::map(map::SOFTIRQ, e))?;
                        Ok(per_cpu
                            .iter()
                            .fold(SoftirqStats::default(), |acc, s| acc.plus(s)))
                    })
                    .collect::<Result<Vec<_>, Error>>()?
            }
            SoftirqSource::Sampled => proc_softirqs()?,
        };
        let cpu = cpu_ticks()?;
        let faults_map: PerCpuArray<&MapData, u64> = map_ref(&ebpf, map::FAULTS)?;
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
            trace_resync: fault_sum(fault::TRACE_RESYNC)?,
            trace_unmatched_exit: fault_sum(fault::TRACE_UNMATCHED_EXIT)?,
            trace_unknown_function: fault_sum(fault::TRACE_UNKNOWN_FUNCTION)?,
            samples_dropped: 0,
        };
        let trace = if self.tracer.is_some() {
            let trace_map: PerCpuArray<&MapData, TraceCost> = map_ref(&ebpf, map::TRACE)?;
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
            device_mtu,
            softirq,
            cpu,
            bpf_programs: bpf_stats::programs(),
            faults,
            trace,
        })
    }

    /// The window between two snapshots, with stacks read from the kernel and symbolized.
    fn symbolized_window(
        &self,
        start: &Snapshot,
        end: &Snapshot,
        kallsyms: &Kallsyms,
        bpf_stats_mode: Option<&str>,
    ) -> Result<RawWindow, Error> {
        let frequency_hz = self.mean_frequency_hz(start.mono, end.mono);
        let ebpf = self.ebpf();
        let epochs = self
            .epochs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut delta = end.delta_with_retired(start, epochs.retired_after(start.mono));
        delta.faults.samples_dropped = epochs.dropped_since(start.mono);
        let ifaces_for_names: Vec<IfaceCounters> = end.ifaces.values().copied().collect();
        let stacks: BpfHashMap<&MapData, u64, StackFrames> = map_ref(&ebpf, map::STACKS)?;
        let symbolize = |ips: &[u64]| -> Vec<String> {
            ips.iter()
                .take_while(|&&ip| ip != 0)
                .map(|&ip| kallsyms.resolve(ip).unwrap_or("[unknown]").to_owned())
                .collect()
        };
        let mut frames_by_hash: HashMap<u64, Vec<String>> = HashMap::new();
        let mut samples = Vec::with_capacity(delta.samples.len());
        for (key, value) in delta.samples {
            let frames = if key.stack_hash == 0 {
                Vec::new()
            } else {
                frames_by_hash
                    .entry(key.stack_hash)
                    .or_insert_with(|| match stacks.get(&key.stack_hash, 0) {
                        Ok(stack) => symbolize(&stack.ips),
                        // A retired epoch's stack, moved out of the kernel map.
                        Err(_) => epochs
                            .retired_stack(key.stack_hash)
                            .map(|ips| symbolize(&ips))
                            .unwrap_or_default(),
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
            frequency_hz,
            cpus: self.cpus,
            samples,
            ifaces: delta.ifaces.into_values().collect(),
            softirq: delta.softirq,
            softirq_timed: self.softirq == SoftirqSource::Exact,
            packet_counter: match self.packets {
                PacketSource::Exact => "net_dev_start_xmit".to_owned(),
                PacketSource::Devices => "device counters (segments from bytes and MTU)".to_owned(),
            },
            cpu: delta.cpu,
            bpf_programs: bpf_window(start, end, &ifaces_for_names),
            bpf_stats: bpf_stats_mode.map(str::to_owned),
            faults: delta.faults,
            trace: self.tracer.as_ref().map(|tracer| {
                let costs = trace::costs_by_component(&delta.trace);
                TraceWindow {
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

/// Softirq runs per vector, all CPUs summed, from /proc/softirqs (no times: those come from
/// the sampled stacks).
fn proc_softirqs() -> Result<Vec<SoftirqStats>, Error> {
    let text = std::fs::read_to_string("/proc/softirqs")
        .map_err(|e| Error::io("read /proc/softirqs", e))?;
    Ok(crate::breakdown::parse_proc_softirqs(&text)
        .into_iter()
        .map(|count| SoftirqStats {
            count,
            ..SoftirqStats::default()
        })
        .collect())
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

#[derive(Debug, Default)]
struct Epochs {
    current: u32,
    /// A retired epoch whose keys are still in the kernel map, and when it was retired.
    retired: Option<(u32, std::time::Instant)>,
    /// Epochs moved out of the kernel map, oldest first, kept while a window measures from
    /// before their retirement.
    moved: Vec<RetiredEpoch>,
    /// Every stack the moved epochs hold, once: the same code path recurs in each epoch
    /// under a different hash.
    frames: std::collections::HashSet<std::sync::Arc<[u64]>>,
    /// Moved epochs dropped to keep [`MAX_HELD_BYTES`], newest last: when each was retired and
    /// how many samples it held, for the windows that measured from before.
    dropped: std::collections::VecDeque<(std::time::Instant, u64)>,
    /// Samples dropped by the budget since start.
    dropped_total: u64,
}

/// The most memory moved epochs may hold: a window open for an hour over a workload whose
/// stacks keep changing would otherwise keep every epoch of that hour. Past it the oldest
/// epochs go, and the windows that needed them say how many samples they may lack.
pub const MAX_HELD_BYTES: usize = 16 << 20;

/// Memory per kept sample key (key, value and the hash table's share).
const BYTES_PER_KEY: usize = 64;

/// The final values and stacks of a retired epoch's keys, deleted from the kernel map.
#[derive(Debug)]
struct RetiredEpoch {
    retired_at: std::time::Instant,
    samples: HashMap<SampleKey, SampleValue>,
    stacks: HashMap<u64, std::sync::Arc<[u64]>>,
}

impl Epochs {
    /// The final values of the keys of epochs retired after `instant`.
    fn retired_after(
        &self,
        instant: std::time::Instant,
    ) -> impl Iterator<Item = (&SampleKey, SampleValue)> {
        self.moved
            .iter()
            .filter(move |epoch| epoch.retired_at > instant)
            .flat_map(|epoch| epoch.samples.iter().map(|(key, value)| (key, *value)))
    }

    fn retired_stack(&self, hash: u64) -> Option<std::sync::Arc<[u64]>> {
        self.moved
            .iter()
            .find_map(|epoch| epoch.stacks.get(&hash).cloned())
    }

    /// Forgets the moved epochs no window needs any more: those retired before the oldest
    /// baseline was taken (all of them when nothing is held).
    fn forget_moved(&mut self, oldest_baseline: Option<std::time::Instant>) -> usize {
        let before = self.moved.len();
        self.moved
            .retain(|epoch| oldest_baseline.is_some_and(|oldest| oldest < epoch.retired_at));
        if self.moved.len() < before {
            self.frames
                .retain(|frames| std::sync::Arc::strong_count(frames) > 1);
        }
        before - self.moved.len()
    }

    fn intern(&mut self, frames: &[u64]) -> std::sync::Arc<[u64]> {
        if let Some(known) = self.frames.get(frames) {
            return std::sync::Arc::clone(known);
        }
        let frames: std::sync::Arc<[u64]> = frames.into();
        self.frames.insert(std::sync::Arc::clone(&frames));
        frames
    }

    fn keys_held(&self) -> usize {
        self.moved.iter().map(|epoch| epoch.samples.len()).sum()
    }

    /// Memory the moved epochs hold: their keys, and each distinct stack once.
    fn bytes_held(&self) -> usize {
        let frames: usize = self.frames.iter().map(|f| f.len() * 8 + 32).sum();
        self.keys_held() * BYTES_PER_KEY + frames
    }

    /// Drops the oldest moved epochs until the rest fit in `budget` bytes.
    fn keep_within(&mut self, budget: usize) {
        while !self.moved.is_empty() && self.bytes_held() > budget {
            let oldest = self.moved.remove(0);
            let samples = oldest.samples.values().map(|v| v.count).sum();
            // Keyed by its retirement: only windows from before it needed its samples.
            let retired_at = oldest.retired_at;
            drop(oldest);
            self.frames
                .retain(|frames| std::sync::Arc::strong_count(frames) > 1);
            self.dropped.push_back((retired_at, samples));
            self.dropped_total += samples;
            if self.dropped.len() > 1024 {
                self.dropped.pop_front();
            }
            tracing::warn!(
                samples,
                "a retired sample epoch was dropped to keep the agent's memory budget"
            );
        }
    }

    /// Samples of dropped epochs that a window measuring from `start` may lack.
    fn dropped_since(&self, start: std::time::Instant) -> u64 {
        self.dropped
            .iter()
            .filter(|(at, _)| *at > start)
            .map(|(_, samples)| samples)
            .sum()
    }
}

// bpf(2) map commands and the offsets of their bpf_attr fields (include/uapi/linux/bpf.h).
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// One map element operation by descriptor: aya's maps need `&mut` to write, and the probes
/// are shared by every window (`&self`).
fn map_elem(
    command: libc::c_long,
    map: &MapData,
    key: &[u8],
    value: Option<&[u8]>,
) -> std::io::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let mut attr = [0u8; 128];
    let fd = map.fd().as_fd().as_raw_fd();
    attr[0..4].copy_from_slice(&u32::try_from(fd).unwrap_or(u32::MAX).to_ne_bytes());
    attr[8..16].copy_from_slice(&(key.as_ptr() as u64).to_ne_bytes());
    if let Some(value) = value {
        attr[16..24].copy_from_slice(&(value.as_ptr() as u64).to_ne_bytes());
    }
    // The key and value slices outlive the call and hold the map's key_size and value_size
    // bytes, which is all the kernel reads through those pointers.
    let ret = bpf_stats::bpf(command, &mut attr);
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The map behind a name, for [`map_elem`].
fn map_data<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a MapData, Error> {
    match ebpf.map(name) {
        Some(
            aya::maps::Map::HashMap(data)
            | aya::maps::Map::PerCpuHashMap(data)
            | aya::maps::Map::Array(data),
        ) => Ok(data),
        _ => Err(Error::Object(format!(
            "map {name} missing from the eBPF object (or not a hash or array map)"
        ))),
    }
}

fn bytes_of<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: Pod types are plain data without padding bytes the kernel could not read.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>()) }
}

impl KernelProbes {
    fn maintain_maps(
        &self,
        oldest_baseline: Option<std::time::Instant>,
        advance_at: usize,
    ) -> Result<Maintenance, Error> {
        let ebpf = self.ebpf();
        let mut epochs = self
            .epochs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut done = Maintenance {
            epoch: epochs.current,
            ..Maintenance::default()
        };
        let samples: PerCpuHashMap<&MapData, SampleKey, SampleValue> =
            map_ref(&ebpf, map::SAMPLES)?;
        let stacks: BpfHashMap<&MapData, u64, StackFrames> = map_ref(&ebpf, map::STACKS)?;
        let (samples_data, stacks_data) = (
            map_data(&ebpf, map::SAMPLES)?,
            map_data(&ebpf, map::STACKS)?,
        );
        epochs.forget_moved(oldest_baseline);
        if let Some((retired, at)) = epochs.retired.take() {
            // Retired on the previous call: programs that read the old epoch have long
            // finished, so the keys are frozen. They leave the kernel map now, whatever
            // window is open, and their final values stay here for windows that measure
            // from before the retirement (a 5-minute rolling window must not hold the map
            // full for 5 minutes).
            let mut moved = RetiredEpoch {
                retired_at: at,
                samples: HashMap::new(),
                stacks: HashMap::new(),
            };
            let old_keys: Vec<SampleKey> = samples
                .keys()
                .filter_map(Result::ok)
                .filter(|key| key.epoch == retired)
                .collect();
            for key in old_keys {
                let Ok(per_cpu) = samples.get(&key, 0) else {
                    continue;
                };
                let total = per_cpu
                    .iter()
                    .fold(SampleValue::default(), |acc, v| acc.plus(v));
                if key.stack_hash != 0
                    && !moved.stacks.contains_key(&key.stack_hash)
                    && let Ok(stack) = stacks.get(&key.stack_hash, 0)
                {
                    let depth = stack.ips.iter().take_while(|&&ip| ip != 0).count();
                    let frames = epochs.intern(&stack.ips[..depth]);
                    moved.stacks.insert(key.stack_hash, frames);
                }
                if map_elem(BPF_MAP_DELETE_ELEM, samples_data, bytes_of(&key), None).is_ok() {
                    done.keys_deleted += 1;
                }
                moved.samples.insert(key, total);
            }
            // The epoch is mixed into the stack hash, so these stacks belong to no live key.
            for hash in moved.stacks.keys() {
                if map_elem(BPF_MAP_DELETE_ELEM, stacks_data, bytes_of(hash), None).is_ok() {
                    done.stacks_deleted += 1;
                }
            }
            // Nothing measures from before the retirement: the values are not needed.
            if oldest_baseline.is_some_and(|oldest| oldest < at) {
                epochs.moved.push(moved);
                epochs.keep_within(MAX_HELD_BYTES);
            }
            done.keys_held = epochs.keys_held();
            done.bytes_held = epochs.bytes_held();
            done.samples_dropped = epochs.dropped_total;
            return Ok(done);
        }
        done.keys_held = epochs.keys_held();
        done.bytes_held = epochs.bytes_held();
        done.samples_dropped = epochs.dropped_total;
        let keys = samples.keys().count();
        let stored = stacks.keys().count();
        if keys.max(stored) <= advance_at {
            return Ok(done);
        }
        let next = epochs.current.wrapping_add(1);
        map_elem(
            BPF_MAP_UPDATE_ELEM,
            map_data(&ebpf, map::EPOCH)?,
            bytes_of(&0u32),
            Some(bytes_of(&next)),
        )
        .map_err(|e| Error::io("advance the sampler's epoch", e))?;
        epochs.retired = Some((epochs.current, std::time::Instant::now()));
        epochs.current = next;
        tracing::debug!(
            keys,
            stacks = stored,
            epoch = next,
            "sampler epoch advanced"
        );
        done.epoch = next;
        done.advanced = true;
        Ok(done)
    }
}

/// A parsed /proc/kallsyms and what it depends on: the loaded modules and BPF programs
/// (JITed programs are symbols too). Every window and scrape used to parse the file again
/// (~150k lines, tens of MB at the peak); now only a module or program change does.
struct CachedSymbols {
    modules: u64,
    programs: Vec<u32>,
    kallsyms: std::sync::Arc<Kallsyms>,
}

/// A hash of /proc/modules (names, sizes, load addresses): changes when a module comes or goes.
fn modules_fingerprint() -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::fs::read("/proc/modules")
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

impl KernelProbes {
    /// The symbol table valid at `end`: the cached one while modules and BPF programs are
    /// those it was read with, else a fresh read (which also updates the absent components).
    fn symbols_for(&self, end: &Snapshot) -> Result<std::sync::Arc<Kallsyms>, Error> {
        let modules = modules_fingerprint();
        let programs: Vec<u32> = end.bpf_programs.keys().copied().collect();
        let mut cache = self
            .symbols
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(cached) = cache.as_ref()
            && cached.modules == modules
            && cached.programs == programs
        {
            return Ok(std::sync::Arc::clone(&cached.kallsyms));
        }
        let kallsyms = std::sync::Arc::new(Kallsyms::load()?);
        *self
            .unavailable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(crate::components::unavailable(&kallsyms));
        *cache = Some(CachedSymbols {
            modules,
            programs,
            kallsyms: std::sync::Arc::clone(&kallsyms),
        });
        Ok(kallsyms)
    }
}

impl Probes for KernelProbes {
    fn snapshot(&self) -> Result<Snapshot, Error> {
        KernelProbes::snapshot(self)
    }

    fn set_rate(&self, hz: u64) -> Result<(), Error> {
        KernelProbes::set_rate(self, hz)
    }

    fn rate(&self) -> u64 {
        self.frequency_hz()
    }

    fn sample_capacity(&self) -> usize {
        self.sample_keys as usize
    }

    fn sampled_throughout(&self, start: std::time::Instant, end: std::time::Instant) -> bool {
        // The tracer does not sample: its windows never have a detached part.
        self.sampler()
            .as_ref()
            .is_none_or(|s| s.rates.attached_throughout(start, end))
    }

    fn maintain(
        &self,
        oldest_baseline: Option<std::time::Instant>,
        advance_at: usize,
    ) -> Result<Maintenance, Error> {
        self.maintain_maps(oldest_baseline, advance_at)
    }

    fn window(
        &self,
        start: &Snapshot,
        end: &Snapshot,
        bpf_stats: Option<&str>,
    ) -> Result<RawWindow, Error> {
        let kallsyms = self.symbols_for(end)?;
        self.symbolized_window(start, end, &kallsyms, bpf_stats)
    }

    fn backend(&self) -> Backend {
        match &self.tracer {
            Some(tracer) => Backend::Tracing(tracer.mode),
            None => Backend::Sampling,
        }
    }

    fn unavailable(&self) -> Vec<Unavailable> {
        let cached = self
            .unavailable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        cached.unwrap_or_else(|| match Kallsyms::load() {
            Ok(syms) => crate::components::unavailable(&syms),
            Err(e) => crate::components::COMPONENTS
                .iter()
                .map(|c| Unavailable {
                    name: c.name.to_owned(),
                    reason: e.to_string(),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use cnitrace_common::{SampleKey, SampleValue};

    use super::{BYTES_PER_KEY, Epochs, RetiredEpoch};

    fn epoch(epochs: &mut Epochs, retired_at: Instant, id: u32, keys: u64) -> RetiredEpoch {
        let mut moved = RetiredEpoch {
            retired_at,
            samples: std::collections::HashMap::new(),
            stacks: std::collections::HashMap::new(),
        };
        for hash in 0..keys {
            let key = SampleKey {
                stack_hash: hash + 1,
                flags: 0,
                epoch: id,
            };
            moved.samples.insert(
                key,
                SampleValue {
                    count: 2,
                    period: 2,
                },
            );
            let frames = epochs.intern(&[hash, hash + 1]);
            moved.stacks.insert(hash + 1, frames);
        }
        moved
    }

    /// Past the budget the oldest epochs go; a window from before them learns how many
    /// samples it may lack, one from after them nothing.
    #[test]
    fn the_memory_budget_drops_the_oldest_epochs_and_says_how_much() {
        let t0 = Instant::now();
        let mut epochs = Epochs::default();
        for id in 0..4u32 {
            let retired = t0 + Duration::from_secs(u64::from(id) + 1);
            let moved = epoch(&mut epochs, retired, id, 1000);
            epochs.moved.push(moved);
        }
        // The same code paths recur in every epoch: their stacks are held once.
        let frames = 1000 * (2 * 8 + 32);
        assert_eq!(epochs.bytes_held(), 4000 * BYTES_PER_KEY + frames);
        let two_epochs = 2000 * BYTES_PER_KEY + frames;
        epochs.keep_within(two_epochs);
        assert_eq!(epochs.moved.len(), 2, "two epochs fit");
        assert_eq!(epochs.bytes_held(), two_epochs);
        assert_eq!(epochs.dropped_total, 2 * 1000 * 2);
        assert_eq!(epochs.dropped_since(t0), 4000, "a window from before both");
        // Epochs 0 and 1 retired at t0+1 s and t0+2 s: a window from t0+1.5 s needed only
        // epoch 1's samples, one from after both none.
        assert_eq!(epochs.dropped_since(t0 + Duration::from_millis(1500)), 2000);
        assert_eq!(epochs.dropped_since(t0 + Duration::from_secs(3)), 0);
    }
}
