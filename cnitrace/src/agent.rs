//! The long-running agent: probes attached once, overlapping sessions as snapshot differences,
//! a one-second snapshot ring for live rolling windows, and BPF run-time statistics enabled only
//! while a session is open.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    breakdown::{Breakdown, PacketSelection, PacketUnit},
    netns,
    probe::bpf_stats::StatsGuard,
    session::{self, Probe, Snapshot},
};

/// Longest rolling window served by `GET /api/v1/breakdown`.
pub const MAX_ROLLING_S: u64 = 300;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_sessions: usize,
    pub max_duration_s: f64,
    /// Stopped sessions kept for retrieval; older ones are forgotten.
    pub keep_stopped: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 8,
            max_duration_s: 3600.0,
            keep_stopped: 64,
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

/// `POST /api/v1/sessions` body. Every field is optional.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// Stop by itself after this many seconds; open until stopped if absent.
    pub duration_s: Option<f64>,
    /// `auto` or `sampling` (tracing is not available in this build).
    pub backend: Option<String>,
    /// Interfaces whose transmitted packets are the denominator (default: the busiest device).
    pub ifaces: Option<Vec<String>>,
    /// Named network namespaces the interfaces may be in.
    pub netns: Option<Vec<String>>,
    /// `segment` (default) or `skb`.
    pub packet_unit: Option<PacketUnit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Running,
    Stopped,
    Failed,
}

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub id: u64,
    pub state: SessionState,
    pub started: DateTime<Utc>,
    pub duration_s: Option<f64>,
    pub ifaces: Vec<String>,
    pub netns: Vec<String>,
    /// Present once the session has stopped.
    pub breakdown: Option<Breakdown>,
    /// Present if computing the breakdown failed.
    pub error: Option<String>,
}

struct SessionEntry {
    view: SessionView,
    start: Snapshot,
    selection: PacketSelection,
}

