//! Netfilter diagnostics for kernel engineers: the hook each sampled cycle was spent in
//! ([`hooks`]), the ruleset with its counters ([`ruleset`]), a temporary nftables table that
//! counts the packets entering each hook, and the merge of all three into the breakdown's
//! `netfilter` section.

pub mod hooks;
pub mod ruleset;

use std::{collections::BTreeMap, fmt::Write as _};

use hooks::{Family, Hook};
use ruleset::{Backend, Ruleset};

use crate::{
    contract::{ChainWalk, HookCost, NetfilterSection},
    error::Error,
    netns,
};

/// Prefix of the nftables tables cnitrace adds to count hook entries (one per family and
/// process: `cnitrace_entries_<pid>`, so two runs in one namespace keep to their own).
pub const COUNTING_TABLE: &str = "cnitrace_entries";

/// This process's counting table.
fn own_counting_table() -> String {
    format!("{COUNTING_TABLE}_{}", std::process::id())
}

/// Whether a counting table is left by a process that is gone (or by a version that did not
/// name its tables by process).
fn is_stale_counting_table(name: &str, pid_alive: impl Fn(u32) -> bool) -> bool {
    match name.strip_prefix(COUNTING_TABLE) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix('_')
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !pid_alive(pid)),
        None => false,
    }
}

/// Priority of the counting chains: before every standard table (raw is -300, conntrack
/// defragmentation -400), so they see every packet that enters the hook.
const COUNTING_PRIORITY: i32 = -1000;

/// What the `netns` field says for cnitrace's own namespace.
pub const OWN_NETNS: &str = "host";

fn nft_family(family: Family) -> Option<&'static str> {
    match family {
        Family::Ipv4 => Some("ip"),
        Family::Ipv6 => Some("ip6"),
        Family::Bridge => Some("bridge"),
        Family::Arp | Family::Unknown => None,
    }
}

fn label(netns: Option<&str>) -> String {
    netns.unwrap_or(OWN_NETNS).to_owned()
}

