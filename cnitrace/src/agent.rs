//! The long-running agent: probes attached once, overlapping sessions as open windows, a
//! one-second snapshot ring for live rolling windows, and BPF run-time statistics enabled only
//! while a session is open.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    breakdown::PacketSelection,
    contract::{Breakdown, SessionRequest, SessionState, SessionView},
    netfilter,
    snapshot::Snapshot,
    window::{self, OpenWindow, Probes, WindowSpec},
};

/// Longest rolling window served by `GET /api/v1/breakdown`.
pub const MAX_ROLLING_S: u64 = 300;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_sessions: usize,
    pub max_duration_s: f64,
    /// Stopped sessions kept for retrieval; older ones are forgotten.
    pub keep_stopped: usize,
    /// Read the iptables/nftables rulesets around each session (the `netfilter` section's
    /// chains and rules per packet).
    pub read_rulesets: bool,
    /// The sampler's rate per CPU while a session is open.
    pub session_hz: u64,
    /// Its rate while only continuous readers (scrapes, rolling windows) want data; 0 keeps
    /// it detached then. With no reader at all it is always detached.
    pub continuous_hz: u64,
    /// The most of the node's CPU time the agent may take, percent: the rates are lowered
    /// to fit it.
    pub max_overhead_pct: f64,
    /// What one sample costs the CPU it interrupts, ns (calibrated by `cargo xtask bench`;
    /// raised to the sampler's measured run time when BPF statistics show more).
    pub sample_cost_ns: f64,
}

/// How long after its last read a continuous reader (a scrape, a rolling window) keeps the
/// sampler attached: longer than any usual scrape interval, so a scraper that misses a few
/// scrapes does not lose its counters.
pub const READER_GONE_S: u64 = 300;

/// The default budget, percent of the node's CPU time (see the README's overhead section).
pub const DEFAULT_MAX_OVERHEAD_PCT: f64 = 2.0;
/// The default cost of one sample, ns: the sampler's run time under traffic by BPF statistics
/// (4.8 us at 999 Hz on a 2-vCPU VM, an upper bound: statistics add two clock reads) plus the
/// timer interrupt it rides on. At a fixed load the node's busy time grew by less than 2.3 us
/// per sample (95% bound; BENCHMARKS.md, fixed-load rounds), so this errs on the high side.
pub const DEFAULT_SAMPLE_COST_NS: f64 = 6_000.0;

/// The agent process's share of the node's CPU time, smoothed over about ten seconds.
#[derive(Debug, Default)]
struct ProcessCpu {
    last: Option<(Instant, f64)>,
    share: f64,
}

impl ProcessCpu {
    /// Folds in the CPU seconds used since the last call.
    fn update(&mut self) {
        let Some(used) = process_cpu_seconds() else {
            return;
        };
        let now = Instant::now();
        if let Some((then, before)) = self.last {
            let elapsed = now.duration_since(then).as_secs_f64();
            if elapsed > 0.0 {
                // The node's CPUs, not the container's quota: the budget is a share of the node.
                let cpus = aya::util::online_cpus().map_or(1, |cpus| cpus.len().max(1)) as f64;
                let share = (used - before) / elapsed / cpus;
                self.share += (share - self.share) * 0.1;
            }
        }
        self.last = Some((now, used));
    }
}

/// This process's user and system CPU seconds.
fn process_cpu_seconds() -> Option<f64> {
    let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
    Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 8,
            max_duration_s: 3600.0,
            keep_stopped: 64,
            read_rulesets: true,
            session_hz: crate::probe::sampling::DEFAULT_FREQUENCY_HZ,
            continuous_hz: crate::probe::sampling::DEFAULT_CONTINUOUS_HZ,
            max_overhead_pct: DEFAULT_MAX_OVERHEAD_PCT,
            sample_cost_ns: DEFAULT_SAMPLE_COST_NS,
        }
    }
}

