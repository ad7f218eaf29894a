//! Where a window's cycles went, stack by stack: the distinct sampled stacks of a window,
//! written as folded lines, as a flame graph coloured by component (inferno) and as a pprof
//! profile (profile.proto with prost), and the per-packet difference of two windows.

use std::{collections::HashMap, fmt::Write as _};

use crate::{
    breakdown::RawWindow,
    components,
    contract::{Breakdown, StackCost},
};

/// The frame that stands for a user-mode sample.
pub const USER_FRAME: &str = "[user space]";
/// The frame that stands for a kernel sample whose stack was lost.
pub const LOST_FRAME: &str = "[stack lost]";

#[derive(Debug, thiserror::Error)]
pub enum FlameError {
    #[error(
        "this window has no stacks: the tracing backend times functions instead of sampling \
         stacks (profile with --backend sampling), or the breakdown was written without \
         --stacks"
    )]
    NoStacks,
    #[error("no busy sample in the window: nothing to draw")]
    Empty,
    #[error("render the flame graph: {0}")]
    Render(#[from] std::io::Error),
}

/// The distinct stacks of a window, outermost frame first, costliest first (idle excluded).
/// Their cycles add up to the window's sampled busy cycles, as the components' do.
pub fn stacks_of(raw: &RawWindow) -> Vec<StackCost> {
    let cycles_per_unit = raw.clock.cycles_per_period_unit();
    // Each stack is labelled by the layer rule (one class per stack, whatever the view).
    let rule = crate::breakdown::rule_for(raw, crate::contract::View::Layer);
    let mut by_stack: HashMap<(Vec<&str>, &'static str), (u64, u64)> = HashMap::new();
    for sample in &raw.samples {
        let Some(class) =
            crate::attribution::attribute(sample, rule).map(|charge| charge.classes[0])
        else {
            continue;
        };
        let frames: Vec<&str> = if sample.flags & cnitrace_common::SAMPLE_FLAG_USER != 0 {
            vec![USER_FRAME]
        } else if sample.frames.is_empty() {
            vec![LOST_FRAME]
        } else {
            sample.frames.iter().rev().map(String::as_str).collect()
        };
        let entry = by_stack.entry((frames, class)).or_default();
        entry.0 += sample.count;
        entry.1 += sample.period;
    }
    let mut stacks: Vec<StackCost> = by_stack
        .into_iter()
        .map(|((frames, class), (samples, period))| StackCost {
            frames: frames.into_iter().map(str::to_owned).collect(),
            component: class.to_owned(),
            samples,
            cycles: (period as f64 * cycles_per_unit).round() as u64,
        })
        .collect();
    stacks.sort_unstable_by(|a, b| b.cycles.cmp(&a.cycles).then(a.frames.cmp(&b.frames)));
    stacks
}

fn stacks(breakdown: &Breakdown) -> Result<&[StackCost], FlameError> {
    match breakdown.stacks.as_deref() {
        None => Err(FlameError::NoStacks),
        Some([]) => Err(FlameError::Empty),
        Some(stacks) => Ok(stacks),
    }
}

/// Folded stacks (`outer;...;inner cycles`, one line per stack): the input of flamegraph.pl,
/// inferno and speedscope.
pub fn folded(breakdown: &Breakdown) -> Result<String, FlameError> {
    let mut out = String::new();
    for stack in stacks(breakdown)? {
        out.push_str(&stack.frames.join(";"));
        out.push(' ');
        out.push_str(&stack.cycles.to_string());
        out.push('\n');
    }
    Ok(out)
}

/// Stacks back from folded lines (as served by the agent): the component of each is found
/// by the layer rule, as for a sample. Lines that are not `frames count` are skipped.
pub fn parse_folded(text: &str) -> Vec<StackCost> {
    text.lines()
        .filter_map(|line| {
            let (frames, cycles) = line.trim().rsplit_once(' ')?;
            let cycles: u64 = cycles.parse().ok()?;
            let frames: Vec<String> = frames.split(';').map(str::to_owned).collect();
            let innermost_first: Vec<String> = frames.iter().rev().cloned().collect();
            let component = match frames[frames.len() - 1].as_str() {
                USER_FRAME | LOST_FRAME => frame_class(&frames[frames.len() - 1]),
                _ => crate::attribution::layer_class(&innermost_first),
            };
            Some(StackCost {
                component: component.to_owned(),
                frames,
                samples: 0,
                cycles,
            })
        })
        .collect()
}

/// The component a frame's own function belongs to: the datapath taxonomy, else the host's
/// groups, else `other.kernel`.
fn frame_class(frame: &str) -> &'static str {
    match frame {
        USER_FRAME => components::OTHER_USER,
        LOST_FRAME => components::OTHER_KERNEL,
        _ => components::classify(frame)
            .or_else(|| components::classify_host(frame))
            .unwrap_or(components::OTHER_KERNEL),
    }
}