fn stdout_of(
    netns: Option<&str>,
    program: &str,
    args: &[&str],
    notes: &mut Vec<String>,
) -> Result<Option<String>, Error> {
    match netns::output_in(netns, program, args, None)? {
        None => Ok(None),
        Some(out) if out.status.success() => {
            Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
        }
        Some(out) => {
            notes.push(format!(
                "{} {program} failed: {}",
                label(netns),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            Ok(None)
        }
    }
}

/// Reads every iptables (nft and legacy backends, IPv4 and IPv6) and native nftables table of
/// a namespace, with counters. Missing tools are noted, not fatal.
pub fn read_ruleset(netns: Option<&str>) -> Result<(Ruleset, Vec<String>), Error> {
    let mut notes = Vec::new();
    let mut ruleset = Ruleset::default();
    for (family, nft_tool, legacy_tool, plain_tool) in [
        (
            Family::Ipv4,
            "iptables-nft-save",
            "iptables-legacy-save",
            "iptables-save",
        ),
        (
            Family::Ipv6,
            "ip6tables-nft-save",
            "ip6tables-legacy-save",
            "ip6tables-save",
        ),
    ] {
        let nft = stdout_of(netns, nft_tool, &["-c"], &mut notes)?;
        let legacy = stdout_of(netns, legacy_tool, &["-c"], &mut notes)?;
        let outputs = if nft.is_none() && legacy.is_none() {
            // Distributions without the -nft/-legacy names: the header tells the backend.
            stdout_of(netns, plain_tool, &["-c"], &mut notes)?
                .map(|text| {
                    let backend = if text.contains("(nf_tables)") {
                        Backend::IptablesNft
                    } else {
                        Backend::IptablesLegacy
                    };
                    vec![(backend, text)]
                })
                .unwrap_or_default()
        } else {
            [
                (Backend::IptablesNft, nft),
                (Backend::IptablesLegacy, legacy),
            ]
            .into_iter()
            .filter_map(|(backend, text)| text.map(|t| (backend, t)))
            .collect()
        };
        if outputs.is_empty() {
            notes.push(format!("{}: no {plain_tool} installed", label(netns)));
        }
        for (backend, text) in outputs {
            ruleset
                .tables
                .extend(ruleset::parse_iptables_save(&text, backend, family)?);
        }
    }
    let iptables_nft: Vec<(Family, String)> = ruleset
        .tables
        .iter()
        .filter(|t| t.backend == Backend::IptablesNft)
        .map(|t| (t.family, t.name.clone()))
        .collect();
    match stdout_of(netns, "nft", &["-j", "list", "ruleset"], &mut notes)? {
        Some(json) => ruleset
            .tables
            .extend(ruleset::parse_nft_json(&json, &iptables_nft)?),
        None => notes.push(format!(
            "{}: native nftables tables not read (no nft)",
            label(netns)
        )),
    }
    Ok((ruleset, notes))
}

/// Temporary nftables tables, one chain per hook with a lone `counter` at a priority before
/// every standard table: the packets that entered each hook, which nft-based iptables cannot
/// tell (its base chains keep no policy counter). Removed on drop; each packet pays one
/// near-empty chain per hook while they exist.
#[derive(Debug)]
pub struct EntryCounter {
    netns: Option<String>,
    families: Vec<Family>,
}

impl EntryCounter {
    pub fn install(netns: Option<&str>, families: &[Family]) -> Result<Self, Error> {
        remove_stale_counting_tables(netns)?;
        let table = own_counting_table();
        let mut script = String::new();
        let families: Vec<Family> = families
            .iter()
            .copied()
            .filter(|f| nft_family(*f).is_some())
            .collect();
        for &family in &families {
            let nft = nft_family(family).expect("filtered");
            let _ = writeln!(script, "table {nft} {table} {{");
            for hook in Hook::ALL {
                let name = hook.nft_name();
                let _ = writeln!(
                    script,
                    "  chain {name} {{ type filter hook {name} priority {COUNTING_PRIORITY}; \
                     policy accept; counter; }}"
                );
            }
            script.push_str("}\n");
        }
        let counter = Self {
            netns: netns.map(str::to_owned),
            families,
        };
        if counter.families.is_empty() {
            return Ok(counter);
        }
        match netns::output_in(netns, "nft", &["-f", "-"], Some(&script))? {
            Some(out) if out.status.success() => Ok(counter),
            Some(out) => Err(Error::InvalidArgument(format!(
                "cannot add the hook-entry counting table in {}: {}",
                label(netns),
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
            None => Err(Error::InvalidArgument(
                "counting hook entries needs the `nft` tool (apt install nftables)".to_owned(),
            )),
        }
    }

    /// Packets that entered each hook since the tables were added.
    pub fn read(&self) -> Result<BTreeMap<(Family, Hook), u64>, Error> {
        let mut out = BTreeMap::new();
        for &family in &self.families {
            let nft = nft_family(family).expect("filtered");
            let mut notes = Vec::new();
            let json = stdout_of(
                self.netns.as_deref(),
                "nft",
                &["-j", "list", "table", nft, &own_counting_table()],
                &mut notes,
            )?
            .ok_or_else(|| {
                Error::InvalidArgument(format!("the counting table is gone: {}", notes.join("; ")))
            })?;
            let value: serde_json::Value = serde_json::from_str(&json)
                .map_err(|e| Error::InvalidArgument(format!("nft -j output: {e}")))?;
            for item in value["nftables"].as_array().into_iter().flatten() {
                let Some(rule) = item.get("rule") else {
                    continue;
                };
                let hook = rule["chain"].as_str().and_then(Hook::parse);
                let packets = rule["expr"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|e| e.get("counter")?.get("packets")?.as_u64());
                if let (Some(hook), Some(packets)) = (hook, packets) {
                    out.insert((family, hook), packets);
                }
            }
        }
        Ok(out)
    }
}

impl Drop for EntryCounter {
    fn drop(&mut self) {
        let table = own_counting_table();
        for family in &self.families {
            let nft = nft_family(*family).expect("filtered");
            if let Err(e) = netns::output_in(
                self.netns.as_deref(),
                "nft",
                &["delete", "table", nft, &table],
                None,
            ) {
                tracing::warn!("removing the hook-entry counting table {nft} {table}: {e}");
            }
        }
    }
}

/// Counting tables of a namespace, as (nft family, table name), from `nft list tables`.
fn counting_tables(netns: Option<&str>) -> Result<Vec<(String, String)>, Error> {
    let Some(out) = netns::output_in(netns, "nft", &["list", "tables"], None)? else {
        return Ok(Vec::new());
    };
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("table"), Some(family), Some(name)) if name.starts_with(COUNTING_TABLE) => {
                    Some((family.to_owned(), name.to_owned()))
                }
                _ => None,
            }
        })
        .collect())
}