/// Why a request could not be served; the HTTP layer maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no session {0}")]
    NotFound(u64),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooMany(String),
    #[error("measurement failed: {0}")]
    Probe(#[from] crate::Error),
}

struct SessionEntry {
    view: SessionView,
    /// `Some` while running; taken by the stop that closes it.
    window: Option<OpenWindow>,
    /// A stopped session's sampled stacks as gzipped JSON: kept for its flame graph and
    /// profile, a tenth of their size in memory.
    stacks_gz: Option<Vec<u8>>,
    /// Its stacks were dropped to keep [`MAX_STOPPED_STACKS_BYTES`].
    stacks_dropped: bool,
}

/// The most memory stopped sessions' stacks may take together; past it the oldest sessions'
/// stacks go (their breakdowns stay), and asking for their flame graph says why.
pub const MAX_STOPPED_STACKS_BYTES: usize = 32 << 20;

/// What the agent holds between windows and what its budgets dropped, for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Held {
    pub epochs: crate::probe::Maintenance,
    pub stopped_stacks_bytes: usize,
    pub stopped_stacks_dropped: u64,
}

fn gzip_json(value: &impl serde::Serialize) -> Option<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    serde_json::to_writer(&mut gz, value).ok()?;
    gz.finish().ok()
}

fn gunzip_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::from_reader(flate2::read::GzDecoder::new(bytes)).ok()
}

pub struct Agent {
    probes: Box<dyn Probes>,
    limits: Limits,
    next_id: AtomicU64,
    sessions: Mutex<BTreeMap<u64, SessionEntry>>,
    /// Snapshots for rolling windows, newest last, numbered by tick: one a second for the
    /// last [`DENSE_S`] seconds, then one per [`SPARSE_EVERY_S`] seconds back to
    /// [`MAX_ROLLING_S`], so the ring holds ~40 snapshots instead of 301.
    ring: Mutex<VecDeque<(u64, Snapshot)>>,
    ticks: AtomicU64,
    /// When a rolling window was last read (seconds since start; [`NEVER`] before the first).
    rolling_read_s: AtomicU64,
    /// The longest rolling window asked for lately, and when (seconds since start): the ring
    /// keeps that much history, not always the longest allowed.
    rolling_longest: Mutex<(u64, u64)>,
    /// When a scrape last read the counters (seconds since start; [`NEVER`] before the first).
    scraped_s: AtomicU64,
    /// Sessions between validation and insertion: their windows open at the session rate.
    opening: AtomicUsize,
    /// Serializes rate decisions, so two of them cannot interleave detach and attach.
    rate_lock: Mutex<()>,
    process_cpu: Mutex<ProcessCpu>,
    /// The sampler's run time per sample measured by BPF statistics (ns, as f64 bits; 0
    /// before a session measured it).
    measured_sample_ns: AtomicU64,
    /// The last map maintenance's figures.
    maintenance: Mutex<crate::probe::Maintenance>,
    stopped_stacks_dropped: AtomicU64,
    started: Instant,
}

const NEVER: u64 = u64::MAX;

