//! The one path from attached probes to a Breakdown, used by `profile`, the agent's sessions,
//! its rolling window, `/metrics` and the lab: open a window (start snapshot, rulesets, BPF
//! statistics), close it (end snapshot, symbolized raw window), compute, apply the netfilter
//! walk.

use std::sync::Arc;

pub use crate::probe::Probes;
use crate::{
    breakdown::{self, Context, PacketSelection},
    contract::{Breakdown, PacketUnit, View},
    error::Error,
    netfilter, netns,
    probe::bpf_stats::StatsGuard,
    snapshot::Snapshot,
};

/// What one window measures besides the probes' own counters.
#[derive(Debug, Clone, Default)]
pub struct WindowSpec {
    /// Interfaces whose transmitted packets are the denominator; empty: the busiest one.
    pub ifaces: Vec<String>,
    /// Named network namespaces the interfaces may be in.
    pub netns: Vec<String>,
    pub unit: PacketUnit,
    /// The attribution rule.
    pub view: View,
    /// Rulesets to read around the window, and whether to count hook entries.
    pub netfilter: netfilter::Options,
    /// Enable BPF run-time statistics for the window (exact `bpf` component).
    pub bpf_stats: bool,
    /// Keep the window's sampled stacks in the Breakdown (for flame graphs and pprof).
    pub stacks: bool,
}

impl WindowSpec {
    /// Checks what can be checked before anything is attached or read.
    pub fn validate(&self) -> Result<(), Error> {
        netns::validate_interfaces(&self.ifaces, &self.netns)
    }

    fn selection(&self) -> Result<PacketSelection, Error> {
        Ok(PacketSelection {
            ifaces: self.ifaces.clone(),
            netns_inodes: netns::selection_inodes(&self.ifaces, &self.netns)?,
            unit: self.unit,
            view: self.view,
        })
    }
}

/// A window that has started: the start snapshot and what was read around it.
pub struct OpenWindow {
    start: Snapshot,
    selection: PacketSelection,
    rules: Option<netfilter::RulesetWindow>,
    /// Whether a failure to read the rulesets fails the window (counting was asked for).
    rules_required: bool,
    notes: Vec<String>,
    stats: Option<Arc<StatsGuard>>,
    stacks: bool,
}

impl OpenWindow {
    /// Starts a window: BPF statistics on (if asked), rulesets read, start snapshot.
    pub fn open(probes: &dyn Probes, spec: &WindowSpec) -> Result<Self, Error> {
        let selection = spec.selection()?;
        let stats = if spec.bpf_stats {
            probes.bpf_stats()
        } else {
            None
        };
        let mut notes = Vec::new();
        let rules_required = spec.netfilter.count_entries;
        let rules = match netfilter::RulesetWindow::begin(&spec.netfilter) {
            Ok(window) => Some(window),
            // Counting was asked for explicitly; reading rules is a best-effort extra.
            Err(e) if !rules_required => {
                notes.push(format!("rulesets not read: {e}"));
                None
            }
            Err(e) => return Err(e),
        };
        let start = probes.snapshot()?;
        Ok(Self {
            start,
            selection,
            rules,
            rules_required,
            notes,
            stats,
            stacks: spec.stacks,
        })
    }

    pub fn start(&self) -> &Snapshot {
        &self.start
    }

    /// Starts the window's counters again now, keeping the rulesets read at open: for a
    /// caller that opens the window (reading rulesets can take seconds on a slow machine),
    /// then starts its traffic and lets it warm up. The ruleset counters then also cover the
    /// warm-up; their rules-per-packet ratios are unaffected.
    pub fn restart(&mut self, probes: &dyn Probes) -> Result<(), Error> {
        self.start = probes.snapshot()?;
        Ok(())
    }

    /// Ends the window now and computes its Breakdown, netfilter section included.
    pub fn close(self, probes: &dyn Probes) -> Result<Breakdown, Error> {
        let end = probes.snapshot()?;
        let mut notes = self.notes;
        let walks = match self.rules.map(netfilter::RulesetWindow::end).transpose() {
            Ok(walks) => walks,
            Err(e) if !self.rules_required => {
                notes.push(format!("rulesets not read: {e}"));
                None
            }
            Err(e) => return Err(e),
        };
        let mode = self.stats.as_deref().map(StatsGuard::mode);
        let mut breakdown = between(
            probes,
            &self.start,
            &end,
            &self.selection,
            mode,
            self.stacks,
        )?;
        drop(self.stats);
        let (chains, walk_notes) = walks.unwrap_or_default();
        notes.extend(walk_notes);
        netfilter::apply(&mut breakdown.netfilter, chains, notes);
        Ok(breakdown)
    }
}

/// The Breakdown between two snapshots already taken (rolling windows, scrapes): no rulesets.
/// With `stacks`, the sampled stacks are kept in it (none with the tracing backend).
pub fn between(
    probes: &dyn Probes,
    start: &Snapshot,
    end: &Snapshot,
    selection: &PacketSelection,
    bpf_stats: Option<&str>,
    stacks: bool,
) -> Result<Breakdown, Error> {
    let raw = probes.window(start, end, bpf_stats)?;
    let context = Context {
        node: node_name(),
        kernel: kernel_release(),
        backend: probes.backend().name().to_owned(),
        unavailable: probes.unavailable(),
    };
    let mut breakdown = breakdown::compute(&raw, &context, selection);
    if stacks && raw.trace.is_none() {
        breakdown.stacks = Some(crate::flame::stacks_of(&raw));
    }
    Ok(breakdown)
}

/// The node name: NODE_NAME (the DaemonSet sets it from spec.nodeName), else the hostname.
pub fn node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map_or_else(
        |_| "unknown".to_owned(),
        |u| u.release().to_string_lossy().into_owned(),
    )
}
