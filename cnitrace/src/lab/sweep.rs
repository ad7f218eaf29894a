//! `cnitrace lab sweep`: the netfilter rule-count sweep. Builds a lab
//! model, puts N non-matching rules in front of a hook's chain, profiles a stream at each N,
//! and fits netfilter's cost against N: the slope is what one rule costs per packet.

use std::fmt::Write as _;

use serde::Serialize;

use super::topology::{self, Lab, Model, Scenario};
use crate::{error::Error, netfilter::hooks::Hook, netns, probe::sampling::ProbeConfig, profile};

/// The chain holding the sweep's rules, jumped to from the hook's base chain.
pub const SWEEP_CHAIN: &str = "CNITRACE-SWEEP";
/// Most rules per point.
pub const MAX_RULES: u32 = 20_000;

#[derive(Debug, Clone)]
pub struct SweepOptions {
    pub rules: Vec<u32>,
    pub hook: Hook,
    pub model: Model,
    pub scenario: Scenario,
    pub duration_s: f64,
    pub sampler: ProbeConfig,
    /// A directory for a flame graph per rule count.
    pub flamegraphs: Option<std::path::PathBuf>,
}

/// Least-squares line y = slope x + intercept, and its coefficient of determination.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fit {
    pub slope: f64,
    pub intercept: f64,
    pub r_squared: f64,
}