fn rgb(hex: &str) -> inferno::flamegraph::color::Color {
    let channel =
        |i: usize| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("80"), 16).unwrap_or(128);
    inferno::flamegraph::color::Color {
        r: channel(1),
        g: channel(3),
        b: channel(5),
    }
}

/// One line for a flame graph's subtitle: the window's CPP, packets and the datapath
/// components' shares.
fn summary(breakdown: &Breakdown) -> String {
    let cpp = breakdown.total.cpp.map_or_else(
        || "no packets counted".to_owned(),
        |c| format!("{c:.0} cycles/packet"),
    );
    let parts: Vec<String> = breakdown
        .components
        .iter()
        .filter(|c| c.cycles > 0 && c.name != components::OTHER)
        .map(|c| format!("{} {:.1}%", c.name, c.share * 100.0))
        .collect();
    format!(
        "{cpp}, {} packets in {:.1} s on {} ({}); {}",
        breakdown.packets.count,
        breakdown.window.duration_s,
        breakdown.node,
        breakdown.kernel,
        if parts.is_empty() {
            "no datapath component sampled".to_owned()
        } else {
            parts.join(", ")
        }
    )
}

/// An interactive SVG flame graph (search, zoom) of the window, every frame in the colour of
/// its function's component, as in the stacked bars.
pub fn flamegraph_svg(breakdown: &Breakdown) -> Result<Vec<u8>, FlameError> {
    let stacks = stacks(breakdown)?;
    let lines = folded(breakdown)?;
    let mut palette = inferno::flamegraph::color::PaletteMap::default();
    for stack in stacks {
        for frame in &stack.frames {
            if palette.get(frame).is_none() {
                palette.insert(frame, rgb(components::colour(frame_class(frame))));
            }
        }
    }
    let mut options = inferno::flamegraph::Options::default();
    "cnitrace: kernel cycles by stack".clone_into(&mut options.title);
    options.subtitle = Some(summary(breakdown));
    "cycles".clone_into(&mut options.count_name);
    options.palette_map = Some(&mut palette);
    options.deterministic = true;
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut options, lines.lines(), &mut svg)?;
    Ok(svg)
}

/// Per-packet stack costs of two windows, for a differential flame graph: each line is
/// `stack before after`, in millicycles per packet (a longer window is not "more").
pub fn differential_folded(before: &Breakdown, after: &Breakdown) -> Result<String, FlameError> {
    let per_packet = |b: &Breakdown| -> Result<HashMap<String, u64>, FlameError> {
        let packets = b.packets.count.max(1) as f64;
        let mut out: HashMap<String, u64> = HashMap::new();
        for stack in stacks(b)? {
            *out.entry(stack.frames.join(";")).or_default() +=
                (stack.cycles as f64 * 1000.0 / packets).round() as u64;
        }
        Ok(out)
    };
    let (a, b) = (per_packet(before)?, per_packet(after)?);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut out = String::new();
    for key in keys {
        let (x, y) = (
            a.get(key).copied().unwrap_or(0),
            b.get(key).copied().unwrap_or(0),
        );
        if x + y > 0 {
            let _ = writeln!(out, "{key} {x} {y}");
        }
    }
    Ok(out)
}

/// A differential flame graph: frames sized by the second window's per-packet cost,
/// red where it grew from the first, blue where it shrank.
pub fn differential_svg(before: &Breakdown, after: &Breakdown) -> Result<Vec<u8>, FlameError> {
    let lines = differential_folded(before, after)?;
    let mut options = inferno::flamegraph::Options::default();
    "cnitrace: per-packet difference (red grew, blue shrank)".clone_into(&mut options.title);
    options.subtitle = Some(format!(
        "before: {} | after: {}",
        summary(before),
        summary(after)
    ));
    "millicycles per packet".clone_into(&mut options.count_name);
    options.deterministic = true;
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut options, lines.lines(), &mut svg)?;
    Ok(svg)
}

/// One component's (or function's) cost in two windows.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CostDelta {
    pub name: String,
    pub before_cpp: Option<f64>,
    pub after_cpp: Option<f64>,
    /// after - before, cycles per packet.
    pub delta_cpp: Option<f64>,
    pub before_share: f64,
    pub after_share: f64,
}

