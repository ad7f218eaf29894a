//! `cnitrace lab bench`: for each model and scenario, an iperf3 stream profiled by cnitrace
//! and a request/response latency run, repeated; mean and 95% confidence interval of
//! throughput, latency and cycles per packet per component; a table, markdown, JSON, and an
//! SVG stacked-bar chart per model and scenario.

use std::{fmt::Write as _, time::Duration};

use serde::Serialize;

use super::{
    topology::{self, Lab, Model, Pod, Scenario},
    traffic,
};
use crate::{
    components::{COMPONENTS, Component, OTHER},
    contract::{Breakdown, PacketUnit},
    error::Error,
    netfilter,
    probe::Backend,
    probe::sampling::ProbeConfig,
    profile::{self, ProfileOptions},
    window::{OpenWindow, WindowSpec},
};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub models: Vec<Model>,
    pub scenarios: Vec<Scenario>,
    /// Profiled seconds of each stream.
    pub duration_s: f64,
    pub repeats: u32,
    pub sampler: ProbeConfig,
    /// `None`: auto.
    pub backend: Option<Backend>,
    /// A directory for a flame graph per model, scenario and repeat.
    pub flamegraphs: Option<std::path::PathBuf>,
    /// The user's configuration list, benchmarked as the model `cni-conf`.
    pub cni_conf: Option<crate::cni_config::Loaded>,
}

/// A mean with the half-width of its 95% confidence interval (`null` for one run).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub mean: f64,
    pub ci95: Option<f64>,
}

/// Student's t for a two-sided 95% interval, by degrees of freedom 1..=30.
const T_95: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