pub fn fit(xs: &[f64], ys: &[f64]) -> Option<Fit> {
    let n = xs.len();
    if n < 2 || n != ys.len() {
        return None;
    }
    let mean_x = xs.iter().sum::<f64>() / n as f64;
    let mean_y = ys.iter().sum::<f64>() / n as f64;
    let sxx: f64 = xs.iter().map(|x| (x - mean_x).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = xs
        .iter()
        .zip(ys)
        .map(|(x, y)| (x - mean_x) * (y - mean_y))
        .sum();
    let slope = sxy / sxx;
    let intercept = mean_y - slope * mean_x;
    let ss_total: f64 = ys.iter().map(|y| (y - mean_y).powi(2)).sum();
    let ss_residual: f64 = xs
        .iter()
        .zip(ys)
        .map(|(x, y)| (y - (slope * x + intercept)).powi(2))
        .sum();
    let r_squared = if ss_total == 0.0 {
        1.0
    } else {
        1.0 - ss_residual / ss_total
    };
    Some(Fit {
        slope,
        intercept,
        r_squared,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub rules_added: u32,
    pub throughput_gbps: f64,
    /// Netfilter cycles per packet (segments of the client pod, the breakdown's unit).
    pub netfilter_cpp: Option<f64>,
    pub total_cpp: Option<f64>,
    /// The hook's own figures (its cycles over the packets that entered it).
    pub hook_cycles_per_packet: Option<f64>,
    pub hook_packets: Option<u64>,
    pub rules_traversed_per_packet: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepResult {
    pub model: String,
    pub scenario: String,
    pub family: String,
    pub hook: String,
    pub points: Vec<SweepPoint>,
    /// Netfilter CPP against rules added: slope = cycles per rule per (wire) packet.
    pub fit_cpp: Option<Fit>,
    /// The hook's cycles per packet entering it against rules added: slope = cycles per rule
    /// evaluation (GSO packets count once, as netfilter sees them).
    pub fit_hook: Option<Fit>,
}

/// The table and chain a hook's rules go into (filter where it has the hook, else mangle).
fn base_chain(hook: Hook) -> (&'static str, &'static str) {
    match hook {
        Hook::Prerouting => ("mangle", "PREROUTING"),
        Hook::Postrouting => ("mangle", "POSTROUTING"),
        Hook::Input => ("filter", "INPUT"),
        Hook::Output => ("filter", "OUTPUT"),
        Hook::Forward | Hook::Unknown => ("filter", "FORWARD"),
    }
}

/// The iptables-restore input that makes the sweep chain hold `rules` non-matching rules
/// (sources in 198.18.0.0/15, the benchmarking range no pod uses).
pub fn sweep_rules(hook: Hook, rules: u32, first: bool) -> String {
    let (table, chain) = base_chain(hook);
    let mut out = format!("*{table}\n:{SWEEP_CHAIN} - [0:0]\n");
    if first {
        let _ = writeln!(out, "-I {chain} 1 -j {SWEEP_CHAIN}");
    }
    for i in 0..rules {
        let _ = writeln!(
            out,
            "-A {SWEEP_CHAIN} -s 198.{}.{}.{}/32 -j DROP",
            18 + (i >> 16) % 2,
            (i >> 8) & 0xff,
            i & 0xff
        );
    }
    out.push_str("COMMIT\n");
    out
}

fn restore(netns_name: &str, input: &str) -> Result<(), Error> {
    super::load_rules(
        netns_name,
        "iptables-restore",
        &["--noflush"],
        input,
        "the sweep's rules",
    )
}

/// Removes the sweep's jump and chain.
fn remove_rules(netns_name: &str, hook: Hook) -> Result<(), Error> {
    let (table, chain) = base_chain(hook);
    for args in [
        vec!["-t", table, "-D", chain, "-j", SWEEP_CHAIN],
        vec!["-t", table, "-F", SWEEP_CHAIN],
        vec!["-t", table, "-X", SWEEP_CHAIN],
    ] {
        netns::output_in(Some(netns_name), "iptables", &args, None)?;
    }
    Ok(())
}

pub fn validate(options: &SweepOptions) -> Result<(), Error> {
    profile::validate_duration(options.duration_s)?;
    if options.rules.len() < 2 {
        return Err(Error::InvalidArgument(
            "--rules needs at least two counts to fit a line (e.g. 0,500,1000,2000)".to_owned(),
        ));
    }
    if let Some(&n) = options.rules.iter().find(|&&n| n > MAX_RULES) {
        return Err(Error::InvalidArgument(format!(
            "--rules {n} is too many: at most {MAX_RULES}"
        )));
    }
    if options.hook == Hook::Unknown {
        return Err(Error::InvalidArgument("--hook must name a hook".to_owned()));
    }
    Ok(())
}

/// Runs the sweep on a lab of its own, removed afterwards (with the rules), also on failure.
pub async fn run(
    options: &SweepOptions,
    mut progress: impl FnMut(&str, bool),
) -> Result<SweepResult, Error> {
    validate(options)?;
    progress(&format!("{}: building the lab", options.model.name()), true);
    let lab = topology::up(options.model).await?;
    let result = sweep(&lab, options, &mut progress).await;
    let host = lab.host_netns(1);
    let removed = remove_rules(&host, options.hook).and(topology::down().await.map(|_| ()));
    let result = result?;
    removed?;
    Ok(result)
}

async fn sweep(
    lab: &Lab,
    options: &SweepOptions,
    progress: &mut impl FnMut(&str, bool),
) -> Result<SweepResult, Error> {
    let host = lab.host_netns(1);
    let server = lab.server(options.scenario).clone();
    let mut points = Vec::new();
    for (index, &rules) in options.rules.iter().enumerate() {
        progress(&format!("{rules} rules: installing"), true);
        if index > 0 {
            restore(
                &host,
                &format!(
                    "*{}\n-F {SWEEP_CHAIN}\nCOMMIT\n",
                    base_chain(options.hook).0
                ),
            )?;
        }
        restore(&host, &sweep_rules(options.hook, rules, index == 0))?;
        progress(&format!("{rules} rules: stream"), true);
        let profile_options =
            super::bench::stream_profile(lab, options.duration_s, &options.sampler, None, true);
        let flamegraph = options
            .flamegraphs
            .as_ref()
            .map(|dir| dir.join(format!("rules-{rules}.svg")));
        let (breakdown, throughput_gbps) =
            super::bench::profiled_stream(lab, &server, &profile_options, flamegraph.as_deref())
                .await?;
        let hook = breakdown
            .netfilter
            .hooks
            .iter()
            .find(|h| h.family == "ipv4" && h.hook == options.hook.as_str());
        let point = SweepPoint {
            rules_added: rules,
            throughput_gbps,
            netfilter_cpp: breakdown.component("netfilter").and_then(|c| c.cpp),
            total_cpp: breakdown.total.cpp,
            hook_cycles_per_packet: hook.and_then(|h| {
                h.packets
                    .filter(|&p| p > 0)
                    .map(|p| h.cycles as f64 / p as f64)
            }),
            hook_packets: hook.and_then(|h| h.packets),
            rules_traversed_per_packet: hook.and_then(|h| h.rules_traversed_per_packet),
        };
        progress(
            &format!(
                "{rules} rules: {:.2} Gbit/s, netfilter {} CPP, {} rules per packet at {}",
                point.throughput_gbps,
                point
                    .netfilter_cpp
                    .map_or_else(|| "-".to_owned(), |c| format!("{c:.0}")),
                point
                    .rules_traversed_per_packet
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.0}")),
                options.hook.as_str()
            ),
            false,
        );
        points.push(point);
    }
    let fit_of = |y: fn(&SweepPoint) -> Option<f64>| {
        let pairs: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|p| y(p).map(|v| (f64::from(p.rules_added), v)))
            .collect();
        let (xs, ys): (Vec<f64>, Vec<f64>) = pairs.into_iter().unzip();
        fit(&xs, &ys)
    };
    Ok(SweepResult {
        model: options.model.name().to_owned(),
        scenario: options.scenario.name().to_owned(),
        family: "ipv4".to_owned(),
        hook: options.hook.as_str().to_owned(),
        fit_cpp: fit_of(|p| p.netfilter_cpp),
        fit_hook: fit_of(|p| p.hook_cycles_per_packet),
        points,
    })
}

/// The sweep for people: one line per point, then the fits.
pub fn render(result: &SweepResult) -> String {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(vec![
        "rules added",
        "Gbit/s",
        "netfilter CPP",
        "total CPP",
        "hook packets",
        "rules/packet",
        "hook cycles/packet",
    ]);
    let show = |v: Option<f64>, d: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.d$}"));
    for p in &result.points {
        table.add_row(vec![
            p.rules_added.to_string(),
            format!("{:.2}", p.throughput_gbps),
            show(p.netfilter_cpp, 1),
            show(p.total_cpp, 1),
            p.hook_packets
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            show(p.rules_traversed_per_packet, 1),
            show(p.hook_cycles_per_packet, 0),
        ]);
    }
    let line = |name: &str, fit: Option<Fit>, unit: &str| match fit {
        Some(f) => format!(
            "{name}: slope {:.3} {unit}, intercept {:.1}, R² {:.4}\n",
            f.slope, f.intercept, f.r_squared
        ),
        None => format!("{name}: not enough points to fit\n"),
    };
    format!(
        "{} {} {} {}: {} non-matching rules before the hook's chain\n{table}\n{}{}",
        result.model,
        result.scenario,
        result.family,
        result.hook,
        result
            .points
            .iter()
            .map(|p| p.rules_added.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        line(
            "netfilter CPP",
            result.fit_cpp,
            "cycles per rule per wire packet"
        ),
        line(
            "hook cycles per entering packet",
            result.fit_hook,
            "cycles per rule evaluation"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_line_and_scores_noise_low() {
        let xs = [0.0, 250.0, 500.0, 1000.0, 2000.0];
        let ys: Vec<f64> = xs.iter().map(|x| 3.0 * x + 100.0).collect();
        let f = fit(&xs, &ys).unwrap();
        assert!((f.slope - 3.0).abs() < 1e-9 && (f.intercept - 100.0).abs() < 1e-6);
        assert!((f.r_squared - 1.0).abs() < 1e-12);
        let flat = fit(&xs, &[5.0, 9.0, 4.0, 8.0, 5.0]).unwrap();
        assert!(flat.r_squared < 0.2, "{flat:?}");
        assert!(fit(&[1.0], &[1.0]).is_none());
        assert!(fit(&[2.0, 2.0], &[1.0, 3.0]).is_none());
    }

    #[test]
    fn rules_are_distinct_non_matching_and_jumped_to_once() {
        let text = sweep_rules(Hook::Forward, 70_000, true);
        assert_eq!(text.matches("-I FORWARD 1 -j CNITRACE-SWEEP").count(), 1);
        assert_eq!(text.matches("-A CNITRACE-SWEEP").count(), 70_000);
        assert!(
            text.contains("-s 198.19.17.111/32"),
            "index 70000 - 65536 = 4464"
        );
        assert!(!sweep_rules(Hook::Forward, 3, false).contains("-I "));
        assert!(sweep_rules(Hook::Prerouting, 1, true).starts_with("*mangle"));
    }

    #[test]
    fn bad_options_are_rejected() {
        let mut o = SweepOptions {
            rules: vec![0],
            hook: Hook::Forward,
            model: Model::Flannel,
            scenario: Scenario::Intra,
            duration_s: 2.0,
            sampler: ProbeConfig::default(),
            flamegraphs: None,
        };
        assert!(validate(&o).unwrap_err().to_string().contains("two counts"));
        o.rules = vec![0, MAX_RULES + 1];
        assert!(validate(&o).unwrap_err().to_string().contains("too many"));
        o.rules = vec![0, 10];
        assert!(validate(&o).is_ok());
    }
}