/// Deletes the counting tables in a namespace that no running process owns (left by a
/// crash or `kill -9`); returns what it deleted, as `family name`.
pub fn remove_stale_counting_tables(netns: Option<&str>) -> Result<Vec<String>, Error> {
    let mut removed = Vec::new();
    for (family, name) in counting_tables(netns)? {
        if is_stale_counting_table(&name, netns::pid_alive) {
            netns::output_in(netns, "nft", &["delete", "table", &family, &name], None)?;
            removed.push(format!("{family} {name}"));
        }
    }
    Ok(removed)
}

/// What to read around a window.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Read the rulesets (namespaces: this one plus these named ones).
    pub read_rules: bool,
    /// Add the counting tables for the window.
    pub count_entries: bool,
    pub namespaces: Vec<String>,
}

struct NamespaceWindow {
    netns: Option<String>,
    before: Ruleset,
    counter: Option<EntryCounter>,
    entries_before: BTreeMap<(Family, Hook), u64>,
}

/// The rulesets (and hook-entry counters) at the start of a window.
pub struct RulesetWindow {
    namespaces: Vec<NamespaceWindow>,
    notes: Vec<String>,
}

impl RulesetWindow {
    /// Reads the rulesets and adds the counting tables. Nothing happens without `read_rules`.
    pub fn begin(options: &Options) -> Result<Self, Error> {
        let mut window = Self {
            namespaces: Vec::new(),
            notes: Vec::new(),
        };
        if !options.read_rules {
            return Ok(window);
        }
        let names =
            std::iter::once(None).chain(options.namespaces.iter().map(|n| Some(n.as_str())));
        for netns in names {
            let (before, notes) = read_ruleset(netns)?;
            window.notes.extend(notes);
            let counter = if options.count_entries {
                let mut families: Vec<Family> = before.tables.iter().map(|t| t.family).collect();
                families.sort_unstable();
                families.dedup();
                Some(EntryCounter::install(netns, &families)?)
            } else {
                None
            };
            let entries_before = counter
                .as_ref()
                .map(EntryCounter::read)
                .transpose()?
                .unwrap_or_default();
            window.namespaces.push(NamespaceWindow {
                netns: netns.map(str::to_owned),
                before,
                counter,
                entries_before,
            });
        }
        Ok(window)
    }

    /// Reads everything again, removes the counting tables, and walks the differences.
    pub fn end(self) -> Result<(Vec<ChainWalk>, Vec<String>), Error> {
        let mut notes = self.notes;
        let mut walks = Vec::new();
        for ns in self.namespaces {
            let netns = ns.netns.as_deref();
            let entries_after = ns
                .counter
                .as_ref()
                .map(EntryCounter::read)
                .transpose()?
                .unwrap_or_default();
            drop(ns.counter);
            let (after, more) = read_ruleset(netns)?;
            notes.extend(more);
            let (delta, changed) = after.since(&ns.before);
            if changed {
                notes.push(format!(
                    "{}: the ruleset changed during the window; counts of changed rules are \
                     unknown",
                    label(netns)
                ));
            }
            let entries =
                |family: Family, hook: Hook| {
                    let now = entries_after.get(&(family, hook))?;
                    Some(now.saturating_sub(
                        ns.entries_before.get(&(family, hook)).copied().unwrap_or(0),
                    ))
                };
            walks.extend(ruleset::walk(&label(netns), &delta, changed, &entries));
        }
        Ok((walks, notes))
    }
}