/// Rolling windows up to this long start within a second of the length asked for.
const DENSE_S: u64 = 10;
/// Longer ones within this many seconds.
const SPARSE_EVERY_S: u64 = 10;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock must not take the agent down with it.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Agent {
    pub fn new(probes: Box<dyn Probes>, limits: Limits) -> Self {
        Self {
            probes,
            limits,
            next_id: AtomicU64::new(1),
            sessions: Mutex::new(BTreeMap::new()),
            ring: Mutex::new(VecDeque::new()),
            ticks: AtomicU64::new(0),
            rolling_read_s: AtomicU64::new(NEVER),
            rolling_longest: Mutex::new((0, 0)),
            scraped_s: AtomicU64::new(NEVER),
            opening: AtomicUsize::new(0),
            rate_lock: Mutex::new(()),
            process_cpu: Mutex::new(ProcessCpu::default()),
            measured_sample_ns: AtomicU64::new(0),
            maintenance: Mutex::new(crate::probe::Maintenance::default()),
            stopped_stacks_dropped: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn probes(&self) -> &dyn Probes {
        self.probes.as_ref()
    }

    /// Adds a snapshot to the rolling ring (called once a second) while someone reads rolling
    /// windows: an agent nobody asks anything reads no map and keeps no history. Returns
    /// whether a snapshot was taken.
    pub fn tick(&self) -> Result<bool, crate::Error> {
        let last_read = self.rolling_read_s.load(Ordering::Relaxed);
        let now = self.started.elapsed().as_secs();
        if last_read == NEVER || now.saturating_sub(last_read) > MAX_ROLLING_S {
            let mut ring = lock(&self.ring);
            ring.clear();
            ring.shrink_to_fit();
            return Ok(false);
        }
        let snapshot = self.probes.snapshot()?;
        let tick = self.ticks.fetch_add(1, Ordering::Relaxed);
        // Every snapshot copies the sample maps: hold the history readers ask for (plus one
        // sparse step), not five minutes of it for a page that reads ten seconds.
        let keep = (lock(&self.rolling_longest).1 + SPARSE_EVERY_S).min(MAX_ROLLING_S);
        let mut ring = lock(&self.ring);
        ring.push_back((tick, snapshot));
        ring.retain(|(taken, _)| {
            let age = tick - taken;
            age <= keep && (age <= DENSE_S || taken % SPARSE_EVERY_S == 0)
        });
        Ok(true)
    }

    /// Keeps the kernel maps from filling (see [`Probes::maintain`]): `also_held` is a
    /// baseline kept outside the agent (the metrics' last scrape).
    pub fn maintain(
        &self,
        also_held: Option<Instant>,
    ) -> Result<crate::probe::Maintenance, crate::Error> {
        let sessions = lock(&self.sessions)
            .values()
            .filter_map(|s| s.window.as_ref().map(|w| w.start().mono))
            .min();
        let ring = lock(&self.ring).front().map(|(_, s)| s.mono);
        let oldest = [sessions, ring, also_held].into_iter().flatten().min();
        // A quarter full: every snapshot held (ring, sessions, scrape baseline) copies the
        // sample keys, so fewer keys is less memory; the rest of the map takes the new
        // epoch's keys while the old one drains.
        let advance_at = self
            .probes
            .sample_capacity()
            .min(cnitrace_common::MAX_STACKS as usize)
            / 4;
        let done = self.probes.maintain(oldest, advance_at)?;
        *lock(&self.maintenance) = done;
        Ok(done)
    }

    /// What is held between windows and what the budgets dropped.
    pub fn held(&self) -> Held {
        let stopped_stacks_bytes = lock(&self.sessions)
            .values()
            .filter_map(|s| s.stacks_gz.as_ref().map(Vec::len))
            .sum();
        Held {
            epochs: *lock(&self.maintenance),
            stopped_stacks_bytes,
            stopped_stacks_dropped: self.stopped_stacks_dropped.load(Ordering::Relaxed),
        }
    }

    /// Drops the oldest stopped sessions' stacks until the rest fit the budget.
    fn keep_stacks_within(&self, sessions: &mut BTreeMap<u64, SessionEntry>) {
        let mut total: usize = sessions
            .values()
            .filter_map(|s| s.stacks_gz.as_ref().map(Vec::len))
            .sum();
        for entry in sessions.values_mut() {
            if total <= MAX_STOPPED_STACKS_BYTES {
                break;
            }
            if let Some(stacks) = entry.stacks_gz.take() {
                total -= stacks.len();
                entry.stacks_dropped = true;
                self.stopped_stacks_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A scrape read the counters: the sampler runs at least at the continuous rate for
    /// [`READER_GONE_S`] from now.
    pub fn scraped(&self) {
        self.scraped_s
            .store(self.started.elapsed().as_secs(), Ordering::Relaxed);
        self.apply_rate();
    }

    /// Whether a scrape read the counters in the last [`READER_GONE_S`].
    pub fn scraper_present(&self) -> bool {
        self.recent(self.scraped_s.load(Ordering::Relaxed))
    }

    fn recent(&self, read_s: u64) -> bool {
        read_s != NEVER && self.started.elapsed().as_secs().saturating_sub(read_s) <= READER_GONE_S
    }

    /// The rate the readers need now: the session rate while a session is open or opening,
    /// the continuous rate while a scraper or a rolling reader came lately, else none.
    fn asked_rate(&self) -> u64 {
        if self.opening.load(Ordering::Relaxed) > 0 || Self::running(&lock(&self.sessions)) > 0 {
            return self.limits.session_hz;
        }
        if self.scraper_present() || self.recent(self.rolling_read_s.load(Ordering::Relaxed)) {
            return self.limits.continuous_hz;
        }
        0
    }

    /// The rate asked for, lowered to what the budget allows (at least 1 Hz while anyone
    /// reads), and why it was lowered.
    fn wanted_rate(&self) -> (u64, Option<String>) {
        let asked = self.asked_rate();
        let allowed = self.budget_rate();
        if asked <= allowed {
            return (asked, None);
        }
        let cost = self.cost();
        let why = format!(
            "sampling at {allowed} Hz instead of {asked} Hz: --max-overhead {}% allows that \
             much at {:.1} us per sample with the agent process at {:.2}% of the CPUs",
            self.limits.max_overhead_pct, cost.sample_cost_us, cost.process_cpu_percent
        );
        (allowed.max(1), Some(why))
    }

    /// The cost of one sample in use, ns.
    fn sample_cost_ns(&self) -> f64 {
        let measured = f64::from_bits(self.measured_sample_ns.load(Ordering::Relaxed));
        self.limits.sample_cost_ns.max(measured)
    }

    /// The highest rate per CPU the budget leaves room for, after the process's own CPU.
    fn budget_rate(&self) -> u64 {
        let process = lock(&self.process_cpu).share;
        let room = self.limits.max_overhead_pct / 100.0 - process;
        if room <= 0.0 {
            return 1;
        }
        (room / (self.sample_cost_ns() / 1e9)).floor() as u64
    }

    /// What the agent estimates it costs now, for the Breakdown and `/metrics`.
    pub fn cost(&self) -> crate::contract::AgentCost {
        let process = lock(&self.process_cpu).share;
        let rate = self.probes.rate();
        let per_sample = self.sample_cost_ns();
        crate::contract::AgentCost {
            max_overhead_percent: self.limits.max_overhead_pct,
            estimated_percent: (rate as f64 * per_sample / 1e9 + process) * 100.0,
            process_cpu_percent: process * 100.0,
            sample_cost_us: per_sample / 1e3,
            rate_hz: rate,
            limited: None,
        }
    }

    /// Measures the process's CPU and applies the rate (called once a second).
    pub fn keep_budget(&self) {
        lock(&self.process_cpu).update();
        self.apply_rate();
    }

    /// Sets the sampler to the rate the readers need. Called on every change of readers and
    /// once a second (readers that went away).
    pub fn apply_rate(&self) {
        if self.probes.backend() != crate::probe::Backend::Sampling {
            return;
        }
        let _serial = lock(&self.rate_lock);
        let (hz, limited) = self.wanted_rate();
        let current = self.probes.rate();
        if current == hz {
            return;
        }
        // A rate the budget holds down moves only by more than a fifth: the process's CPU
        // share wobbles, and every change makes the perf events anew on every CPU.
        if limited.is_some() && current != 0 && current.abs_diff(hz) * 5 < hz {
            return;
        }
        if let Some(why) = limited {
            tracing::warn!("{why}");
        }
        if let Err(e) = self.probes.set_rate(hz) {
            tracing::warn!("cannot set the sampling rate to {hz} Hz: {e}");
        }
    }

    /// The cost report of a session's window: also says when the budget held the rate down
    /// for part of it (the mean rate below the session rate), though not at its end.
    fn session_cost(
        &self,
        mut cost: crate::contract::AgentCost,
        breakdown: &Breakdown,
    ) -> crate::contract::AgentCost {
        let mean = breakdown.quality.frequency_hz;
        let sampling = self.probes.backend() == crate::probe::Backend::Sampling;
        if sampling
            && cost.limited.is_none()
            && (mean as f64) < self.limits.session_hz as f64 * 0.95
        {
            cost.limited = Some(format!(
                "the window sampled at {mean} Hz on average instead of {} Hz: --max-overhead \
                 held the rate down for part of it",
                self.limits.session_hz
            ));
        }
        cost
    }

    /// The agent's cost and budget, with why the rate is low if it is.
    fn cost_report(&self) -> crate::contract::AgentCost {
        crate::contract::AgentCost {
            limited: self.wanted_rate().1,
            ..self.cost()
        }
    }

    /// How many snapshots the ring holds now.
    pub fn ring_len(&self) -> usize {
        lock(&self.ring).len()
    }

    fn validate(&self, request: &SessionRequest) -> Result<WindowSpec, AgentError> {
        if let Some(d) = request.duration_s
            && (!d.is_finite() || d <= 0.0 || d > self.limits.max_duration_s)
        {
            return Err(AgentError::BadRequest(format!(
                "duration_s {d} is out of range: give seconds in (0, {}]",
                self.limits.max_duration_s
            )));
        }
        let running = self.probes.backend().name();
        match request.backend.as_deref() {
            None | Some("auto") => {}
            Some(asked) if asked == running => {}
            Some(asked @ ("sampling" | "tracing")) => {
                return Err(AgentError::BadRequest(format!(
                    "this agent runs the {running} backend (chosen at start-up with --backend); \
                     it cannot measure with {asked}"
                )));
            }
            Some(other) => {
                return Err(AgentError::BadRequest(format!(
                    "unknown backend `{other}`: use auto, sampling or tracing"
                )));
            }
        }
        let netns = request.netns.clone().unwrap_or_default();
        let spec = WindowSpec {
            ifaces: request.ifaces.clone().unwrap_or_default(),
            unit: request.packet_unit.unwrap_or_default(),
            view: request.view.unwrap_or_default(),
            // Rulesets are read (never changed) in this namespace and the named ones.
            netfilter: netfilter::Options {
                read_rules: self.limits.read_rulesets,
                count_entries: false,
                namespaces: netns.clone(),
            },
            netns,
            bpf_stats: true,
            stacks: true,
        };
        spec.validate()
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        Ok(spec)
    }

    fn running(sessions: &BTreeMap<u64, SessionEntry>) -> usize {
        sessions
            .values()
            .filter(|s| s.view.state == SessionState::Running)
            .count()
    }

    fn check_slots(&self, sessions: &BTreeMap<u64, SessionEntry>) -> Result<(), AgentError> {
        let running = Self::running(sessions);
        if running >= self.limits.max_sessions {
            return Err(AgentError::TooMany(format!(
                "{running} sessions are running, the limit is {}; stop one first",
                self.limits.max_sessions
            )));
        }
        Ok(())
    }

    /// Starts a session: validates, opens its window (BPF statistics, rulesets, snapshot).
    /// The window opens without the sessions lock held: reading rulesets can take a while.
    pub fn start_session(&self, request: &SessionRequest) -> Result<SessionView, AgentError> {
        let spec = self.validate(request)?;
        self.check_slots(&lock(&self.sessions))?;
        // The window opens at the session rate; whatever happens next, the rate follows the
        // sessions that are left.
        self.opening.fetch_add(1, Ordering::Relaxed);
        self.apply_rate();
        let inserted = self.open_and_insert(request, spec);
        self.opening.fetch_sub(1, Ordering::Relaxed);
        self.apply_rate();
        inserted
    }

    fn open_and_insert(
        &self,
        request: &SessionRequest,
        spec: WindowSpec,
    ) -> Result<SessionView, AgentError> {
        let window = OpenWindow::open(self.probes.as_ref(), &spec)?;
        let mut sessions = lock(&self.sessions);
        // Another start may have taken the last slot meanwhile.
        self.check_slots(&sessions)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let view = SessionView {
            id,
            state: SessionState::Running,
            started: window.start().wall,
            duration_s: request.duration_s,
            ifaces: spec.ifaces,
            netns: spec.netns,
            breakdown: None,
            error: None,
        };
        sessions.insert(
            id,
            SessionEntry {
                view: view.clone(),
                window: Some(window),
                stacks_gz: None,
                stacks_dropped: false,
            },
        );
        self.forget_old(&mut sessions);
        Ok(view)
    }

    fn forget_old(&self, sessions: &mut BTreeMap<u64, SessionEntry>) {
        let stopped: Vec<u64> = sessions
            .iter()
            .filter(|(_, s)| s.view.state != SessionState::Running)
            .map(|(id, _)| *id)
            .collect();
        for id in stopped
            .iter()
            .take(stopped.len().saturating_sub(self.limits.keep_stopped))
        {
            sessions.remove(id);
        }
    }

    pub fn session(&self, id: u64) -> Result<SessionView, AgentError> {
        lock(&self.sessions)
            .get(&id)
            .map(|s| s.view.clone())
            .ok_or(AgentError::NotFound(id))
    }

    /// All sessions, without their breakdowns.
    pub fn sessions(&self) -> Vec<SessionView> {
        lock(&self.sessions)
            .values()
            .map(|s| SessionView {
                breakdown: None,
                ..s.view.clone()
            })
            .collect()
    }

    /// Stops a running session and computes its breakdown.
    pub fn stop_session(&self, id: u64) -> Result<SessionView, AgentError> {
        let window = {
            let mut sessions = lock(&self.sessions);
            let entry = sessions.get_mut(&id).ok_or(AgentError::NotFound(id))?;
            // Taking the window makes this stop the only one that closes it.
            entry
                .window
                .take()
                .ok_or_else(|| AgentError::Conflict(format!("session {id} is already stopped")))?
        };
        let mut result = window.close(self.probes.as_ref());
        // Before the sessions lock: the report asks which sessions run, and compressing the
        // stacks takes a while that list and get requests should not wait for.
        let cost = self.cost_report();
        let stacks_gz = result
            .as_mut()
            .ok()
            .and_then(|b| b.stacks.take())
            .as_ref()
            .and_then(gzip_json);
        let mut sessions = lock(&self.sessions);
        let entry = sessions.get_mut(&id).ok_or(AgentError::NotFound(id))?;
        match result {
            Ok(mut breakdown) => {
                if let Some(ns) = breakdown.quality.probe_cost_ns
                    && breakdown.quality.probe_runs > 0
                {
                    self.measured_sample_ns
                        .store(ns.to_bits(), Ordering::Relaxed);
                }
                breakdown.quality.agent_cost = Some(self.session_cost(cost, &breakdown));
                entry.stacks_gz = stacks_gz;
                entry.view.state = SessionState::Stopped;
                entry.view.breakdown = Some(breakdown);
            }
            Err(e) => {
                entry.view.state = SessionState::Failed;
                entry.view.error = Some(e.to_string());
            }
        }
        let view = entry.view.clone();
        self.keep_stacks_within(&mut sessions);
        drop(sessions);
        // The rate follows the sessions still running.
        self.apply_rate();
        Ok(view)
    }

    /// A stopped session's breakdown with its sampled stacks (for flame graphs).
    pub fn session_with_stacks(&self, id: u64) -> Result<Breakdown, AgentError> {
        let sessions = lock(&self.sessions);
        let entry = sessions.get(&id).ok_or(AgentError::NotFound(id))?;
        let Some(breakdown) = &entry.view.breakdown else {
            return Err(AgentError::Conflict(match entry.view.state {
                SessionState::Running => {
                    format!("session {id} is running: its stacks are there once it stops")
                }
                _ => format!(
                    "session {id} failed: {}",
                    entry.view.error.as_deref().unwrap_or("no breakdown")
                ),
            }));
        };
        if entry.stacks_dropped {
            return Err(AgentError::Conflict(format!(
                "session {id}'s stacks were dropped to keep the agent's memory budget \
                 ({} MiB for stopped sessions' stacks; newer sessions keep theirs)",
                MAX_STOPPED_STACKS_BYTES >> 20
            )));
        }
        let mut breakdown = breakdown.clone();
        let stacks_gz = entry.stacks_gz.clone();
        drop(sessions);
        breakdown.stacks = stacks_gz.as_deref().and_then(gunzip_json);
        Ok(breakdown)
    }

    /// The breakdown of the last `seconds`, from the snapshot ring; with `stacks`, its
    /// sampled stacks too.
    pub fn rolling(&self, seconds: u64, stacks: bool) -> Result<Breakdown, AgentError> {
        if seconds == 0 || seconds > MAX_ROLLING_S {
            return Err(AgentError::BadRequest(format!(
                "window={seconds} is out of range: give seconds in 1..={MAX_ROLLING_S}"
            )));
        }
        {
            // A longer window than asked lately widens the ring from now on (its first reads
            // get the history there is); one not asked again for five minutes stops counting.
            let now = self.started.elapsed().as_secs();
            let mut longest = lock(&self.rolling_longest);
            if seconds >= longest.1 || now.saturating_sub(longest.0) > MAX_ROLLING_S {
                *longest = (now, seconds);
            }
        }
        let start = {
            let ring = lock(&self.ring);
            let wanted = Duration::from_secs(seconds);
            // The snapshot whose age is closest to the window asked for.
            ring.iter()
                .map(|(_, snapshot)| snapshot)
                .min_by_key(|s| s.mono.elapsed().abs_diff(wanted))
                .cloned()
        };
        let idle = self
            .rolling_read_s
            .swap(self.started.elapsed().as_secs(), Ordering::Relaxed)
            == NEVER;
        self.apply_rate();
        let Some(start) = start else {
            return Err(AgentError::Conflict(if idle {
                "no history: the rolling window records only while it is read (it starts now); \
                 try again in a second"
                    .to_owned()
            } else {
                "no history yet; try again in a second".to_owned()
            }));
        };
        let end = self.probes.snapshot()?;
        let mut breakdown = window::between(
            self.probes.as_ref(),
            &start,
            &end,
            &PacketSelection::default(),
            None,
            stacks,
        )?;
        breakdown.quality.agent_cost = Some(self.cost_report());
        Ok(breakdown)
    }

    /// Running sessions whose duration has elapsed. A session opened without a duration
    /// ends after the longest one allowed: a client that dies (or forgets) cannot hold a slot
    /// and keep BPF statistics on for good.
    pub fn due_sessions(&self) -> Vec<u64> {
        // On the monotonic clock: a wall clock stepped back would keep a session forever.
        lock(&self.sessions)
            .values()
            .filter_map(|s| Some((s, s.window.as_ref()?)))
            .filter(|(s, window)| {
                let deadline = s.view.duration_s.unwrap_or(self.limits.max_duration_s);
                window.start().mono.elapsed().as_secs_f64() >= deadline
            })
            .map(|(s, _)| s.view.id)
            .collect()
    }
}
