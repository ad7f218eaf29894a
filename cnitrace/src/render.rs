//! Human-readable output: the breakdown as a table with bars, and what could not be measured.

use std::fmt::Write as _;

use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};

use crate::contract::{Breakdown, ClockSource, ComponentCost};

const BAR_WIDTH: usize = 30;

fn bar(share: f64) -> String {
    let filled = (share.clamp(0.0, 1.0) * BAR_WIDTH as f64).round() as usize;
    "█".repeat(filled)
}

fn cpp_cell(cpp: Option<f64>) -> String {
    cpp.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// A CPP's 95% interval; `*` marks a figure supported by too few samples.
fn interval_cell(c: &ComponentCost) -> String {
    let few = if c.few_samples { " *" } else { "" };
    match c.cpp_ci95 {
        Some([low, high]) if (high - low).abs() < 0.05 => format!("exact{few}"),
        Some([low, high]) => format!("{low:.1}-{high:.1}{few}"),
        None => format!("-{few}"),
    }
}

fn row(table: &mut Table, c: &ComponentCost, indent: &str) {
    let status = if c.available { "" } else { " (unavailable)" };
    table.add_row(vec![
        Cell::new(format!("{indent}{}{status}", c.name)),
        Cell::new(format!("{:.1}", c.cycles as f64 / 1e6)).set_alignment(CellAlignment::Right),
        Cell::new(cpp_cell(c.cpp)).set_alignment(CellAlignment::Right),
        Cell::new(interval_cell(c)).set_alignment(CellAlignment::Right),
        Cell::new(c.samples).set_alignment(CellAlignment::Right),
        Cell::new(format!("{:.1}%", c.share * 100.0)).set_alignment(CellAlignment::Right),
        Cell::new(bar(c.share)),
    ]);
}

/// Each component's CPP by the context its work ran in (`profile --by context`).
pub fn context_table(b: &Breakdown) -> String {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(vec![
        "CPP by context",
        "hardirq",
        "softirq (inline)",
        "ksoftirqd",
        "process",
        "unknown",
    ]);
    let cpp = |cycles: u64| {
        let per_packet = (b.packets.count > 0).then(|| cycles as f64 / b.packets.count as f64);
        Cell::new(cpp_cell(per_packet)).set_alignment(CellAlignment::Right)
    };
    for c in &b.by_context {
        table.add_row(vec![
            Cell::new(&c.name),
            cpp(c.hardirq),
            cpp(c.softirq),
            cpp(c.ksoftirqd),
            cpp(c.process),
            cpp(c.unknown),
        ]);
    }
    format!("{table}\n")
}

/// What the table's figures mean: the view, the unit, the interval, and the skid.
fn legend(b: &Breakdown) -> String {
    let view = match b.view {
        crate::contract::View::Layer => {
            "view layer: each sample charged to the first component frame from the innermost \
             outward, up to a layer boundary"
        }
        crate::contract::View::Leaf => "view self: each sample charged to its innermost function",
        crate::contract::View::Children => {
            "view children: each sample counted for every component on its stack (shares may \
             add up to more than 100%)"
        }
    };
    let mut text = format!(
        "{view}; cycles are {} cycles; CPP 95% is the window's sampling error (* fewer than {} samples)",
        b.cycle_unit.as_str(),
        crate::contract::MIN_SAMPLES
    );
    if let Some(skid) = &b.quality.skid
        && skid.samples > 0
    {
        let _ = write!(
            text,
            "\n{:.1}% of busy cycles were samples held back by interrupts-off sections \
             (cpu-clock), charged to the callers that had interrupts off",
            skid.share * 100.0
        );
    }
    text
}

/// The breakdown as a table for people.
pub fn table(b: &Breakdown) -> String {
    let mut out = String::new();
    let clock = match b.clock.source {
        ClockSource::PmuCycles => "PMU cycles".to_owned(),
        ClockSource::CpuClock => format!(
            "cpu-clock x {:.3} cycles/ns ({})",
            b.clock.cycles_per_ns, b.clock.calibration
        ),
    };
    let _ = writeln!(
        out,
        "node {}  kernel {}  backend {}  window {:.2}s  clock {clock}",
        b.node, b.kernel, b.backend, b.window.duration_s
    );
    let _ = writeln!(
        out,
        "packets: {} {}s ({} skbs, {} segments, {:.1} MB) from {}",
        b.packets.count,
        b.packets.unit.as_str(),
        b.packets.skbs,
        b.packets.segments,
        b.packets.bytes as f64 / 1e6,
        b.packets.source
    );
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(vec![
        "component".to_owned(),
        format!("M{} cycles", b.cycle_unit.as_str()),
        "CPP".to_owned(),
        "CPP 95%".to_owned(),
        if b.backend == "tracing" {
            "calls"
        } else {
            "samples"
        }
        .to_owned(),
        "share".to_owned(),
        String::new(),
    ]);
    for component in &b.components {
        row(&mut table, component, "");
        for sub in b
            .subcomponents
            .iter()
            .filter(|s| crate::components::top_level(&s.name) == component.name)
        {
            row(&mut table, sub, "  ");
        }
    }
    table.add_row(vec![
        Cell::new("total (busy)"),
        Cell::new(format!("{:.1}", b.total.cycles as f64 / 1e6))
            .set_alignment(CellAlignment::Right),
        Cell::new(cpp_cell(b.total.cpp)).set_alignment(CellAlignment::Right),
        Cell::new(""),
        Cell::new(b.quality.busy_samples).set_alignment(CellAlignment::Right),
        Cell::new("100.0%").set_alignment(CellAlignment::Right),
        Cell::new(""),
    ]);
    let _ = writeln!(out, "{table}");
    let _ = writeln!(out, "{}", legend(b));
    if b.total.cpp.is_none() {
        let _ = writeln!(
            out,
            "CPP is undefined: no packet was counted in the window (see --iface)."
        );
    }
    if !b.unavailable.is_empty() {
        let _ = writeln!(out, "not measurable on this node:");
        for u in &b.unavailable {
            let _ = writeln!(out, "  {:<15} {}", u.name, u.reason);
        }
    }
    if !b.softirq.is_empty() {
        let mut softirq = Table::new();
        softirq.load_preset(UTF8_FULL_CONDENSED);
        softirq.set_header(vec!["softirq", "runs", "Mcycles", "CPP", "in ksoftirqd"]);
        for s in &b.softirq {
            softirq.add_row(vec![
                Cell::new(&s.vector),
                Cell::new(s.count).set_alignment(CellAlignment::Right),
                Cell::new(format!("{:.1}", s.cycles as f64 / 1e6))
                    .set_alignment(CellAlignment::Right),
                Cell::new(cpp_cell(s.cpp)).set_alignment(CellAlignment::Right),
                Cell::new(format!("{:.1}%", s.in_ksoftirqd_share * 100.0))
                    .set_alignment(CellAlignment::Right),
            ]);
        }
        let _ = writeln!(out, "{softirq}");
    }
    if !b.bpf_programs.is_empty() {
        let mut programs = Table::new();
        programs.load_preset(UTF8_FULL_CONDENSED);
        programs.set_header(vec![
            "BPF program",
            "id",
            "attached",
            "runs",
            "ns/run",
            "CPP",
        ]);
        for p in &b.bpf_programs {
            programs.add_row(vec![
                Cell::new(if p.datapath {
                    p.name.clone()
                } else {
                    format!("{} (not datapath)", p.name)
                }),
                Cell::new(p.id).set_alignment(CellAlignment::Right),
                Cell::new(&p.attach),
                Cell::new(p.run_cnt).set_alignment(CellAlignment::Right),
                Cell::new(format!(
                    "{:.0}",
                    p.run_time_ns as f64 / p.run_cnt.max(1) as f64
                ))
                .set_alignment(CellAlignment::Right),
                Cell::new(cpp_cell(p.cpp)).set_alignment(CellAlignment::Right),
            ]);
        }
        let _ = writeln!(out, "{programs}");
    }
    if let Some(exact) = b.quality.bpf_exact_cycles
        && (exact > 0 || b.quality.bpf_sampled_cycles > 0)
    {
        let _ = writeln!(
            out,
            "bpf: {:.1} Mcycles measured by the kernel ({}), {:.1} Mcycles estimated from sampled bpf_prog_* frames",
            exact as f64 / 1e6,
            b.quality.bpf_stats.as_deref().unwrap_or("bpf_stats"),
            b.quality.bpf_sampled_cycles as f64 / 1e6,
        );
    }
    if let (Some(cost), runs) = (b.quality.probe_cost_ns, b.quality.probe_runs) {
        let _ = writeln!(
            out,
            "cnitrace's in-kernel probes: {runs} runs, {cost:.0} ns per run (bpf_stats)"
        );
    }
    if !b.netfilter.hooks.is_empty() {
        let _ = write!(out, "{}", hooks_table(b));
    }
    let c = &b.cpu;
    let _ = writeln!(
        out,
        "cpu: user {:.1}%  system {:.1}%  softirq {:.1}%  irq {:.1}%  idle {:.1}%  steal {:.1}%  ({:.2} busy CPUs; {:.2} Gbit/s{})",
        c.user * 100.0,
        c.system * 100.0,
        c.softirq * 100.0,
        c.irq * 100.0,
        c.idle * 100.0,
        c.steal * 100.0,
        c.busy_cpus,
        c.throughput_gbps,
        c.gbps_per_busy_cpu
            .map_or_else(String::new, |e| format!(" = {e:.2} Gbit/s per busy CPU")),
    );
    if !b.top_functions.is_empty() {
        let _ = writeln!(out, "hottest functions (innermost frame):");
        for f in b.top_functions.iter().take(12) {
            let _ = writeln!(
                out,
                "  {:>5.1}%  {:<40} {}",
                f.share * 100.0,
                f.function,
                f.component
            );
        }
    }
    let q = &b.quality;
    let _ = writeln!(
        out,
        "samples: {} ({} busy, {} idle; {} expected at {} Hz), lost {} (stack {}, map full {}), \
         cnitrace's own cost {:.2}% of busy cycles",
        q.samples,
        q.busy_samples,
        q.idle_samples,
        q.expected_samples,
        q.frequency_hz,
        q.lost,
        q.stack_lost,
        q.sample_map_full,
        if b.total.cycles == 0 {
            0.0
        } else {
            q.self_cycles as f64 * 100.0 / b.total.cycles as f64
        }
    );
    out
}

fn opt<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn float(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// Netfilter per hook: cost, and the rules packets walked there.
fn hooks_table(b: &Breakdown) -> String {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(vec![
        "netfilter hook",
        "CPP",
        "share",
        "from bridge",
        "chains",
        "rules",
        "packets in",
        "rules/packet",
        "cycles/rule",
    ]);
    for h in &b.netfilter.hooks {
        let right = |text: String| Cell::new(text).set_alignment(CellAlignment::Right);
        table.add_row(vec![
            Cell::new(format!("{} {}", h.family, h.hook)),
            right(cpp_cell(h.cpp)),
            right(format!("{:.1}%", h.share * 100.0)),
            right(if h.cycles == 0 {
                "-".to_owned()
            } else {
                format!(
                    "{:.0}%",
                    h.from_bridge_cycles as f64 * 100.0 / h.cycles as f64
                )
            }),
            right(h.chains.to_string()),
            right(h.rules.to_string()),
            right(opt(h.packets)),
            right(float(h.rules_traversed_per_packet, 1)),
            right(float(h.cycles_per_rule_evaluated, 1)),
        ]);
    }
    format!("{table}\n")
}

/// `cnitrace netfilter`: the hooks, then every base chain walked (this node's table III).
pub fn netfilter_report(b: &Breakdown) -> String {
    let mut out = String::new();
    let netfilter = b.component("netfilter");
    let _ = writeln!(
        out,
        "node {}  kernel {}  window {:.2}s  {} {}s from {}",
        b.node,
        b.kernel,
        b.window.duration_s,
        b.packets.count,
        b.packets.unit.as_str(),
        b.packets.source
    );
    let _ = writeln!(
        out,
        "netfilter: {} CPP, {:.1}% of busy cycles (total {} CPP)",
        cpp_cell(netfilter.and_then(|n| n.cpp)),
        netfilter.map_or(0.0, |n| n.share * 100.0),
        cpp_cell(b.total.cpp)
    );
    for sub in b
        .subcomponents
        .iter()
        .filter(|s| s.name.starts_with("netfilter."))
    {
        let _ = writeln!(out, "  {:<22} {:>8} CPP", sub.name, cpp_cell(sub.cpp));
    }
    let _ = write!(out, "{}", hooks_table(b));
    if !b.netfilter.chains.is_empty() {
        let mut chains = Table::new();
        chains.load_preset(UTF8_FULL_CONDENSED);
        chains.set_header(vec![
            "netns",
            "backend",
            "table",
            "hook",
            "chains",
            "rules",
            "packets in",
            "rules/packet",
        ]);
        for c in b.netfilter.chains.iter().filter(|c| c.rules > 0) {
            let per_packet = match (c.packets, c.rules_evaluated) {
                (Some(p), Some(e)) if p > 0 => format!(
                    "{:.1}{}",
                    e as f64 / p as f64,
                    if c.approximate { " (bound)" } else { "" }
                ),
                _ => "-".to_owned(),
            };
            chains.add_row(vec![
                Cell::new(&c.netns),
                Cell::new(&c.backend),
                Cell::new(format!("{} {}", c.family, c.table)),
                Cell::new(&c.hook),
                Cell::new(c.chains.join(" ")),
                Cell::new(c.rules).set_alignment(CellAlignment::Right),
                Cell::new(opt(c.packets)).set_alignment(CellAlignment::Right),
                Cell::new(per_packet).set_alignment(CellAlignment::Right),
            ]);
        }
        let _ = writeln!(out, "{chains}");
        if b.netfilter
            .chains
            .iter()
            .any(|c| c.rules > 0 && c.packets.is_none())
        {
            let _ = writeln!(
                out,
                "rules/packet needs the packets entering each hook, which nft-based hooks do not \
                 count: --count-hook-entries counts them with a temporary nftables table"
            );
        }
    }
    for note in &b.netfilter.ruleset_notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_with_share() {
        assert_eq!(bar(0.0), "");
        assert_eq!(bar(1.0).chars().count(), BAR_WIDTH);
        assert_eq!(bar(0.5).chars().count(), BAR_WIDTH / 2);
        assert_eq!(bar(7.0).chars().count(), BAR_WIDTH);
    }
}
