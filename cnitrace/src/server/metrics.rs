//! Prometheus exposition: monotonic counters per node and component, so that
//! `rate(cnitrace_component_cycles_total[1m]) / rate(cnitrace_packets_total[1m])` is CPP.
//! Each scrape measures the window since the previous scrape and adds it to the counters.

use std::sync::Mutex;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family},
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
        Self {
            registry,
            ..metrics
        }
    }

    /// Takes the baseline snapshot the first scrape measures from.
    pub fn prime(&self, agent: &Agent) -> Result<(), crate::Error> {
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

    /// Adds the interval since the previous scrape to the counters and encodes them.
    pub fn scrape(&self, agent: &Agent) -> Result<String, crate::Error> {
        let probes = agent.probes();
        // Held from the snapshot to the counters: two scrapes at once (annotations and a
        // ServiceMonitor, say) then measure consecutive intervals, never one interval twice.
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = probes.snapshot()?;
        let previous = last.replace(now.clone());
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
        let mut text = String::new();
        encode(&mut text, &self.registry)
            .map_err(|e| crate::Error::io("encode metrics", std::io::Error::other(e)))?;
        Ok(text)
    }
}
