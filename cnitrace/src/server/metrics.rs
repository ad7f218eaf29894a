//! Prometheus exposition: monotonic counters per node and component, so that
//! `rate(cnitrace_component_cycles_total[1m]) / rate(cnitrace_packets_total[1m])` is CPP.
//! Each scrape measures the window since the previous scrape and adds it to the counters.

use std::sync::Mutex;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{agent::Agent, breakdown::PacketSelection, snapshot::Snapshot, window};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComponentLabels {
    node: String,
    component: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    node: String,
    store: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VectorLabels {
    node: String,
    vector: String,
}

pub struct Metrics {
    registry: Registry,
    component_cycles: Family<ComponentLabels, Counter>,
    busy_cycles: Family<NodeLabels, Counter>,
    packets: Family<NodeLabels, Counter>,
    skbs: Family<NodeLabels, Counter>,
    samples: Family<NodeLabels, Counter>,
    lost: Family<NodeLabels, Counter>,
    softirq_cycles: Family<VectorLabels, Counter>,
    sampler_hz: Family<NodeLabels, Gauge>,
    self_overhead: Family<NodeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    self_process: Family<NodeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    budget: Family<NodeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    auth_failures: Family<NodeLabels, Counter>,
    held_bytes: Family<StoreLabels, Gauge>,
    dropped: Family<StoreLabels, Gauge>,
    /// The refused requests already added to `auth_failures`.
    auth_failures_seen: std::sync::atomic::AtomicU64,
    last: Mutex<Option<Snapshot>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Self {
            component_cycles: Family::default(),
            busy_cycles: Family::default(),
            packets: Family::default(),
            skbs: Family::default(),
            samples: Family::default(),
            lost: Family::default(),
            softirq_cycles: Family::default(),
            sampler_hz: Family::default(),
            self_overhead: Family::default(),
            self_process: Family::default(),
            budget: Family::default(),
            auth_failures: Family::default(),
            held_bytes: Family::default(),
            dropped: Family::default(),
            auth_failures_seen: std::sync::atomic::AtomicU64::new(0),
            registry: Registry::default(),
            last: Mutex::new(None),
        };
        registry.register(
            "cnitrace_component_cycles",
            "Busy CPU cycles attributed to a datapath component (exclusive; other = the rest)",
            metrics.component_cycles.clone(),
        );
        registry.register(
            "cnitrace_busy_cycles",
            "Busy CPU cycles of all CPUs (idle excluded)",
            metrics.busy_cycles.clone(),
        );
        registry.register(
            "cnitrace_packets",
            "Wire segments transmitted by the busiest device of each scrape interval",
            metrics.packets.clone(),
        );
        registry.register(
            "cnitrace_skbs",
            "Socket buffers transmitted by the same device",
            metrics.skbs.clone(),
        );
        registry.register(
            "cnitrace_samples",
            "Stack samples taken",
            metrics.samples.clone(),
        );
        registry.register(
            "cnitrace_lost_samples",
            "Samples whose stack or record was lost",
            metrics.lost.clone(),
        );
        registry.register(
            "cnitrace_softirq_cycles",
            "Softirq handler cycles per vector",
            metrics.softirq_cycles.clone(),
        );
        registry.register(
            "cnitrace_sampler_hz",
            "The stack sampler's rate per CPU now (0: detached, nobody reads)",
            metrics.sampler_hz.clone(),
        );
        registry.register(
            "cnitrace_self_estimated_overhead_ratio",
            "The agent's estimated share of the node's CPU time: samples x cost per sample + its process",
            metrics.self_overhead.clone(),
        );
        registry.register(
            "cnitrace_self_process_cpu_ratio",
            "The agent process's own share of the node's CPU time",
            metrics.self_process.clone(),
        );
        registry.register(
            "cnitrace_self_budget_ratio",
            "The share of the node's CPU time the agent allows itself (--max-overhead)",
            metrics.budget.clone(),
        );
        registry.register(
            "cnitrace_auth_failures",
            "Requests refused for a missing or wrong bearer token (each answered after a delay)",
            metrics.auth_failures.clone(),
        );
        registry.register(
            "cnitrace_held_bytes",
            "Memory held between windows, by store: retired sample epochs kept for open windows (epochs), stopped sessions' stacks (stopped_stacks)",
            metrics.held_bytes.clone(),
        );
        registry.register(
            "cnitrace_budget_dropped",
            "What the memory budgets dropped since start: samples of retired epochs (epochs), sessions' stacks (stopped_stacks)",
            metrics.dropped.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// Takes the baseline snapshot the first scrape measures from, as a scrape would.
    pub fn prime(&self, agent: &Agent) -> Result<(), crate::Error> {
        agent.scraped();
        let snapshot = agent.probes().snapshot()?;
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(snapshot);
        Ok(())
    }

    /// When the baseline the next scrape measures from was taken.
    pub fn baseline_taken(&self) -> Option<std::time::Instant> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|s| s.mono)
    }

    fn held_gauges(&self, agent: &Agent) {
        let node = crate::window::node_name();
        let held = agent.held();
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (store, bytes, dropped) in [
            (
                "epochs",
                held.epochs.bytes_held as u64,
                held.epochs.samples_dropped,
            ),
            (
                "stopped_stacks",
                held.stopped_stacks_bytes as u64,
                held.stopped_stacks_dropped,
            ),
        ] {
            let labels = StoreLabels {
                node: node.clone(),
                store: store.to_owned(),
            };
            self.held_bytes.get_or_create(&labels).set(as_i64(bytes));
            self.dropped.get_or_create(&labels).set(as_i64(dropped));
        }
    }

    fn cost_gauges(&self, agent: &Agent) {
        self.held_gauges(agent);
        let node = NodeLabels {
            node: crate::window::node_name(),
        };
        let cost = agent.cost();
        self.sampler_hz
            .get_or_create(&node)
            .set(i64::try_from(cost.rate_hz).unwrap_or(i64::MAX));
        self.self_overhead
            .get_or_create(&node)
            .set(cost.estimated_percent / 100.0);
        self.self_process
            .get_or_create(&node)
            .set(cost.process_cpu_percent / 100.0);
        self.budget
            .get_or_create(&node)
            .set(cost.max_overhead_percent / 100.0);
    }

    /// Drops the baseline once no scrape came for [`crate::agent::READER_GONE_S`]: nothing
    /// then holds the sampler's retired epochs (or the snapshot) for a scraper that is gone.
    pub fn forget_if_unscraped(&self, agent: &Agent) {
        if !agent.scraper_present() {
            self.last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
        }
    }

    /// Adds the interval since the previous scrape to the counters and encodes them. The
    /// first scrape after none for a while only takes the baseline: the sampler was detached
    /// (or the baseline forgotten) in between, so that interval has no honest figure.
    pub fn scrape(&self, agent: &Agent, auth_failures: u64) -> Result<String, crate::Error> {
        let returning = agent.scraper_present();
        agent.scraped();
        let probes = agent.probes();
        // Held from the snapshot to the counters: two scrapes at once (annotations and a
        // ServiceMonitor, say) then measure consecutive intervals, never one interval twice.
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !returning {
            last.take();
        }
        let now = probes.snapshot()?;
        // An interval in which the sampler was detached for a while (continuous rate 0
        // between sessions, a failed re-attach) has packets without their cycles: it only
        // moves the baseline, so the counters never read a diluted CPP.
        let previous = last
            .replace(now.clone())
            .filter(|previous| probes.sampled_throughout(previous.mono, now.mono));
        if let Some(previous) = previous {
            let b = window::between(
                probes,
                &previous,
                &now,
                &PacketSelection::default(),
                None,
                false,
            )?;
            let node = NodeLabels {
                node: b.node.clone(),
            };
            for c in &b.components {
                self.component_cycles
                    .get_or_create(&ComponentLabels {
                        node: b.node.clone(),
                        component: c.name.clone(),
                    })
                    .inc_by(c.cycles);
            }
            self.busy_cycles.get_or_create(&node).inc_by(b.total.cycles);
            self.packets.get_or_create(&node).inc_by(b.packets.segments);
            self.skbs.get_or_create(&node).inc_by(b.packets.skbs);
            self.samples.get_or_create(&node).inc_by(b.quality.samples);
            self.lost.get_or_create(&node).inc_by(b.quality.lost);
            for s in &b.softirq {
                self.softirq_cycles
                    .get_or_create(&VectorLabels {
                        node: b.node.clone(),
                        vector: s.vector.clone(),
                    })
                    .inc_by(s.cycles);
            }
        }
        drop(last);
        self.cost_gauges(agent);
        let seen = self
            .auth_failures_seen
            .fetch_max(auth_failures, std::sync::atomic::Ordering::Relaxed);
        self.auth_failures
            .get_or_create(&NodeLabels {
                node: crate::window::node_name(),
            })
            .inc_by(auth_failures.saturating_sub(seen));
        let mut text = String::new();
        encode(&mut text, &self.registry)
            .map_err(|e| crate::Error::io("encode metrics", std::io::Error::other(e)))?;
        Ok(text)
    }
}
