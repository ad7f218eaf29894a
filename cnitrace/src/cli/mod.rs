//! The `cnitrace` binary's subcommands (not part of the library): argument types and the work
//! of each subcommand, one module each, on top of the library's own enums.

pub mod agent;
pub mod collect;
pub mod import_perf;
pub mod lab;
pub mod profile;

use clap::ValueEnum;
use serde::Serialize;

/// How a result is printed.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// Prints `value` as pretty JSON or as the table `render` makes of it.
pub fn print<T: Serialize>(
    format: Format,
    value: &T,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Table => print!("{}", render(value)),
    }
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn interrupted() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Reads a bearer token from a file (trimmed; empty is an error).
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read --token-file {}: {e}", path.display()))?
        .trim()
        .to_owned();
    if token.is_empty() {
        anyhow::bail!("--token-file {} is empty", path.display());
    }
    Ok(token)
}
