//! `cnitrace doctor --repair`: puts the node back as it was before a cnitrace process was
//! killed (`kill -9`, OOM, power cut) in the middle of its work.
//!
//! What such a process can leave behind, and how each is found without a record of it:
//! the `kernel.bpf_stats_enabled` sysctl (kernels before 5.8; the value to restore is noted in
//! /run/cnitrace), nftables hook-entry counting tables (named after their process), lab
//! namespaces (found by prefix, with any process still running in them). BPF programs and
//! perf events go with the process's file descriptors; lab tc filters go with the lab's
//! devices. Programs of ours still loaded are reported, not guessed at.

use serde::Serialize;

use std::fmt::Write as _;

use crate::{lab, netfilter, netns, probe::bpf_stats};

#[derive(Debug, Default, Serialize)]
pub struct RepairReport {
    /// What was changed back.
    pub repaired: Vec<String>,
    /// What is still there and could not (or must not) be removed here.
    pub remaining: Vec<String>,
}

/// Namespaces to look into: this process's and every named one.
fn namespaces() -> Vec<Option<String>> {
    let mut all = vec![None];
    all.extend(
        std::fs::read_dir(netns::NETNS_DIR)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().into_string().ok())
            .map(Some),
    );
    all
}

/// Repairs what can be repaired; never stops at the first problem.
pub async fn repair() -> RepairReport {
    let mut report = RepairReport {
        repaired: bpf_stats::restore_after_crash(),
        ..RepairReport::default()
    };
    for ns in namespaces() {
        let label = ns.as_deref().unwrap_or(netfilter::OWN_NETNS).to_owned();
        match netfilter::remove_stale_counting_tables(ns.as_deref()) {
            Ok(removed) => report.repaired.extend(
                removed
                    .into_iter()
                    .map(|table| format!("{label}: nftables table {table} removed")),
            ),
            Err(e) => report
                .remaining
                .push(format!("{label}: counting tables not checked: {e}")),
        }
    }
    match lab::topology::down().await {
        Ok(names) => report.repaired.extend(
            names
                .into_iter()
                .map(|name| format!("lab namespace {name} removed")),
        ),
        Err(e) => report.remaining.push(format!("lab namespaces: {e}")),
    }
    report.remaining.extend(own_programs().into_iter().map(|(id, name)| {
        format!("BPF program {id} ({name}) is still loaded: `bpftool prog show id {id}` tells what holds it")
    }));
    report
}

/// cnitrace's programs loaded now (by name prefix), by id.
pub fn own_programs() -> Vec<(u32, String)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|info| {
            let name = info.name_as_str()?.to_owned();
            name.starts_with(cnitrace_common::program::PREFIX)
                .then_some((info.id(), name))
        })
        .collect()
}

pub fn render(report: &RepairReport) -> String {
    let mut out = String::new();
    if report.repaired.is_empty() && report.remaining.is_empty() {
        out.push_str("nothing to repair: no state left by cnitrace on this node\n");
    }
    for line in &report.repaired {
        let _ = writeln!(out, "repaired  {line}");
    }
    for line in &report.remaining {
        let _ = writeln!(out, "remaining {line}");
    }
    out
}