/// What changed between two windows, per packet.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Diff {
    pub before_packets: u64,
    pub after_packets: u64,
    pub total: CostDelta,
    pub components: Vec<CostDelta>,
    pub subcomponents: Vec<CostDelta>,
    /// Innermost functions (self cost), largest per-packet growth first; empty when either
    /// window has no stacks.
    pub functions: Vec<CostDelta>,
}

fn delta(
    name: &str,
    before: Option<(Option<f64>, f64)>,
    after: Option<(Option<f64>, f64)>,
) -> CostDelta {
    let (before_cpp, before_share) = before.unwrap_or((Some(0.0), 0.0));
    let (after_cpp, after_share) = after.unwrap_or((Some(0.0), 0.0));
    CostDelta {
        name: name.to_owned(),
        before_cpp,
        after_cpp,
        delta_cpp: before_cpp.zip(after_cpp).map(|(b, a)| a - b),
        before_share,
        after_share,
    }
}

/// Self cost per innermost function: (cycles per packet, share of busy cycles).
fn leaf_costs(b: &Breakdown) -> HashMap<&str, (Option<f64>, f64)> {
    let mut cycles: HashMap<&str, u64> = HashMap::new();
    for stack in b.stacks.as_deref().unwrap_or_default() {
        if let Some(leaf) = stack.frames.last() {
            *cycles.entry(leaf).or_default() += stack.cycles;
        }
    }
    let total = b.total.cycles.max(1) as f64;
    cycles
        .into_iter()
        .map(|(leaf, c)| {
            let cpp = (b.packets.count > 0).then(|| c as f64 / b.packets.count as f64);
            (leaf, (cpp, c as f64 / total))
        })
        .collect()
}

/// The per-packet difference of two windows: components, sub-components and (with stacks)
/// innermost functions.
pub fn diff(before: &Breakdown, after: &Breakdown) -> Diff {
    let of = |list: &[crate::contract::ComponentCost]| -> HashMap<String, (Option<f64>, f64)> {
        list.iter()
            .map(|c| (c.name.clone(), (c.cpp, c.share)))
            .collect()
    };
    let pairs = |a: &[crate::contract::ComponentCost], b: &[crate::contract::ComponentCost]| {
        let (x, y) = (of(a), of(b));
        let mut names: Vec<&String> = a.iter().chain(b).map(|c| &c.name).collect();
        names.dedup();
        let mut seen = std::collections::HashSet::new();
        names
            .into_iter()
            .filter(|n| seen.insert(n.as_str()))
            .map(|n| delta(n, x.get(n).copied(), y.get(n).copied()))
            .collect::<Vec<_>>()
    };
    let mut functions = Vec::new();
    if before.stacks.is_some() && after.stacks.is_some() {
        let (x, y) = (leaf_costs(before), leaf_costs(after));
        let mut names: Vec<&str> = x.keys().chain(y.keys()).copied().collect();
        names.sort_unstable();
        names.dedup();
        functions = names
            .into_iter()
            .map(|n| delta(n, x.get(n).copied(), y.get(n).copied()))
            .collect();
        functions.sort_by(|a, b| {
            b.delta_cpp
                .unwrap_or(0.0)
                .total_cmp(&a.delta_cpp.unwrap_or(0.0))
                .then_with(|| a.name.cmp(&b.name))
        });
    }
    Diff {
        before_packets: before.packets.count,
        after_packets: after.packets.count,
        total: delta(
            "total",
            Some((before.total.cpp, 1.0)),
            Some((after.total.cpp, 1.0)),
        ),
        components: pairs(&before.components, &after.components),
        subcomponents: pairs(&before.subcomponents, &after.subcomponents),
        functions,
    }
}

/// pprof's profile.proto (github.com/google/pprof/proto/profile.proto), the messages and
/// fields cnitrace writes.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
    }
}

/// Interns strings into a profile's string table (index 0 is the empty string).
#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut strings = Self::default();
        strings.id("");
        strings
    }

    fn id(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.index.get(s) {
            return id;
        }
        let id = i64::try_from(self.table.len()).unwrap_or(i64::MAX);
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), id);
        id
    }
}

