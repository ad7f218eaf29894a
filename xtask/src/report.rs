//! Benchmarks write what they print into BENCHMARKS.md, between `<!-- bench:NAME -->` markers,
//! with the date, kernel, CPU and the exact command, so the file always holds measured output.

use std::fmt::Write as _;

use anyhow::{Context as _, Result};

use crate::workspace_root;

fn environment() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    format!(
        "{}, kernel {}, {cpu} x {cpus} CPUs",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        kernel.trim()
    )
}

/// Prints `body` and stores it as the section `name` of BENCHMARKS.md.
pub fn publish(name: &str, body: &str) -> Result<()> {
    print!("{body}");
    let command = format!(
        "cargo xtask {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let mut section = String::new();
    let _ = writeln!(section, "<!-- bench:{name} -->");
    let _ = writeln!(section, "Measured {}. Command: `{command}`", environment());
    let _ = writeln!(section, "\n```\n{}\n```", body.trim());
    let _ = write!(section, "<!-- /bench:{name} -->");
    let path = workspace_root().join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
    let (open, close) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    let updated = match (text.find(&open), text.find(&close)) {
        (Some(start), Some(end)) if end > start => {
            format!("{}{section}{}", &text[..start], &text[end + close.len()..])
        }
        _ => format!("{}\n## Results: {name}\n\n{section}\n", text.trim_end()),
    };
    std::fs::write(&path, updated).with_context(|| format!("write {}", path.display()))?;
    eprintln!("xtask: wrote section `{name}` of BENCHMARKS.md");
    Ok(())
}
