//! `cnitrace collect`: one window across several agents, optionally around a benchmark.

use cnitrace::collect::{AgentClient, Collected, discover, read_ca_file, sum, table};

use super::{Format, read_token};

#[derive(clap::Args)]
pub struct CollectArgs {
    /// Agents: http://HOST:PORT, or dns+http://NAME:PORT for every address NAME resolves to
    /// (a headless Service: one agent per node).
    #[arg(required = true)]
    pub urls: Vec<String>,
    /// A file holding the agents' bearer token.
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
    /// PEM certificate(s) to trust for https:// agents (their CA, or their self-signed
    /// certificates); without it, the public web roots.
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Window length when no command is given (Ctrl-C ends it early).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Per-node columns and their sum as a table, or the JSON of every breakdown.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// The benchmark to run while the window is open, after `--`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

pub async fn run(args: CollectArgs) -> anyhow::Result<()> {
    if args.command.is_empty() {
        cnitrace::profile::validate_duration(args.duration)?;
    }
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    let urls = discover(&args.urls)?;
    let ca = args.ca_file.as_deref().map(read_ca_file).transpose()?;
    let clients = urls
        .iter()
        .map(|url| AgentClient::new(url, token.clone(), ca.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    let clients = std::sync::Arc::new(clients);
    let started = {
        let clients = std::sync::Arc::clone(&clients);
        tokio::task::spawn_blocking(move || {
            let mut ids = Vec::new();
            for client in clients.iter() {
                match client.start() {
                    Ok(id) => ids.push(id),
                    Err(e) => {
                        // Do not leave sessions running on the agents that did start.
                        for (client, id) in clients.iter().zip(&ids) {
                            let _ = client.stop(*id);
                        }
                        return Err(e);
                    }
                }
            }
            Ok(ids)
        })
        .await??
    };
    let mut command_status = None;
    if let Some((program, rest)) = args.command.split_first() {
        eprintln!(
            "cnitrace collect: sessions open on {} agents; running {}",
            clients.len(),
            args.command.join(" ")
        );
        let mut command = tokio::process::Command::new(program);
        command.args(rest);
        if args.format == Format::Json {
            // Keep stdout for the JSON document: the benchmark's own output goes to stderr.
            use std::os::fd::AsFd as _;
            command.stdout(std::io::stderr().as_fd().try_clone_to_owned()?);
        }
        let mut child = command.spawn();
        match &mut child {
            Ok(child) => {
                // Ctrl-C reaches the command too; wait for it, then close the windows.
                let status = tokio::select! {
                    status = child.wait() => status,
                    _ = tokio::signal::ctrl_c() => child.wait().await,
                };
                command_status = Some(status?);
            }
            Err(e) => eprintln!("cnitrace collect: cannot run {program}: {e}"),
        }
    } else {
        eprintln!(
            "cnitrace collect: sessions open on {} agents for {} s",
            clients.len(),
            args.duration
        );
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs_f64(args.duration)) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    let nodes = {
        let clients = std::sync::Arc::clone(&clients);
        tokio::task::spawn_blocking(move || {
            // Every session is stopped, whatever happens to the others; failures are
            // reported together afterwards.
            let mut nodes = Vec::new();
            let mut failures = Vec::new();
            for (client, id) in clients.iter().zip(started) {
                match client.stop(id) {
                    Ok(breakdown) => nodes.push(breakdown),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            if failures.is_empty() {
                Ok(nodes)
            } else {
                Err(anyhow::anyhow!(
                    "{} of {} sessions could not be stopped:\n  {}",
                    failures.len(),
                    clients.len(),
                    failures.join("\n  ")
                ))
            }
        })
        .await??
    };
    let collected = Collected {
        sum: sum(&nodes),
        nodes,
    };
    super::print(args.format, &collected, table)?;
    match command_status {
        Some(status) if !status.success() => {
            anyhow::bail!("the benchmark command exited with {status}")
        }
        None if !args.command.is_empty() => {
            anyhow::bail!("the benchmark command could not be started")
        }
        _ => Ok(()),
    }
}