/// Adds the walked chains to the per-hook costs: chains, rules, packets entering the hook and
/// rules evaluated per packet, and the cycles of one rule evaluation.
pub fn apply(section: &mut NetfilterSection, walks: Vec<ChainWalk>, notes: Vec<String>) {
    for walk in &walks {
        if walk.rules == 0 && walk.packets.unwrap_or(0) == 0 {
            continue;
        }
        let hook = HookCost::entry(&mut section.hooks, &walk.family, &walk.hook);
        hook.chains += walk.chain_count;
        hook.rules += walk.rules;
        // Tables at one hook see the same packets: entries are the largest count, evaluations
        // add up.
        if let Some(packets) = walk.packets {
            hook.packets = Some(hook.packets.map_or(packets, |p| p.max(packets)));
        }
        if let Some(evaluated) = walk.rules_evaluated {
            hook.rules_evaluated = Some(hook.rules_evaluated.unwrap_or(0) + evaluated);
        }
    }
    for hook in &mut section.hooks {
        if let (Some(packets), Some(evaluated)) = (hook.packets, hook.rules_evaluated) {
            hook.rules_traversed_per_packet =
                (packets > 0).then(|| evaluated as f64 / packets as f64);
            hook.cycles_per_rule_evaluated =
                (evaluated > 0).then(|| hook.rule_cycles as f64 / evaluated as f64);
        }
    }
    section.chains = walks;
    section.ruleset_notes = notes;
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_tables_of_dead_processes_are_stale() {
        let alive = |pid: u32| pid == 42;
        assert!(super::is_stale_counting_table("cnitrace_entries", alive));
        assert!(super::is_stale_counting_table("cnitrace_entries_7", alive));
        assert!(!super::is_stale_counting_table(
            "cnitrace_entries_42",
            alive
        ));
        assert!(!super::is_stale_counting_table("cnitrace_entries_x", alive));
        assert!(!super::is_stale_counting_table("filter", alive));
    }

    use super::*;

    fn walk(
        family: &str,
        hook: &str,
        table: &str,
        rules: u32,
        packets: u64,
        evaluated: u64,
    ) -> ChainWalk {
        ChainWalk {
            netns: OWN_NETNS.to_owned(),
            backend: "iptables-nft".to_owned(),
            family: family.to_owned(),
            hook: hook.to_owned(),
            table: table.to_owned(),
            chains: vec![hook.to_owned()],
            chain_count: 1,
            rules,
            packets: Some(packets),
            rules_evaluated: Some(evaluated),
            packets_source: "counted at the hook by cnitrace".to_owned(),
            approximate: false,
        }
    }

    #[test]
    fn apply_merges_tables_of_a_hook_and_adds_hooks_without_samples() {
        let mut forward = HookCost::empty("ipv4", "FORWARD");
        forward.cycles = 10_000;
        forward.rule_cycles = 8_000;
        let mut section = NetfilterSection {
            hooks: vec![forward],
            ..NetfilterSection::default()
        };
        apply(
            &mut section,
            vec![
                walk("ipv4", "FORWARD", "filter", 100, 40, 4000),
                walk("ipv4", "FORWARD", "mangle", 2, 40, 80),
                walk("ipv4", "INPUT", "filter", 3, 0, 0),
                walk("ipv4", "OUTPUT", "filter", 0, 0, 0),
            ],
            vec!["note".to_owned()],
        );
        let forward = &section.hooks[0];
        assert_eq!((forward.chains, forward.rules), (2, 102));
        assert_eq!(forward.packets, Some(40));
        assert_eq!(forward.rules_traversed_per_packet, Some(102.0));
        assert_eq!(forward.cycles_per_rule_evaluated, Some(8000.0 / 4080.0));
        assert_eq!(
            section.hooks.len(),
            2,
            "INPUT has rules; OUTPUT has nothing"
        );
        assert_eq!(section.hooks[1].rules_traversed_per_packet, None);
        assert_eq!(section.chains.len(), 4);
        assert_eq!(section.ruleset_notes, vec!["note"]);
    }
}