/// The window as a gzipped pprof profile: per stack, its samples, cycles and millicycles
/// per packet, labelled with its component; `go tool pprof`, Pyroscope and Parca read it.
pub fn pprof_gz(breakdown: &Breakdown) -> Result<Vec<u8>, FlameError> {
    use prost::Message as _;
    let stacks = stacks(breakdown)?;
    let mut strings = Strings::new();
    let value_type = |strings: &mut Strings, kind: &str, unit: &str| proto::ValueType {
        r#type: strings.id(kind),
        unit: strings.id(unit),
    };
    let sample_type = vec![
        value_type(&mut strings, "samples", "count"),
        value_type(&mut strings, "cycles", "count"),
        value_type(&mut strings, "cycles_per_packet", "millicycles"),
    ];
    let packets = breakdown.packets.count.max(1) as f64;
    let mut location_of: HashMap<&str, u64> = HashMap::new();
    let (mut functions, mut locations) = (Vec::new(), Vec::new());
    let component_key = strings.id("component");
    let mut samples = Vec::with_capacity(stacks.len());
    for stack in stacks {
        let mut location_id = Vec::with_capacity(stack.frames.len());
        // pprof lists a sample's locations innermost first.
        for frame in stack.frames.iter().rev() {
            let id = *location_of.entry(frame).or_insert_with(|| {
                let id = functions.len() as u64 + 1;
                let name = strings.id(frame);
                functions.push(proto::Function {
                    id,
                    name,
                    system_name: name,
                });
                locations.push(proto::Location {
                    id,
                    mapping_id: 1,
                    line: vec![proto::Line { function_id: id }],
                });
                id
            });
            location_id.push(id);
        }
        samples.push(proto::Sample {
            location_id,
            value: vec![
                i64::try_from(stack.samples).unwrap_or(i64::MAX),
                i64::try_from(stack.cycles).unwrap_or(i64::MAX),
                (stack.cycles as f64 * 1000.0 / packets).round() as i64,
            ],
            label: vec![proto::Label {
                key: component_key,
                str: strings.id(&stack.component),
            }],
        });
    }
    let comment = vec![strings.id(&summary(breakdown))];
    let default_sample_type = strings.id("cycles");
    let mapping = vec![proto::Mapping {
        id: 1,
        filename: strings.id("[kernel.kallsyms]"),
        has_functions: true,
    }];
    let period_type = Some(value_type(&mut strings, "cpu", "nanoseconds"));
    let period = if breakdown.quality.frequency_hz > 0 {
        (1e9 / breakdown.quality.frequency_hz as f64).round() as i64
    } else {
        0
    };
    let profile = proto::Profile {
        sample_type,
        sample: samples,
        mapping,
        location: locations,
        function: functions,
        string_table: strings.table,
        time_nanos: breakdown.window.start.timestamp_nanos_opt().unwrap_or(0),
        duration_nanos: (breakdown.window.duration_s * 1e9).round() as i64,
        period_type,
        period,
        comment,
        default_sample_type,
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &profile.encode_to_vec())?;
    Ok(gz.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breakdown::{self, StackSample};

    fn sample(frames: &[&str], flags: u32, count: u64) -> StackSample {
        StackSample {
            frames: frames.iter().map(|f| (*f).to_owned()).collect(),
            flags,
            stack_lost: false,
            count,
            period: count * 1000,
        }
    }

    fn window() -> RawWindow {
        let mut raw = crate::breakdown::tests::raw_window();
        raw.samples = vec![
            // Innermost first, as the kernel records them.
            sample(&["nft_do_chain", "nf_hook_slow", "br_forward"], 0, 6),
            sample(&["nft_do_chain", "nf_hook_slow", "br_forward"], 0, 2),
            sample(&["tcp_sendmsg", "__sys_sendto"], 0, 3),
            sample(&[], cnitrace_common::SAMPLE_FLAG_USER, 1),
            // Idle: not a stack of the graph.
            sample(
                &["default_idle"],
                cnitrace_common::SAMPLE_FLAG_IDLE_TASK,
                50,
            ),
        ];
        raw
    }

    #[test]
    fn stacks_are_merged_outermost_first_without_idle() {
        let stacks = stacks_of(&window());
        let cpu = crate::breakdown::tests::raw_window()
            .clock
            .cycles_per_period_unit();
        assert_eq!(stacks.len(), 3);
        assert_eq!(
            stacks[0].frames,
            ["br_forward", "nf_hook_slow", "nft_do_chain"]
        );
        assert_eq!(stacks[0].component, "netfilter.rules");
        assert_eq!(stacks[0].samples, 8);
        assert_eq!(stacks[0].cycles, (8000.0 * cpu).round() as u64);
        assert_eq!(stacks[1].component, components::OTHER_TCP);
        assert_eq!(stacks[2].frames, [USER_FRAME]);
    }

    #[test]
    fn folded_svg_and_pprof_of_a_window() {
        let raw = window();
        let context = crate::breakdown::tests::context();
        let mut b = breakdown::compute(
            &raw,
            &context,
            &crate::breakdown::PacketSelection::default(),
        );
        b.stacks = Some(stacks_of(&raw));
        let folded = folded(&b).unwrap();
        assert!(folded.starts_with("br_forward;nf_hook_slow;nft_do_chain "));
        assert_eq!(folded.lines().count(), 3);
        let svg = String::from_utf8(flamegraph_svg(&b).unwrap()).unwrap();
        assert!(svg.contains("nft_do_chain"));
        // The netfilter frame carries the netfilter colour.
        let netfilter = rgb(components::colour("netfilter"));
        assert!(
            svg.contains(&format!(
                "rgb({},{},{})",
                netfilter.r, netfilter.g, netfilter.b
            )),
            "netfilter colour missing"
        );
        let gz = pprof_gz(&b).unwrap();
        let mut raw_proto = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw_proto)
            .unwrap();
        let profile = <proto::Profile as prost::Message>::decode(&raw_proto[..]).unwrap();
        assert_eq!(profile.sample.len(), 3);
        assert_eq!(profile.string_table[0], "");
        let leaf = profile.sample[0].location_id[0];
        let name = profile.function[(leaf - 1) as usize].name;
        assert_eq!(profile.string_table[name as usize], "nft_do_chain");
    }

    #[test]
    fn folded_lines_parse_back_into_stacks() {
        let raw = window();
        let mut b = breakdown::compute(
            &raw,
            &crate::breakdown::tests::context(),
            &crate::breakdown::PacketSelection::default(),
        );
        b.stacks = Some(stacks_of(&raw));
        let parsed = parse_folded(&format!("{}garbage\n", folded(&b).unwrap()));
        let original = b.stacks.unwrap();
        assert_eq!(parsed.len(), original.len());
        for (p, o) in parsed.iter().zip(&original) {
            assert_eq!(
                (&p.frames, &p.component, p.cycles),
                (&o.frames, &o.component, o.cycles)
            );
        }
    }

    #[test]
    fn no_stacks_is_an_error_not_an_empty_graph() {
        let raw = window();
        let b = breakdown::compute(
            &raw,
            &crate::breakdown::tests::context(),
            &crate::breakdown::PacketSelection::default(),
        );
        assert!(matches!(flamegraph_svg(&b), Err(FlameError::NoStacks)));
        let mut empty = b.clone();
        empty.stacks = Some(Vec::new());
        assert!(matches!(pprof_gz(&empty), Err(FlameError::Empty)));
    }

    #[test]
    fn differential_is_per_packet() {
        let raw = window();
        let context = crate::breakdown::tests::context();
        let mut a = breakdown::compute(
            &raw,
            &context,
            &crate::breakdown::PacketSelection::default(),
        );
        a.stacks = Some(stacks_of(&raw));
        // The same stacks over twice the packets: half the cost per packet.
        let mut doubled = raw.clone();
        for device in &mut doubled.ifaces {
            device.tx_skbs *= 2;
            device.tx_segments *= 2;
            device.tx_bytes *= 2;
        }
        let mut b = breakdown::compute(
            &doubled,
            &context,
            &crate::breakdown::PacketSelection::default(),
        );
        b.stacks = Some(stacks_of(&doubled));
        assert_eq!(b.packets.count, 2 * a.packets.count);
        let lines = differential_folded(&a, &b).unwrap();
        for line in lines.lines() {
            let mut fields = line.rsplitn(3, ' ');
            let after: u64 = fields.next().unwrap().parse().unwrap();
            let before: u64 = fields.next().unwrap().parse().unwrap();
            assert!(
                after * 2 >= before.saturating_sub(1) && after * 2 <= before + 1,
                "{line}"
            );
        }
        let svg = differential_svg(&a, &b).unwrap();
        assert!(String::from_utf8(svg).unwrap().contains("nft_do_chain"));
        let d = diff(&a, &b);
        let netfilter = d.components.iter().find(|c| c.name == "netfilter").unwrap();
        let (before, after) = (netfilter.before_cpp.unwrap(), netfilter.after_cpp.unwrap());
        assert!((after * 2.0 - before).abs() < 1e-6, "{netfilter:?}");
        // Every function shrank per packet, the largest first from the bottom.
        assert_eq!(d.functions.last().unwrap().name, "nft_do_chain");
        assert!(d.functions.iter().all(|f| f.delta_cpp.unwrap() < 0.0));
    }
}