impl Estimate {
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n.max(1) as f64;
        let ci95 = (n >= 2).then(|| {
            let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            let t = T_95.get(n - 2).copied().unwrap_or(1.96);
            t * (variance / n as f64).sqrt()
        });
        Self { mean, ci95 }
    }

    fn show(&self, decimals: usize) -> String {
        match self.ci95 {
            Some(ci) => format!("{:.decimals$} ± {ci:.decimals$}", self.mean),
            None => format!("{:.decimals$}", self.mean),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ComponentEstimate {
    pub name: String,
    pub cpp: Estimate,
}

/// One model and scenario (the lab JSON contract: model, scenario, throughput_gbps, rtt_us, repeats,
/// breakdown), plus the spread over the repeats.
#[derive(Debug, Clone, Serialize)]
pub struct BenchEntry {
    pub model: String,
    pub scenario: String,
    /// Mean over the repeats; `null` when the model is unavailable.
    pub throughput_gbps: Option<f64>,
    pub rtt_us: Option<f64>,
    pub repeats: u32,
    /// The last repeat's full breakdown.
    pub breakdown: Option<Breakdown>,
    pub throughput: Option<Estimate>,
    pub rtt: Option<Estimate>,
    /// Connect-request-response straight to the server pod: new connections per second and
    /// the connection set-up p50 (microseconds).
    pub connections_per_s: Option<Estimate>,
    pub setup_p50_us: Option<Estimate>,
    pub total_cpp: Option<Estimate>,
    pub components: Vec<ComponentEstimate>,
    /// Why the model could not be built here.
    pub unavailable: Option<String>,
}

struct Run {
    throughput_gbps: f64,
    rtt_us: f64,
    crr: traffic::CrrResult,
    breakdown: Breakdown,
}

/// Checks the options before anything is built.
pub fn validate(options: &BenchOptions) -> Result<(), Error> {
    if options.repeats == 0 || options.repeats > 30 {
        return Err(Error::InvalidArgument(format!(
            "--repeat {} is out of range: 1..=30",
            options.repeats
        )));
    }
    profile::validate_duration(options.duration_s)?;
    if options.duration_s < 1.0 {
        return Err(Error::InvalidArgument(
            "--duration must be at least 1 s for a meaningful stream".to_owned(),
        ));
    }
    if let Some(loaded) = &options.cni_conf {
        crate::cni_config::check_runnable(loaded)?;
    }
    crate::probe::sampling::validate_frequency(options.sampler.frequency_hz)
}

/// Runs the benchmark. `progress` gets a line per step. The lab is taken down after each
/// model, also on failure.
pub async fn run(
    options: &BenchOptions,
    mut progress: impl FnMut(&str, bool),
) -> Result<Vec<BenchEntry>, Error> {
    validate(options)?;
    if let Some(lab) = topology::current() {
        return Err(Error::InvalidArgument(format!(
            "a lab is up ({}); `cnitrace lab down` first",
            lab.model.name()
        )));
    }
    let mut entries = Vec::new();
    for &model in &options.models {
        if let Some(reason) = topology::unavailable_reason(model) {
            progress(&format!("{}: {reason}", model.name()), false);
            for &scenario in &options.scenarios {
                entries.push(unavailable_entry(model, scenario, &reason));
            }
            continue;
        }
        progress(&format!("{}: building the lab", model.name()), true);
        let lab = match (model, &options.cni_conf) {
            (Model::CniConf, Some(loaded)) => topology::up_with_conf(loaded).await?,
            (Model::CniConf, None) => {
                return Err(Error::InvalidArgument(
                    "the cni-conf model needs --cni-conf FILE".to_owned(),
                ));
            }
            _ => topology::up(model).await?,
        };
        if let Ok(rules) = super::node_rules::count(&lab.host_netns(1)) {
            progress(
                &format!("{}: {rules} iptables rules on host 1", model.name()),
                false,
            );
        }
        let result = bench_model(&lab, options, &mut progress).await;
        let removed = topology::down().await;
        entries.extend(result?);
        removed?;
    }
    Ok(entries)
}

fn unavailable_entry(model: Model, scenario: Scenario, reason: &str) -> BenchEntry {
    BenchEntry {
        model: model.name().to_owned(),
        scenario: scenario.name().to_owned(),
        throughput_gbps: None,
        rtt_us: None,
        repeats: 0,
        breakdown: None,
        throughput: None,
        rtt: None,
        connections_per_s: None,
        setup_p50_us: None,
        total_cpp: None,
        components: Vec::new(),
        unavailable: Some(reason.to_owned()),
    }
}

async fn bench_model(
    lab: &Lab,
    options: &BenchOptions,
    progress: &mut impl FnMut(&str, bool),
) -> Result<Vec<BenchEntry>, Error> {
    let mut entries = Vec::new();
    for &scenario in &options.scenarios {
        if let Some(reason) = topology::scenario_unavailable(lab.model, scenario) {
            progress(
                &format!("{} {}: {reason}", lab.model.name(), scenario.name()),
                false,
            );
            entries.push(unavailable_entry(lab.model, scenario, &reason));
            continue;
        }
        let mut runs = Vec::new();
        for repeat in 1..=options.repeats {
            let label = format!(
                "{} {} {repeat}/{}",
                lab.model.name(),
                scenario.name(),
                options.repeats
            );
            progress(&format!("{label}: stream"), true);
            let run = one_run(lab, scenario, options, repeat).await?;
            progress(
                &format!(
                    "{label}: {:.2} Gbit/s, {} CPP, RTT {:.1} us",
                    run.throughput_gbps,
                    run.breakdown
                        .total
                        .cpp
                        .map_or_else(|| "-".to_owned(), |c| format!("{c:.0}")),
                    run.rtt_us
                ),
                false,
            );
            runs.push(run);
        }
        entries.push(summarize(lab.model, scenario, runs));
    }
    Ok(entries)
}

async fn one_run(
    lab: &Lab,
    scenario: Scenario,
    options: &BenchOptions,
    repeat: u32,
) -> Result<Run, Error> {
    let server = lab.server(scenario);
    let profile_options = stream_profile(
        lab,
        options.duration_s,
        &options.sampler,
        options.backend,
        false,
    );
    let flamegraph = options.flamegraphs.as_ref().map(|dir| {
        dir.join(format!(
            "{}-{}-{repeat}.svg",
            lab.model.name(),
            scenario.name()
        ))
    });
    let (breakdown, throughput_gbps) =
        profiled_stream(lab, server, &profile_options, flamegraph.as_deref()).await?;
    let (client_ns, server_ns, ip) = (lab.client().netns.clone(), server.netns.clone(), server.ip);
    let rr_seconds = (options.duration_s / 2.0).clamp(1.0, 5.0);
    let rr = tokio::task::spawn_blocking(move || {
        traffic::request_response(
            &client_ns,
            &server_ns,
            ip,
            Duration::from_secs_f64(rr_seconds),
        )
    })
    .await
    .map_err(|e| Error::InvalidArgument(format!("request/response task: {e}")))??;
    let (client_ns, server_ns) = (lab.client().netns.clone(), server.netns.clone());
    let direct = std::net::SocketAddrV4::new(ip, traffic::CRR_PORT);
    let crr = tokio::task::spawn_blocking(move || {
        traffic::connect_request_response(
            &client_ns,
            &server_ns,
            direct,
            direct,
            Duration::from_secs_f64(rr_seconds),
        )
    })
    .await
    .map_err(|e| Error::InvalidArgument(format!("connect-request-response task: {e}")))??;
    Ok(Run {
        throughput_gbps,
        rtt_us: rr.mean_rtt_us,
        crr,
        breakdown,
    })
}

/// The profile of a lab stream: packets are what the client pod's eth0 sends (every data
/// packet once), rulesets read in both hosts, hook entries counted when asked.
pub(crate) fn stream_profile(
    lab: &Lab,
    duration_s: f64,
    sampler: &ProbeConfig,
    backend: Option<Backend>,
    count_hook_entries: bool,
) -> ProfileOptions {
    ProfileOptions {
        duration_s,
        backend,
        sampler: sampler.clone(),
        window: WindowSpec {
            ifaces: vec!["eth0".to_owned()],
            netns: vec![lab.client().netns.clone()],
            unit: PacketUnit::Segment,
            view: crate::contract::View::Layer,
            netfilter: netfilter::Options {
                read_rules: true,
                count_entries: count_hook_entries,
                namespaces: vec![lab.host_netns(1), lab.host_netns(2)],
            },
            bpf_stats: true,
            stacks: false,
        },
    }
}

/// Writes a window's flame graph, creating its directory.
pub(crate) fn write_flamegraph(path: &std::path::Path, breakdown: &Breakdown) -> Result<(), Error> {
    let svg = crate::flame::flamegraph_svg(breakdown)
        .map_err(|e| Error::InvalidArgument(format!("flame graph {}: {e}", path.display())))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    std::fs::write(path, svg).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// An iperf3 stream from the client pod to `server`, profiled. Probes start and the window
/// opens (rulesets read) before the stream: on a slow VM either can take longer than the
/// stream lasts. The window's counters start once the stream has warmed up. Returns the
/// breakdown and the stream's throughput in Gbit/s. With `flamegraph`, the window's flame
/// graph is written there (the breakdown returned carries no stacks either way).
pub(crate) async fn profiled_stream(
    lab: &Lab,
    server: &Pod,
    profile_options: &ProfileOptions,
    flamegraph: Option<&std::path::Path>,
) -> Result<(Breakdown, f64), Error> {
    profiled_stream_to(lab, server, server.ip, profile_options, flamegraph).await
}

/// [`profiled_stream`] with the client connecting to `connect` (a Service IP).
pub(crate) async fn profiled_stream_to(
    lab: &Lab,
    server: &Pod,
    connect: std::net::Ipv4Addr,
    profile_options: &ProfileOptions,
    flamegraph: Option<&std::path::Path>,
) -> Result<(Breakdown, f64), Error> {
    let mut profile_options = profile_options.clone();
    profile_options.window.stacks = flamegraph.is_some();
    let profile_options = &profile_options;
    profile::validate(profile_options)?;
    let probes = profile::start_probes(profile_options)?;
    let mut window = OpenWindow::open(&probes, &profile_options.window)?;
    // Warm-up, window, and a margin for the end snapshot.
    let seconds = profile_options.duration_s.ceil() as u32 + 2;
    let stream = traffic::Flow::new(&lab.client().netns, &server.netns, server.ip, seconds)
        .via(connect)
        .start()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    window.restart(&probes)?;
    tokio::time::sleep(Duration::from_secs_f64(profile_options.duration_s)).await;
    let mut breakdown = window.close(&probes)?;
    drop(probes);
    if let Some(path) = flamegraph {
        write_flamegraph(path, &breakdown)?;
        breakdown.stacks = None;
    }
    let throughput_gbps = tokio::task::spawn_blocking(move || stream.finish())
        .await
        .map_err(|e| Error::InvalidArgument(format!("stream task: {e}")))??;
    Ok((breakdown, throughput_gbps))
}

fn summarize(model: Model, scenario: Scenario, runs: Vec<Run>) -> BenchEntry {
    let throughput = Estimate::of(&runs.iter().map(|r| r.throughput_gbps).collect::<Vec<_>>());
    let rtt = Estimate::of(&runs.iter().map(|r| r.rtt_us).collect::<Vec<_>>());
    let connections = Estimate::of(
        &runs
            .iter()
            .map(|r| r.crr.connections_per_s)
            .collect::<Vec<_>>(),
    );
    let setup = Estimate::of(&runs.iter().map(|r| r.crr.setup_p50_us).collect::<Vec<_>>());
    let total = Estimate::of(
        &runs
            .iter()
            .map(|r| r.breakdown.total.cpp.unwrap_or(0.0))
            .collect::<Vec<_>>(),
    );
    let components = COMPONENTS
        .iter()
        .map(|c| ComponentEstimate {
            name: c.name.to_owned(),
            cpp: Estimate::of(
                &runs
                    .iter()
                    .map(|r| {
                        r.breakdown
                            .component(c.name)
                            .and_then(|x| x.cpp)
                            .unwrap_or(0.0)
                    })
                    .collect::<Vec<_>>(),
            ),
        })
        .collect();
    BenchEntry {
        model: model.name().to_owned(),
        scenario: scenario.name().to_owned(),
        throughput_gbps: Some(throughput.mean),
        rtt_us: Some(rtt.mean),
        repeats: runs.len() as u32,
        breakdown: runs.into_iter().last().map(|r| r.breakdown),
        throughput: Some(throughput),
        rtt: Some(rtt),
        connections_per_s: Some(connections),
        setup_p50_us: Some(setup),
        total_cpp: Some(total),
        components,
        unavailable: None,
    }
}

fn component_cpp<'a>(entry: &'a BenchEntry, name: &str) -> Option<&'a Estimate> {
    entry
        .components
        .iter()
        .find(|c| c.name == name)
        .map(|c| &c.cpp)
}

fn rows(entries: &[BenchEntry]) -> (Vec<String>, Vec<Vec<String>>) {
    let mut header = vec![
        "model".to_owned(),
        "scenario".to_owned(),
        "Gbit/s".to_owned(),
        "RTT us".to_owned(),
        "conn/s".to_owned(),
        "set-up us".to_owned(),
        "total CPP".to_owned(),
    ];
    header.extend(COMPONENTS.iter().map(|c| c.name.to_owned()));
    let rows = entries
        .iter()
        .map(|e| {
            let mut row = vec![e.model.clone(), e.scenario.clone()];
            if let Some(reason) = &e.unavailable {
                row.push("unavailable".to_owned());
                row.push(reason.split(':').next().unwrap_or(reason).to_owned());
                row.extend(std::iter::repeat_n(String::new(), COMPONENTS.len() + 3));
            } else {
                row.push(e.throughput.map_or_else(String::new, |t| t.show(2)));
                row.push(e.rtt.map_or_else(String::new, |t| t.show(1)));
                row.push(e.connections_per_s.map_or_else(String::new, |t| t.show(0)));
                row.push(e.setup_p50_us.map_or_else(String::new, |t| t.show(0)));
                row.push(e.total_cpp.map_or_else(String::new, |t| t.show(0)));
                for component in COMPONENTS {
                    row.push(
                        component_cpp(e, component.name).map_or_else(String::new, |c| c.show(0)),
                    );
                }
            }
            row
        })
        .collect();
    (header, rows)
}

pub fn table(entries: &[BenchEntry]) -> String {
    let (header, rows) = rows(entries);
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(header);
    for row in rows {
        table.add_row(row);
    }
    format!("{table}\n(CPP per component; mean ± 95% CI half-width over the repeats)\n")
}

pub fn markdown(entries: &[BenchEntry]) -> String {
    let (header, rows) = rows(entries);
    let mut out = format!("| {} |\n", header.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// Text made safe inside SVG markup (reasons quote kernel messages and paths).
fn escape_xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A 95% whisker (from the repeats) centred on a bar at height `y`, `half` pixels each way.
fn whisker(out: &mut String, x: f64, y: f64, half: f64) {
    if half < 0.5 {
        return;
    }
    let _ = writeln!(
        out,
        "<path d=\"M{x:.1} {:.1}V{:.1}M{:.1} {:.1}h6M{:.1} {:.1}h6\" stroke=\"#222\" fill=\"none\"/>",
        y - half,
        y + half,
        x - 3.0,
        y - half,
        x - 3.0,
        y + half
    );
}

/// The lab chart: two panels of stacked bars per model and scenario, one above the other: all
/// busy cycles per packet by component, then the datapath components alone on their own scale
/// (the endpoints' own work, `other`, is most of every bar and would flatten them); 95%
/// whiskers over the repeats, and the models that could not be built here named with the
/// reason (never left out silently).
pub fn svg(entries: &[BenchEntry]) -> String {
    let bars: Vec<&BenchEntry> = entries.iter().collect();
    let (bar_width, gap, plot_height, axis) = (40.0, 36.0, 250.0, 60.0);
    // Room above each panel for its title, below it for the two label lines.
    let (title_room, label_room) = (50.0, 50.0);
    let panel_height = title_room + plot_height + label_room;
    let panel_width = bars.len() as f64 * (bar_width + gap);
    let width = axis + panel_width + 40.0 + 150.0;
    let height = 2.0 * panel_height + 30.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        out,
        "<text x=\"{axis}\" y=\"18\" font-size=\"13\">Cycles per packet by component (cnitrace lab bench)</text>"
    );
    let datapath: Vec<&Component> = COMPONENTS.iter().filter(|c| c.name != OTHER).collect();
    let all: Vec<&Component> = COMPONENTS.iter().collect();
    let panels = [
        (title_room, "all busy cycles", all),
        (
            panel_height + title_room,
            "datapath components only (own scale)",
            datapath,
        ),
    ];
    let left = axis;
    for (top, title, components) in &panels {
        let top = *top;
        let max = bars
            .iter()
            .map(|e| {
                components
                    .iter()
                    .map(|c| {
                        component_cpp(e, c.name).map_or(0.0, |c| c.mean + c.ci95.unwrap_or(0.0))
                    })
                    .sum::<f64>()
            })
            .fold(1.0_f64, f64::max);
        let _ = writeln!(
            out,
            "<text x=\"{left:.0}\" y=\"{:.0}\" fill=\"#555\">{title}</text>",
            top - 14.0
        );
        for tick in 0..=4 {
            let value = max * f64::from(tick) / 4.0;
            let y = top + plot_height - plot_height * f64::from(tick) / 4.0;
            let _ = writeln!(
                out,
                "<line x1=\"{left:.0}\" y1=\"{y:.1}\" x2=\"{:.0}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{value:.0}</text>",
                left + panel_width,
                left - 6.0,
                y + 4.0
            );
        }
        for (index, entry) in bars.iter().enumerate() {
            let x = left + gap / 2.0 + index as f64 * (bar_width + gap);
            let mut y = top + plot_height;
            if let Some(reason) = &entry.unavailable {
                let _ = writeln!(
                    out,
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#888\">n/a<title>{}: {}</title></text>",
                    x + bar_width / 2.0,
                    y - 6.0,
                    entry.model,
                    escape_xml(reason)
                );
            }
            for component in components {
                let (name, colour) = (component.name, component.colour);
                let estimate = component_cpp(entry, name);
                let cpp = estimate.map_or(0.0, |c| c.mean);
                let h = plot_height * cpp / max;
                if h > 0.0 {
                    y -= h;
                    let ci = estimate.and_then(|c| c.ci95);
                    let _ = writeln!(
                        out,
                        "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar_width}\" height=\"{h:.1}\" fill=\"{colour}\"><title>{} {} {name}: {cpp:.0}{} CPP</title></rect>",
                        entry.model,
                        entry.scenario,
                        ci.map_or_else(String::new, |ci| format!(" ± {ci:.0}"))
                    );
                    // The datapath panel: each component's own whisker at its segment's top.
                    if name != OTHER && components.len() < COMPONENTS.len() {
                        whisker(
                            &mut out,
                            x + bar_width / 2.0,
                            y,
                            plot_height * ci.unwrap_or(0.0) / max,
                        );
                    }
                }
            }
            // The all-cycles panel: the total's whisker at the top of the stack.
            if components.len() == COMPONENTS.len()
                && let Some(total) = &entry.total_cpp
            {
                whisker(
                    &mut out,
                    x + bar_width / 2.0,
                    y,
                    plot_height * total.ci95.unwrap_or(0.0) / max,
                );
            }
            let label_y = top + plot_height + 14.0;
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{label_y:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\" font-size=\"10\">{}</text>",
                x + bar_width / 2.0,
                entry.model,
                x + bar_width / 2.0,
                label_y + 13.0,
                entry.scenario
            );
        }
    }
    let legend_x = width - 130.0;
    for (index, component) in COMPONENTS.iter().rev().enumerate() {
        let (name, colour) = (component.name, component.colour);
        let y = title_room + index as f64 * 18.0;
        let _ = writeln!(
            out,
            "<rect x=\"{legend_x:.0}\" y=\"{y:.0}\" width=\"12\" height=\"12\" fill=\"{colour}\"/>\
             <text x=\"{:.0}\" y=\"{:.0}\">{name}</text>",
            legend_x + 18.0,
            y + 10.0
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{axis}\" y=\"{:.0}\" fill=\"#555\">CPP = busy reference cycles of all CPUs / packets sent by the client pod; whiskers: 95% over the repeats; n/a: not buildable here (hover for why)</text>",
        height - 12.0
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates() {
        let one = Estimate::of(&[5.0]);
        assert_eq!((one.mean, one.ci95), (5.0, None));
        let three = Estimate::of(&[1.0, 2.0, 3.0]);
        assert!((three.mean - 2.0).abs() < 1e-12);
        // s = 1, n = 3: 4.303 / sqrt(3).
        assert!((three.ci95.unwrap() - 4.303 / 3f64.sqrt()).abs() < 1e-9);
    }

    fn entry(model: &str, bridge: f64, other: f64) -> BenchEntry {
        BenchEntry {
            model: model.to_owned(),
            scenario: "intra".to_owned(),
            throughput_gbps: Some(10.0),
            rtt_us: Some(30.0),
            repeats: 1,
            breakdown: None,
            throughput: Some(Estimate::of(&[10.0])),
            rtt: Some(Estimate::of(&[30.0])),
            connections_per_s: Some(Estimate::of(&[3000.0])),
            setup_p50_us: Some(Estimate::of(&[50.0])),
            total_cpp: Some(Estimate::of(&[bridge + other])),
            components: vec![
                ComponentEstimate {
                    name: "bridge".into(),
                    cpp: Estimate::of(&[bridge]),
                },
                ComponentEstimate {
                    name: "other".into(),
                    cpp: Estimate::of(&[other]),
                },
            ],
            unavailable: None,
        }
    }

    #[test]
    fn outputs_carry_every_entry() {
        let entries = vec![
            entry("flannel", 100.0, 900.0),
            entry("calico-np", 0.0, 800.0),
            unavailable_entry(Model::CalicoIpip, Scenario::Inter, "unavailable: no ipip"),
        ];
        let md = markdown(&entries);
        assert_eq!(md.lines().count(), 2 + 3);
        assert!(
            md.contains("| flannel | intra | 10.00 | 30.0 | 3000 | 50 | 1000 | 100 |"),
            "{md}"
        );
        assert!(md.contains("calico-ipip | inter | unavailable"));
        let chart = svg(&entries);
        // Bridge and other in the first panel, bridge alone in the second.
        assert_eq!(
            chart.matches("<title>flannel").count(),
            3,
            "bridge and other, then bridge"
        );
        assert_eq!(
            chart.matches("<title>calico-np").count(),
            1,
            "no zero-height bars"
        );
        // Never a silent gap: the model that could not be built is named, with the reason.
        assert_eq!(
            chart
                .matches("n/a<title>calico-ipip: unavailable: no ipip</title>")
                .count(),
            2
        );
        // One run gives no interval, so no whisker; repeats draw one per datapath segment
        // and one on the total.
        assert!(!chart.contains("<path"));
        let mut repeated = entry("flannel", 100.0, 900.0);
        repeated.components[0].cpp = Estimate::of(&[90.0, 110.0]);
        repeated.total_cpp = Some(Estimate::of(&[950.0, 1050.0]));
        assert_eq!(svg(&[repeated]).matches("<path").count(), 2);
        assert!(table(&entries).contains("flannel"));
        let json = serde_json::to_value(&entries).unwrap();
        assert_eq!(json[0]["throughput_gbps"], 10.0);
        assert!(json[2]["rtt_us"].is_null());
    }
}
