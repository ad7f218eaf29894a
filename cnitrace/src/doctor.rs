//! `cnitrace doctor`: what this node can measure, and the reason for every "no".

use std::{fmt::Write as _, io::Read as _, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    components::{self, COMPONENTS},
    kallsyms::Kallsyms,
    probe::{clock, privileges, tracefs},
    window,
};

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Check {
    pub name: String,
    pub available: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ComponentSupport {
    pub name: String,
    pub available: bool,
    /// Kernel functions of this component found in /proc/kallsyms.
    pub functions: usize,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeReport {
    pub node: String,
    pub kernel: String,
    pub checks: Vec<Check>,
    pub backends: Vec<Check>,
    pub components: Vec<ComponentSupport>,
    /// The tracing backend's functions and how each would attach here (auto mode).
    pub traced_functions: Vec<crate::contract::TracedFunction>,
    /// The node's CNI configurations (/etc/cni/net.d), the one in use first.
    pub cni: Vec<crate::cni_config::ConfigSummary>,
}

fn check(name: &str, available: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_owned(),
        available,
        detail: detail.into(),
    }
}

/// The kernel's build configuration, from /proc/config.gz or /boot/config-RELEASE.
fn kernel_config(release: &str) -> Option<String> {
    if let Ok(file) = std::fs::File::open("/proc/config.gz") {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .is_ok()
        {
            return Some(text);
        }
    }
    std::fs::read_to_string(format!("/boot/config-{release}")).ok()
}

fn config_enabled(config: Option<&str>, option: &str) -> Option<bool> {
    let config = config?;
    let set = [format!("{option}=y"), format!("{option}=m")];
    Some(config.lines().any(|l| set.iter().any(|s| l == s)))
}

/// Gathers the report. Never fails: every problem becomes a check with its reason.
pub fn report() -> NodeReport {
    let kernel = window::kernel_release();
    let config = kernel_config(&kernel);
    let mut checks = Vec::new();

    let caps = privileges::check();
    checks.push(check(
        "privileges",
        caps.is_ok(),
        caps.as_ref().map_or_else(ToString::to_string, |()| {
            "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) held".to_owned()
        }),
    ));
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    checks.push(check(
        "btf",
        btf,
        if btf {
            "/sys/kernel/btf/vmlinux present"
        } else {
            "/sys/kernel/btf/vmlinux missing (CONFIG_DEBUG_INFO_BTF not set): fentry needs it"
        },
    ));
    let (pmu, pmu_detail) = clock::pmu_present();
    checks.push(check(
        "pmu",
        pmu,
        if pmu {
            pmu_detail
        } else {
            format!("{pmu_detail}; cpu-clock sampling with calibrated cycles/ns is used")
        },
    ));
    let tracefs_root = tracefs::find();
    checks.push(check(
        "tracefs",
        tracefs_root.is_some(),
        tracefs_root.as_ref().map_or_else(
            || {
                "not mounted; cnitrace mounts it at /sys/kernel/tracing when it starts (needs root)"
                    .to_owned()
            },
            |p| format!("mounted at {}", p.display()),
        ),
    ));
    let tracepoints = [
        "net/net_dev_start_xmit",
        "net/netif_receive_skb",
        "irq/softirq_entry",
        "irq/softirq_exit",
    ];
    let missing_tp: Vec<&str> = match &tracefs_root {
        Some(root) => tracepoints
            .iter()
            .copied()
            .filter(|tp| !root.join("events").join(tp).is_dir())
            .collect(),
        None => Vec::new(),
    };
    checks.push(check(
        "tracepoints",
        tracefs_root.is_some() && missing_tp.is_empty(),
        match (&tracefs_root, missing_tp.is_empty()) {
            (None, _) => "unknown until tracefs is mounted".to_owned(),
            (Some(_), true) => format!("{} present", tracepoints.join(", ")),
            (Some(_), false) => format!("missing: {}", missing_tp.join(", ")),
        },
    ));
    let kprobes_cfg = config_enabled(config.as_deref(), "CONFIG_KPROBES");
    let kprobe_events = tracefs_root
        .as_ref()
        .is_some_and(|r| r.join("kprobe_events").exists());
    checks.push(check(
        "kprobes",
        kprobe_events || kprobes_cfg == Some(true),
        match (kprobe_events, kprobes_cfg) {
            (true, _) => "kprobe_events present in tracefs".to_owned(),
            (false, Some(true)) => "CONFIG_KPROBES=y".to_owned(),
            (false, Some(false)) => "CONFIG_KPROBES is not set in this kernel's config".to_owned(),
            (false, None) => "no kprobe_events in tracefs and no kernel config to check".to_owned(),
        },
    ));
    let fentry = aya::sys::is_program_supported(aya::programs::ProgramType::Tracing);
    let fentry_ok = matches!(fentry, Ok(true));
    let kprobes_ok = crate::probe::trace::kprobes_available();
    checks.push(check(
        "fentry",
        matches!(fentry, Ok(true)),
        match fentry {
            Ok(true) => "BPF_PROG_TYPE_TRACING loads (BPF trampolines)".to_owned(),
            Ok(false) => {
                "BPF_PROG_TYPE_TRACING refused by this kernel (no BPF trampolines)".to_owned()
            }
            Err(e) => format!("probe load failed: {e}"),
        },
    ));
    let stats = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled");
    checks.push(check(
        "bpf_stats",
        stats.is_ok(),
        stats.map_or_else(
            |e| format!("/proc/sys/kernel/bpf_stats_enabled unreadable: {e}"),
            |v| {
                format!(
                    "kernel.bpf_stats_enabled={} (enabled only while a window needs it)",
                    v.trim()
                )
            },
        ),
    ));
    let max_rate =
        std::fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate").unwrap_or_default();
    checks.push(check(
        "perf_event_max_sample_rate",
        !max_rate.trim().is_empty(),
        format!("{} Hz", max_rate.trim()),
    ));

    let sampling_ok = caps.is_ok();
    let backends = vec![
        check(
            "sampling",
            sampling_ok,
            if sampling_ok {
                "perf_event stack sampling on every CPU".to_owned()
            } else {
                "needs the privileges above".to_owned()
            },
        ),
        check(
            "tracing",
            sampling_ok && (kprobes_ok || fentry_ok),
            match (kprobes_ok, fentry_ok) {
                (true, true) => {
                    "fentry/fexit for vmlinux functions, kprobes for modules' (--backend tracing)"
                }
                (true, false) => "kprobe/kretprobe on every traced function (--backend tracing)",
                (false, true) => {
                    "fentry/fexit for vmlinux functions only (no kprobes: module functions are not traced; auto keeps sampling)"
                }
                (false, false) => {
                    "neither kprobes nor BPF trampolines on this kernel: sampling only"
                }
            },
        ),
    ];

    let kallsyms = Kallsyms::load();
    let traced_functions = kallsyms.as_ref().map_or_else(
        |_| Vec::new(),
        |syms| crate::probe::trace::plan(syms, fentry_ok, kprobes_ok),
    );
    let components = match kallsyms {
        Ok(syms) => {
            let present: std::collections::HashSet<&str> =
                syms.names().map(components::base_name).collect();
            COMPONENTS
                .iter()
                .map(|c| {
                    let functions = syms
                        .names()
                        .filter(|n| {
                            components::classify(n)
                                .is_some_and(|cls| components::top_level(cls) == c.name)
                        })
                        .count();
                    let reason = components::unavailable_reason(c, |s| present.contains(s));
                    ComponentSupport {
                        name: c.name.to_owned(),
                        available: reason.is_none(),
                        functions,
                        reason,
                    }
                })
                .collect()
        }
        Err(e) => COMPONENTS
            .iter()
            .map(|c| ComponentSupport {
                name: c.name.to_owned(),
                available: false,
                functions: 0,
                reason: Some(e.to_string()),
            })
            .collect(),
    };

    NodeReport {
        node: window::node_name(),
        kernel,
        checks,
        backends,
        components,
        traced_functions,
        cni: crate::cni_config::summarize(Path::new(crate::cni_config::NET_D)),
    }
}

pub fn render(report: &NodeReport) -> String {
    let mut out = String::new();
    let mark = |ok: bool| if ok { "yes" } else { "no " };
    let _ = writeln!(out, "node {}  kernel {}", report.node, report.kernel);
    let _ = writeln!(out, "\nfacilities:");
    for c in &report.checks {
        let _ = writeln!(out, "  {} {:<27} {}", mark(c.available), c.name, c.detail);
    }
    let _ = writeln!(out, "\nbackends:");
    for c in &report.backends {
        let _ = writeln!(out, "  {} {:<27} {}", mark(c.available), c.name, c.detail);
    }
    let _ = writeln!(out, "\ncomponents:");
    for c in &report.components {
        let detail = c
            .reason
            .clone()
            .unwrap_or_else(|| format!("{} kernel functions", c.functions));
        let _ = writeln!(out, "  {} {:<27} {}", mark(c.available), c.name, detail);
    }
    if !report.traced_functions.is_empty() {
        let _ = writeln!(out, "\ntraced functions (tracing backend, auto attach):");
        for f in &report.traced_functions {
            let _ = writeln!(
                out,
                "  {:<12} {:<24} {:<13} {}",
                f.component,
                f.function,
                f.mode,
                f.note.as_deref().unwrap_or("")
            );
        }
    }
    let _ = writeln!(out, "\nCNI configuration ({}):", crate::cni_config::NET_D);
    if report.cni.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for conf in &report.cni {
        let used = if conf.in_use { "in use" } else { "unused" };
        if let Some(error) = &conf.error {
            let _ = writeln!(out, "  {} ({used}): cannot be read: {error}", conf.file);
            continue;
        }
        let _ = writeln!(
            out,
            "  {} ({used}): {} (cniVersion {}), plugins {}",
            conf.file,
            conf.name.as_deref().unwrap_or("?"),
            conf.cni_version.as_deref().unwrap_or("?"),
            conf.plugins.join(" -> ")
        );
        let _ = writeln!(
            out,
            "    components: {}",
            if conf.components.is_empty() {
                "none named by its plugins".to_owned()
            } else {
                conf.components.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "    lab: {}",
            conf.lab.as_deref().unwrap_or(
                "`cnitrace lab bench --cni-conf` can run it with this machine's plugins"
            )
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_config_options() {
        let cfg = "CONFIG_KPROBES=y\n# CONFIG_FOO is not set\nCONFIG_BAR=m\n";
        assert_eq!(config_enabled(Some(cfg), "CONFIG_KPROBES"), Some(true));
        assert_eq!(config_enabled(Some(cfg), "CONFIG_BAR"), Some(true));
        assert_eq!(config_enabled(Some(cfg), "CONFIG_FOO"), Some(false));
        assert_eq!(config_enabled(None, "CONFIG_FOO"), None);
    }
}
