//! `cnitrace diff`: what changed per packet between two windows, and a differential flame
//! graph.

use cnitrace::{
    collect::{AgentClient, read_ca_file},
    contract::Breakdown,
    flame::{self, CostDelta, Diff},
};

use super::{Format, read_token};

#[derive(clap::Args)]
pub struct DiffArgs {
    /// The first window: a breakdown JSON file (`profile --format json --stacks`), or with
    /// --agent a session id.
    pub before: String,
    /// The second window, the same way.
    pub after: String,
    /// Read BEFORE and AFTER as stopped sessions of this agent (http(s)://HOST:PORT).
    #[arg(long)]
    pub agent: Option<String>,
    /// A file holding the agent's bearer token.
    #[arg(long, requires = "agent")]
    pub token_file: Option<std::path::PathBuf>,
    /// PEM certificate(s) to trust for an https:// agent.
    #[arg(long, requires = "agent")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Also write a differential flame graph here (per packet: red grew, blue shrank).
    #[arg(long, value_name = "FILE.svg")]
    pub flamegraph: Option<std::path::PathBuf>,
    /// Innermost functions listed in the table.
    #[arg(long, default_value_t = 10)]
    pub functions: usize,
    /// A table of per-packet deltas, or their JSON.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

fn read_file(path: &str) -> anyhow::Result<Breakdown> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{path} is not a cnitrace breakdown (JSON): {e}"))
}

fn read_session(client: &AgentClient, id: &str) -> anyhow::Result<Breakdown> {
    let id: u64 = id
        .parse()
        .map_err(|_| anyhow::anyhow!("`{id}` is not a session id (with --agent, give ids)"))?;
    Ok(client.session_with_stacks(id)?)
}

pub async fn run(args: DiffArgs) -> anyhow::Result<()> {
    let (before, after) = match &args.agent {
        None => (read_file(&args.before)?, read_file(&args.after)?),
        Some(url) => {
            let token = args.token_file.as_deref().map(read_token).transpose()?;
            let ca = args.ca_file.as_deref().map(read_ca_file).transpose()?;
            let client = AgentClient::new(url, token, ca.as_deref())?;
            let (b, a) = (args.before.clone(), args.after.clone());
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                Ok((read_session(&client, &b)?, read_session(&client, &a)?))
            })
            .await??
        }
    };
    if let Some(path) = &args.flamegraph {
        let svg = flame::differential_svg(&before, &after)?;
        std::fs::write(path, svg)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    for warning in incomparable(&before, &after) {
        eprintln!("cnitrace: warning: {warning}");
    }
    let diff = flame::diff(&before, &after);
    super::print(args.format, &diff, |d| table(d, args.functions))
}

/// What makes two breakdowns differ by method rather than by what ran: another attribution
/// rule, cycle unit or backend. (Files written before `view` existed read as `layer`, but
/// were charged by the innermost component anywhere on the stack.)
fn incomparable(before: &Breakdown, after: &Breakdown) -> Vec<String> {
    let mut warnings = Vec::new();
    if before.view != after.view {
        warnings.push(format!(
            "the breakdowns were computed with different views ({} and {}): their components \
             differ by rule, not only by what ran",
            before.view.as_str(),
            after.view.as_str()
        ));
    }
    if before.cycle_unit != after.cycle_unit {
        warnings.push(format!(
            "the breakdowns count different cycles ({} and {})",
            before.cycle_unit.as_str(),
            after.cycle_unit.as_str()
        ));
    }
    if before.backend != after.backend {
        warnings.push(format!(
            "the breakdowns come from different backends ({} and {}): tracing times its entry \
             points, sampling charges stacks (docs/method.md)",
            before.backend, after.backend
        ));
    }
    warnings
}

fn cpp(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

fn signed(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:+.1}"))
}

fn rows(table: &mut comfy_table::Table, deltas: &[CostDelta], indent: &str) {
    for d in deltas {
        table.add_row(vec![
            format!("{indent}{}", d.name),
            cpp(d.before_cpp),
            cpp(d.after_cpp),
            signed(d.delta_cpp),
            format!("{:+.1}", (d.after_share - d.before_share) * 100.0),
        ]);
    }
}

fn table(diff: &Diff, functions: usize) -> String {
    let mut out = format!(
        "packets: before {}, after {} (every figure is per packet)\n",
        diff.before_packets, diff.after_packets
    );
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_header(vec![
            "component",
            "before CPP",
            "after CPP",
            "delta CPP",
            "share delta (pp)",
        ]);
    rows(&mut t, std::slice::from_ref(&diff.total), "");
    for component in &diff.components {
        rows(&mut t, std::slice::from_ref(component), "");
        let prefix = format!("{}.", component.name);
        let subs: Vec<CostDelta> = diff
            .subcomponents
            .iter()
            .filter(|s| s.name.starts_with(&prefix))
            .cloned()
            .collect();
        rows(&mut t, &subs, "  ");
    }
    out.push_str(&t.to_string());
    out.push('\n');
    if diff.functions.is_empty() {
        out.push_str("functions: none (a window without stacks: write them with --stacks)\n");
        return out;
    }
    let mut f = comfy_table::Table::new();
    f.load_preset(comfy_table::presets::NOTHING)
        .set_header(vec![
            "innermost function",
            "before CPP",
            "after CPP",
            "delta CPP",
            "share delta (pp)",
        ]);
    let grew: Vec<CostDelta> = diff.functions.iter().take(functions).cloned().collect();
    rows(&mut f, &grew, "");
    out.push_str("\nlargest growth per packet:\n");
    out.push_str(&f.to_string());
    out.push('\n');
    out
}