pub struct Agent {
    probe: Box<dyn Probe>,
    limits: Limits,
    next_id: AtomicU64,
    sessions: Mutex<BTreeMap<u64, SessionEntry>>,
    /// One snapshot per second, newest last.
    ring: Mutex<VecDeque<Snapshot>>,
    /// Held while at least one session runs.
    stats: Mutex<Option<StatsGuard>>,
    started: Instant,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock must not take the agent down with it.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Agent {
    pub fn new(probe: Box<dyn Probe>, limits: Limits) -> Self {
        Self {
            probe,
            limits,
            next_id: AtomicU64::new(1),
            sessions: Mutex::new(BTreeMap::new()),
            ring: Mutex::new(VecDeque::new()),
            stats: Mutex::new(None),
            started: Instant::now(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn probe(&self) -> &dyn Probe {
        self.probe.as_ref()
    }

    /// Adds a snapshot to the rolling ring (called once a second).
    pub fn tick(&self) -> Result<(), crate::Error> {
        let snapshot = self.probe.snapshot()?;
        let mut ring = lock(&self.ring);
        ring.push_back(snapshot);
        while ring.len() > MAX_ROLLING_S as usize + 1 {
            ring.pop_front();
        }
        Ok(())
    }

    fn validate(&self, request: &SessionRequest) -> Result<PacketSelection, AgentError> {
        if let Some(d) = request.duration_s
            && (!d.is_finite() || d <= 0.0 || d > self.limits.max_duration_s)
        {
            return Err(AgentError::BadRequest(format!(
                "duration_s {d} is out of range: give seconds in (0, {}]",
                self.limits.max_duration_s
            )));
        }
        match request.backend.as_deref() {
            None | Some("auto" | "sampling") => {}
            Some("tracing") => {
                return Err(AgentError::BadRequest(
                    "backend tracing is not available in this build; use sampling or auto"
                        .to_owned(),
                ));
            }
            Some(other) => {
                return Err(AgentError::BadRequest(format!(
                    "unknown backend `{other}`: use auto, sampling or tracing"
                )));
            }
        }
        let ifaces = request.ifaces.clone().unwrap_or_default();
        let namespaces = request.netns.clone().unwrap_or_default();
        netns::validate_interfaces(&ifaces, &namespaces)
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let netns_inodes = netns::selection_inodes(&ifaces, &namespaces)?;
        Ok(PacketSelection {
            ifaces,
            netns_inodes,
            unit: request.packet_unit.unwrap_or_default(),
        })
    }

    /// Starts a session: validates, takes the start snapshot, enables BPF statistics.
    pub fn start_session(&self, request: &SessionRequest) -> Result<SessionView, AgentError> {
        let selection = self.validate(request)?;
        let mut sessions = lock(&self.sessions);
        let running = sessions
            .values()
            .filter(|s| s.view.state == SessionState::Running)
            .count();
        if running >= self.limits.max_sessions {
            return Err(AgentError::TooMany(format!(
                "{running} sessions are running, the limit is {}; stop one first",
                self.limits.max_sessions
            )));
        }
        {
            let mut stats = lock(&self.stats);
            if stats.is_none() {
                *stats = self.probe.enable_bpf_stats();
            }
        }
        let start = self.probe.snapshot()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let view = SessionView {
            id,
            state: SessionState::Running,
            started: start.wall,
            duration_s: request.duration_s,
            ifaces: selection.ifaces.clone(),
            netns: request.netns.clone().unwrap_or_default(),
            breakdown: None,
            error: None,
        };
        sessions.insert(
            id,
            SessionEntry {
                view: view.clone(),
                start,
                selection,
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
        let (start, selection) = {
            let sessions = lock(&self.sessions);
            let entry = sessions.get(&id).ok_or(AgentError::NotFound(id))?;
            if entry.view.state != SessionState::Running {
                return Err(AgentError::Conflict(format!(
                    "session {id} is already stopped"
                )));
            }
            (entry.start.clone(), entry.selection.clone())
        };
        let stats_mode = lock(&self.stats).as_ref().map(|g| g.mode().to_owned());
        let result = self
            .probe
            .snapshot()
            .and_then(|end| self.probe.window(&start, &end, stats_mode.as_deref()))
            .map(|raw| session::breakdown_from(self.probe.as_ref(), &raw, &selection));
        let mut sessions = lock(&self.sessions);
        let entry = sessions.get_mut(&id).ok_or(AgentError::NotFound(id))?;
        if entry.view.state != SessionState::Running {
            // A concurrent stop won the race; its result stands.
            return Err(AgentError::Conflict(format!(
                "session {id} is already stopped"
            )));
        }
        match result {
            Ok(breakdown) => {
                entry.view.state = SessionState::Stopped;
                entry.view.breakdown = Some(breakdown);
            }
            Err(e) => {
                entry.view.state = SessionState::Failed;
                entry.view.error = Some(e.to_string());
            }
        }
        let view = entry.view.clone();
        if !sessions
            .values()
            .any(|s| s.view.state == SessionState::Running)
        {
            // Nothing measures any more: statistics off (restoring the sysctl if we set it).
            lock(&self.stats).take();
        }
        Ok(view)
    }

    /// The breakdown of the last `seconds`, from the snapshot ring.
    pub fn rolling(&self, seconds: u64) -> Result<Breakdown, AgentError> {
        if seconds == 0 || seconds > MAX_ROLLING_S {
            return Err(AgentError::BadRequest(format!(
                "window={seconds} is out of range: give seconds in 1..={MAX_ROLLING_S}"
            )));
        }
        let start = {
            let ring = lock(&self.ring);
            let wanted = Duration::from_secs(seconds);
            // The snapshot whose age is closest to the window asked for.
            ring.iter()
                .min_by_key(|s| s.mono.elapsed().abs_diff(wanted))
                .cloned()
        };
        let Some(start) = start else {
            return Err(AgentError::Conflict(format!(
                "no history yet (the agent started {:.1} s ago); try again in a second",
                self.started.elapsed().as_secs_f64()
            )));
        };
        let end = self.probe.snapshot()?;
        let raw = self.probe.window(&start, &end, None)?;
        Ok(session::breakdown_from(
            self.probe.as_ref(),
            &raw,
            &PacketSelection::default(),
        ))
    }

    /// Running sessions whose duration has elapsed.
    pub fn due_sessions(&self) -> Vec<u64> {
        let now = Utc::now();
        lock(&self.sessions)
            .values()
            .filter(|s| s.view.state == SessionState::Running)
            .filter(|s| {
                s.view
                    .duration_s
                    .is_some_and(|d| (now - s.view.started).num_milliseconds() as f64 >= d * 1000.0)
            })
            .map(|s| s.view.id)
            .collect()
    }
}
