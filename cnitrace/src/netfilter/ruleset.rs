//! The ruleset as packets see it: tables, chains and rules with their counters, parsed from
//! `iptables-save -c` (nft and legacy backends) and `nft -j list ruleset` (native nftables),
//! and the walk that turns counter differences into rules evaluated per packet.
//!
//! Counters count matches only, so evaluations are derived: every packet entering a chain
//! evaluates its rules in order until one ends its walk (ACCEPT, DROP, RETURN, a goto, or a
//! jump into a chain that does not come back); a jump's packets walk the called chain and,
//! if it returns them, go on.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::contract::ChainWalk;

use super::hooks::{Family, Hook};
use crate::error::Error;

/// Which tool manages a table; it decides whether base-chain policy counters exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// iptables over nf_tables: rule counters yes, base-chain policy counters no.
    IptablesNft,
    /// x_tables: rule and policy counters.
    IptablesLegacy,
    /// Native nftables: counters only on rules that have a `counter` statement.
    Nft,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::IptablesNft => "iptables-nft",
            Backend::IptablesLegacy => "iptables-legacy",
            Backend::Nft => "nft",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Ends the packet's walk of this hook (ACCEPT, DROP, REJECT, DNAT, ...).
    Terminal,
    /// Back to the calling chain (or the policy in a base chain).
    Return,
    Jump(String),
    Goto(String),
    /// Does not end the walk (LOG, MARK, a rule without a verdict, ...).
    Continue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The rule as the tool printed it (counters stripped), to match rules across snapshots.
    pub text: String,
    /// Packets that matched; `None` when the rule has no counter.
    pub matches: Option<u64>,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// Set for base chains.
    pub hook: Option<Hook>,
    /// Packets that reached the policy (legacy iptables only).
    pub policy_packets: Option<u64>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub backend: Backend,
    pub family: Family,
    pub name: String,
    pub chains: Vec<Chain>,
}

#[cfg(test)]
impl Table {
    fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// Every table of one network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub tables: Vec<Table>,
}

/// Targets that end a packet's walk through the hook.
const TERMINAL_TARGETS: &[&str] = &[
    "ACCEPT",
    "DROP",
    "REJECT",
    "QUEUE",
    "NFQUEUE",
    "DNAT",
    "SNAT",
    "MASQUERADE",
    "REDIRECT",
    "TPROXY",
    "NETMAP",
    "SYNPROXY",
];

/// Splits an iptables-save rule line into words, honouring double quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let (mut quoted, mut escaped, mut any) = (false, false, false);
    for c in line.chars() {
        if escaped {
            current.push(c);
            escaped = false;
        } else if c == '\\' && quoted {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
            any = true;
        } else if c.is_whitespace() && !quoted {
            if any || !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            any = false;
        } else {
            current.push(c);
        }
    }
    if any || !current.is_empty() {
        out.push(current);
    }
    out
}

/// Parses `iptables-save -c` (or `ip6tables-save -c`) output.
pub fn parse_iptables_save(
    text: &str,
    backend: Backend,
    family: Family,
) -> Result<Vec<Table>, Error> {
    let mut tables: Vec<Table> = Vec::new();
    // The current table's chains by name: kube-proxy-sized rulesets have tens of thousands.
    let mut chain_index: HashMap<String, usize> = HashMap::new();
    let bad = |n: usize, what: &str| {
        Error::InvalidArgument(format!("iptables-save output line {}: {what}", n + 1))
    };
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            chain_index.clear();
            tables.push(Table {
                backend,
                family,
                name: name.to_owned(),
                chains: Vec::new(),
            });
            continue;
        }
        let table = tables
            .last_mut()
            .ok_or_else(|| bad(n, "rule before any *table"))?;
        if let Some(decl) = line.strip_prefix(':') {
            // :NAME POLICY [packets:bytes]
            let mut parts = decl.split_whitespace();
            let name = parts.next().ok_or_else(|| bad(n, "chain without a name"))?;
            let policy = parts.next().unwrap_or("-");
            let packets = parts
                .next()
                .and_then(|c| c.trim_start_matches('[').split(':').next())
                .and_then(|p| p.parse::<u64>().ok());
            let base = policy != "-";
            chain_index.insert(name.to_owned(), table.chains.len());
            table.chains.push(Chain {
                name: name.to_owned(),
                hook: if base { Hook::parse(name) } else { None },
                policy_packets: if base && backend == Backend::IptablesLegacy {
                    packets
                } else {
                    None
                },
                rules: Vec::new(),
            });
            continue;
        }
        // [packets:bytes] -A CHAIN ...
        let (matches, rest) = match line.strip_prefix('[') {
            Some(counted) => {
                let (counters, rest) = counted
                    .split_once(']')
                    .ok_or_else(|| bad(n, "unterminated counters"))?;
                let packets = counters
                    .split(':')
                    .next()
                    .and_then(|p| p.parse::<u64>().ok())
                    .ok_or_else(|| bad(n, "bad counters"))?;
                (Some(packets), rest.trim())
            }
            None => (None, line),
        };
        let w = words(rest);
        if w.len() < 2 || (w[0] != "-A" && w[0] != "--append") {
            return Err(bad(n, "expected `-A CHAIN`"));
        }
        let chain_at = *chain_index
            .get(&w[1])
            .ok_or_else(|| bad(n, &format!("rule in undeclared chain {}", w[1])))?;
        let mut target = Target::Continue;
        for pair in w.windows(2) {
            match pair[0].as_str() {
                "-j" | "--jump" => target = Target::Jump(pair[1].clone()),
                "-g" | "--goto" => target = Target::Goto(pair[1].clone()),
                _ => {}
            }
        }
        table.chains[chain_at].rules.push(Rule {
            text: rest.to_owned(),
            matches,
            target,
        });
    }
    // Jumps to names that are not chains of the table are targets (ACCEPT, LOG, DNAT, ...).
    for table in &mut tables {
        let chains: HashSet<String> = table.chains.iter().map(|c| c.name.clone()).collect();
        for chain in &mut table.chains {
            for rule in &mut chain.rules {
                rule.target = match std::mem::replace(&mut rule.target, Target::Continue) {
                    Target::Jump(name) | Target::Goto(name) if !chains.contains(&name) => {
                        if name == "RETURN" {
                            Target::Return
                        } else if TERMINAL_TARGETS.contains(&name.as_str()) {
                            Target::Terminal
                        } else {
                            Target::Continue
                        }
                    }
                    other => other,
                };
            }
        }
    }
    Ok(tables)
}

/// Parses `nft -j list ruleset`, skipping tables listed in `skip` ((family, name) pairs already
/// read through iptables-save) and cnitrace's own counting tables.
pub fn parse_nft_json(text: &str, skip: &[(Family, String)]) -> Result<Vec<Table>, Error> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::InvalidArgument(format!("nft -j output is not JSON: {e}")))?;
    let items = value
        .get("nftables")
        .and_then(|v| v.as_array())
        .ok_or_else(|| Error::InvalidArgument("nft -j output has no `nftables` array".into()))?;
    let family_of = |f: &str| match f {
        "ip" | "inet" => Some(Family::Ipv4),
        "ip6" => Some(Family::Ipv6),
        "bridge" => Some(Family::Bridge),
        "arp" => Some(Family::Arp),
        _ => None,
    };
    let mut tables: Vec<Table> = Vec::new();
    // Tables by (nft family, name), chains by (table index, name): rules name both.
    let mut table_index: HashMap<(String, String), usize> = HashMap::new();
    let mut chain_index: HashMap<(usize, String), usize> = HashMap::new();
    for item in items {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let text_of = |k: &str| body.get(k).and_then(|v| v.as_str()).unwrap_or_default();
        let nft_family = text_of("family");
        let Some(family) = family_of(nft_family) else {
            continue;
        };
        match kind.as_str() {
            "table" => {
                let name = text_of("name");
                let skipped = name.starts_with(super::COUNTING_TABLE)
                    || skip
                        .iter()
                        .any(|(f, n)| *f == family && n == name && nft_family != "inet");
                if !skipped {
                    table_index.insert((nft_family.to_owned(), name.to_owned()), tables.len());
                    tables.push(Table {
                        backend: Backend::Nft,
                        family,
                        name: name.to_owned(),
                        chains: Vec::new(),
                    });
                }
            }
            "chain" => {
                let key = (nft_family.to_owned(), text_of("table").to_owned());
                if let Some(&at) = table_index.get(&key) {
                    let table = &mut tables[at];
                    chain_index.insert((at, text_of("name").to_owned()), table.chains.len());
                    table.chains.push(Chain {
                        name: text_of("name").to_owned(),
                        hook: body
                            .get("hook")
                            .and_then(|h| h.as_str())
                            .and_then(Hook::parse),
                        policy_packets: None,
                        rules: Vec::new(),
                    });
                }
            }
            "rule" => {
                let key = (nft_family.to_owned(), text_of("table").to_owned());
                let Some(&at) = table_index.get(&key) else {
                    continue;
                };
                let Some(&chain_at) = chain_index.get(&(at, text_of("chain").to_owned())) else {
                    continue;
                };
                let chain = &mut tables[at].chains[chain_at];
                let exprs = body.get("expr").and_then(|e| e.as_array());
                let mut matches = None;
                let mut target = Target::Continue;
                for expr in exprs.into_iter().flatten() {
                    let Some((statement, args)) = expr.as_object().and_then(|o| o.iter().next())
                    else {
                        continue;
                    };
                    match statement.as_str() {
                        "counter" => {
                            matches = args.get("packets").and_then(serde_json::Value::as_u64);
                        }
                        "accept" | "drop" | "reject" | "queue" | "dnat" | "snat" | "masquerade"
                        | "redirect" | "tproxy" | "synproxy" => {
                            target = Target::Terminal;
                        }
                        "return" => target = Target::Return,
                        "jump" | "goto" => {
                            let name = args
                                .get("target")
                                .and_then(|t| t.as_str())
                                .unwrap_or_default()
                                .to_owned();
                            target = if statement == "jump" {
                                Target::Jump(name)
                            } else {
                                Target::Goto(name)
                            };
                        }
                        _ => {}
                    }
                }
                // Counters in the rule text would make every snapshot's text differ.
                let without_counters: Vec<&serde_json::Value> = exprs
                    .into_iter()
                    .flatten()
                    .filter(|e| e.get("counter").is_none())
                    .collect();
                chain.rules.push(Rule {
                    text: serde_json::to_string(&without_counters).unwrap_or_default(),
                    matches,
                    target,
                });
            }
            _ => {}
        }
    }
    Ok(tables)
}

impl Ruleset {
    /// Counters of `self` minus those of `earlier`, rule by rule. Rules that are not in the
    /// same place with the same text in both (the ruleset changed in the window) get `None`.
    #[must_use]
    pub fn since(&self, earlier: &Ruleset) -> (Ruleset, bool) {
        let mut changed = false;
        let mut out = self.clone();
        for table in &mut out.tables {
            let before = earlier.tables.iter().find(|t| {
                t.backend == table.backend && t.family == table.family && t.name == table.name
            });
            let before_chains: HashMap<&str, &Chain> = before
                .into_iter()
                .flat_map(|t| &t.chains)
                .map(|c| (c.name.as_str(), c))
                .collect();
            for chain in &mut table.chains {
                let old = before_chains.get(chain.name.as_str()).copied();
                chain.policy_packets =
                    match (chain.policy_packets, old.and_then(|c| c.policy_packets)) {
                        (Some(now), Some(then)) => Some(now.saturating_sub(then)),
                        (now, _) => now,
                    };
                for (index, rule) in chain.rules.iter_mut().enumerate() {
                    let previous = old
                        .and_then(|c| c.rules.get(index))
                        .filter(|r| r.text == rule.text);
                    if previous.is_none() {
                        changed = true;
                    }
                    rule.matches = match (rule.matches, previous.and_then(|r| r.matches)) {
                        (Some(now), Some(then)) => Some(now.saturating_sub(then)),
                        _ => None,
                    };
                }
                if old.is_none_or(|c| c.rules.len() != chain.rules.len()) {
                    changed = true;
                }
            }
        }
        (out, changed)
    }
}

/// Chain names listed per hook; kube-proxy's nat PREROUTING reaches one chain per Service
/// and endpoint, tens of thousands, which only the count then reports.
pub const LISTED_CHAINS: usize = 64;

/// Totals of one chain for all packets that entered it.
#[derive(Debug, Clone, Copy, Default)]
struct ChainTotals {
    evaluated: f64,
    /// Packets that came back to the caller (fell off the end or RETURNed).
    returned: f64,
    /// Packets whose walk of the hook ended inside (terminal verdicts, gotos not returning).
    ended: f64,
}

/// A chain being walked: how far, with how many packets, and what they added up to so far.
struct Frame<'a> {
    chain: &'a Chain,
    /// Index of the rule evaluated next.
    next: usize,
    /// Packets still walking the chain.
    reach: f64,
    totals: ChainTotals,
    /// The jump or goto at `next`, kept while the chain it calls is walked.
    call: Call,
}

/// A jump or goto's share of its called chain: the chain's totals are for every packet that
/// entered it, `entered`, of which this rule sent `matched`.
#[derive(Debug, Clone, Copy, Default)]
struct Call {
    matched: f64,
    entered: f64,
    jump: bool,
}

/// What evaluating a frame's next rule led to.
enum Step<'a> {
    /// On to the rule after it.
    Next,
    /// The rule calls this chain, which must be walked before the rule can be finished.
    Enter(&'a Chain),
    /// The chain has no rules left.
    Done,
}

/// The totals of a chain a rule calls, or the chain when they are not known yet.
enum Called<'a> {
    Known(ChainTotals),
    Unwalked(&'a Chain),
}

impl<'a> Frame<'a> {
    fn new(chain: &'a Chain, entering: f64) -> Self {
        Self {
            chain,
            next: 0,
            reach: entering,
            totals: ChainTotals::default(),
            call: Call::default(),
        }
    }

    fn advance(&mut self) {
        self.reach = self.reach.max(0.0);
        self.next += 1;
    }

    /// Finishes the pending call with the called chain's totals.
    fn returned_from(&mut self, called: ChainTotals) {
        let Call {
            matched,
            entered,
            jump,
        } = self.call;
        let fraction = if entered > 0.0 {
            matched / entered
        } else {
            0.0
        };
        self.totals.evaluated += called.evaluated * fraction;
        let back = called.returned * fraction;
        self.reach -= matched;
        if jump {
            self.reach += back;
        } else {
            self.totals.returned += back;
        }
        self.totals.ended += called.ended * fraction;
        self.advance();
    }
}

struct Walker<'a> {
    /// The table's chains by name.
    chains: HashMap<&'a str, &'a Chain>,
    /// Packets entering each user chain: the matches of the rules that jump or go to it.
    entries: HashMap<&'a str, f64>,
    memo: HashMap<&'a str, ChainTotals>,
    approximate: bool,
}

impl<'a> Walker<'a> {
    fn new(table: &'a Table) -> Self {
        let mut entries: HashMap<&str, f64> = HashMap::new();
        let mut approximate = false;
        for chain in &table.chains {
            for rule in &chain.rules {
                approximate |= rule.matches.is_none();
                if let Target::Jump(name) | Target::Goto(name) = &rule.target {
                    *entries.entry(name.as_str()).or_default() += rule.matches.unwrap_or(0) as f64;
                }
            }
        }
        Self {
            chains: table.chains.iter().map(|c| (c.name.as_str(), c)).collect(),
            entries,
            memo: HashMap::new(),
            approximate,
        }
    }

    /// Walks `chain` with `entering` packets. Called chains wait on a stack of frames on the
    /// heap, not on the thread's stack: x_tables sets no nesting limit, and a tenant with
    /// NET_ADMIN in its netns nests thousands of chains in a few hundred KB. `path` holds the
    /// user chains being walked, to end loops (iptables refuses them; a malformed ruleset
    /// must not hang the profiler). Each chain is walked once (`memo`), so no depth cap.
    fn walk(&mut self, chain: &'a Chain, entering: f64) -> ChainTotals {
        let mut current = Frame::new(chain, entering);
        let mut callers: Vec<Frame<'a>> = Vec::new();
        let mut path: HashSet<&'a str> = HashSet::new();
        loop {
            match self.step(&mut current, &path) {
                Step::Next => {}
                Step::Enter(called) => {
                    path.insert(called.name.as_str());
                    let entering = self.entering(&called.name);
                    callers.push(std::mem::replace(
                        &mut current,
                        Frame::new(called, entering),
                    ));
                }
                Step::Done => {
                    let Some(caller) = callers.pop() else {
                        return current.totals;
                    };
                    let done = std::mem::replace(&mut current, caller);
                    path.remove(done.chain.name.as_str());
                    self.memo.insert(&done.chain.name, done.totals);
                    current.returned_from(done.totals);
                }
            }
        }
    }

    /// Evaluates `frame`'s next rule, up to the call when it calls a chain not walked yet.
    fn step(&mut self, frame: &mut Frame<'a>, path: &HashSet<&str>) -> Step<'a> {
        let Some(rule) = frame.chain.rules.get(frame.next) else {
            frame.totals.returned += frame.reach;
            return Step::Done;
        };
        frame.totals.evaluated += frame.reach;
        let matched = (rule.matches.unwrap_or(0) as f64).min(frame.reach);
        match &rule.target {
            Target::Terminal => {
                frame.reach -= matched;
                frame.totals.ended += matched;
            }
            Target::Return => {
                frame.reach -= matched;
                frame.totals.returned += matched;
            }
            Target::Jump(name) | Target::Goto(name) => {
                frame.call = Call {
                    matched,
                    entered: self.entering(name),
                    jump: matches!(rule.target, Target::Jump(_)),
                };
                return match self.called(name, path) {
                    Called::Known(totals) => {
                        frame.returned_from(totals);
                        Step::Next
                    }
                    Called::Unwalked(chain) => Step::Enter(chain),
                };
            }
            Target::Continue => {}
        }
        frame.advance();
        Step::Next
    }

    fn entering(&self, name: &str) -> f64 {
        self.entries.get(name).copied().unwrap_or(0.0)
    }

    /// A called chain's totals when they need no walk: walked already, not a chain of the
    /// table, or a loop back into a chain on `path` (counted as nothing: a bound).
    fn called(&mut self, name: &str, path: &HashSet<&str>) -> Called<'a> {
        if let Some(totals) = self.memo.get(name) {
            return Called::Known(*totals);
        }
        let Some(&chain) = self.chains.get(name) else {
            return Called::Known(ChainTotals::default());
        };
        if path.contains(name) {
            self.approximate = true;
            return Called::Known(ChainTotals::default());
        }
        Called::Unwalked(chain)
    }

    /// The chain and every user chain reachable from it (names of the first
    /// [`LISTED_CHAINS`], base chain first), how many there are, and their rule count.
    fn reachable(&self, chain: &'a Chain) -> (Vec<String>, u32, u32) {
        let mut seen: HashSet<&str> = HashSet::from([chain.name.as_str()]);
        let mut listed = vec![chain.name.clone()];
        let mut queue = vec![chain];
        let mut rules = 0usize;
        while let Some(c) = queue.pop() {
            rules += c.rules.len();
            for rule in &c.rules {
                if let Target::Jump(name) | Target::Goto(name) = &rule.target
                    && let Some(&called) = self.chains.get(name.as_str())
                    && seen.insert(called.name.as_str())
                {
                    if listed.len() < LISTED_CHAINS {
                        listed.push(called.name.clone());
                    }
                    queue.push(called);
                }
            }
        }
        (
            listed,
            u32::try_from(seen.len()).unwrap_or(u32::MAX),
            u32::try_from(rules).unwrap_or(u32::MAX),
        )
    }
}

/// Walks every base chain of a window's ruleset (counter differences). `hook_entries` gives
/// the packets that entered a hook when they were counted (cnitrace's counting table);
/// otherwise legacy iptables' policy counters give them, and nft-based tables cannot tell.
pub fn walk(
    netns: &str,
    ruleset: &Ruleset,
    changed: bool,
    hook_entries: &dyn Fn(Family, Hook) -> Option<u64>,
) -> Vec<ChainWalk> {
    let mut out = Vec::new();
    for table in &ruleset.tables {
        let mut walker = Walker::new(table);
        for chain in table.chains.iter().filter(|c| c.hook.is_some()) {
            let hook = chain.hook.expect("base chain");
            let (chains, chain_count, rules) = walker.reachable(chain);
            let counted = hook_entries(table.family, hook);
            let (packets, source) = match (counted, chain.policy_packets) {
                (Some(n), _) => (Some(n as f64), "counted at the hook by cnitrace".to_owned()),
                (None, Some(policy)) => {
                    // Entries = packets that reached the policy + packets whose walk ended.
                    let ended = walker.walk(chain, f64::INFINITY).ended;
                    (
                        Some(policy as f64 + ended),
                        "policy and rule counters".to_owned(),
                    )
                }
                (None, None) => (
                    None,
                    format!(
                        "unknown: {} keeps no base-chain counter (`cnitrace netfilter` counts \
                         hook entries)",
                        table.backend.as_str()
                    ),
                ),
            };
            let evaluated = packets.map(|p| walker.walk(chain, p).evaluated);
            out.push(ChainWalk {
                netns: netns.to_owned(),
                backend: table.backend.as_str().to_owned(),
                family: table.family.as_str().to_owned(),
                hook: hook.as_str().to_owned(),
                table: table.name.clone(),
                chains,
                chain_count,
                rules,
                packets: packets.map(|p| p.round() as u64),
                rules_evaluated: evaluated.map(|e| e.round() as u64),
                packets_source: source,
                approximate: walker.approximate || changed,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
# Generated by iptables-save v1.8.9 on Sun Nov 22 13:21:48 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [700:1000]
:OUTPUT ACCEPT [0:0]
:CUST - [0:0]
[0:0] -A FORWARD -s 10.255.0.1/32 -m comment --comment \"never \\\"matches\\\"\" -j DROP
[0:0] -A FORWARD -s 10.255.0.2/32 -j DROP
[1000:5] -A FORWARD -j CUST
[100:0] -A FORWARD -p udp -j ACCEPT
[0:0] -A FORWARD -j LOG
[600:0] -A CUST -p tcp -j RETURN
[0:0] -A CUST -s 10.255.0.3/32 -j DROP
[400:0] -A CUST -j MARK --set-mark 1
[200:0] -A CUST -p icmp -j ACCEPT
COMMIT
";

    fn table() -> Table {
        parse_iptables_save(SAVE, Backend::IptablesLegacy, Family::Ipv4)
            .unwrap()
            .remove(0)
    }

    #[test]
    fn parses_chains_rules_counters_and_targets() {
        let t = table();
        assert_eq!(t.name, "filter");
        let forward = t.chain("FORWARD").unwrap();
        assert_eq!(forward.hook, Some(Hook::Forward));
        assert_eq!(forward.policy_packets, Some(700));
        assert_eq!(forward.rules.len(), 5);
        assert_eq!(forward.rules[0].target, Target::Terminal);
        assert!(forward.rules[0].text.contains("comment"));
        assert_eq!(forward.rules[2].target, Target::Jump("CUST".into()));
        assert_eq!(forward.rules[2].matches, Some(1000));
        assert_eq!(forward.rules[4].target, Target::Continue);
        let cust = t.chain("CUST").unwrap();
        assert_eq!(cust.hook, None);
        assert_eq!(cust.rules[0].target, Target::Return);
        assert_eq!(cust.rules[2].target, Target::Continue);
    }

    #[test]
    fn walk_derives_evaluations_from_entries_and_terminal_matches() {
        // 1000 packets enter FORWARD (700 at the policy + 200 and 100 accepted). Rules 1-3 are
        // evaluated by all: 3000. 1000 jump to CUST: rule 1 by 1000 (600 return), rules 2-4 by
        // 400 each (200 accepted): 2200, and 800 come back. 800 evaluate rule 4 (100 accepted)
        // and 700 rule 5: 1500. Total 6700.
        let ruleset = Ruleset {
            tables: vec![table()],
        };
        let walks = walk("host", &ruleset, false, &|_, _| None);
        let forward = walks.iter().find(|w| w.hook == "FORWARD").unwrap();
        assert_eq!(forward.packets, Some(1000), "{forward:?}");
        assert_eq!(forward.rules_evaluated, Some(6700));
        assert_eq!(forward.chains, vec!["FORWARD", "CUST"]);
        assert_eq!(forward.rules, 9);
        assert!(!forward.approximate);
        let counted = walk("host", &ruleset, false, &|_, hook| {
            (hook == Hook::Forward).then_some(1000)
        });
        assert_eq!(counted[1].rules_evaluated, Some(6700));
        assert!(counted[1].packets_source.contains("counted"));
    }

    #[test]
    fn nft_backed_iptables_has_no_entry_count_without_counting() {
        let t = parse_iptables_save(SAVE, Backend::IptablesNft, Family::Ipv4).unwrap();
        let walks = walk("host", &Ruleset { tables: t }, false, &|_, _| None);
        let forward = walks.iter().find(|w| w.hook == "FORWARD").unwrap();
        assert_eq!(forward.packets, None);
        assert!(forward.packets_source.contains("iptables-nft"));
    }

    #[test]
    fn since_subtracts_and_flags_changes() {
        let before = Ruleset {
            tables: vec![table()],
        };
        let mut after = before.clone();
        after.tables[0].chains[1].rules[2].matches = Some(1500);
        let (delta, changed) = after.since(&before);
        assert!(!changed);
        assert_eq!(delta.tables[0].chains[1].rules[2].matches, Some(500));
        assert_eq!(delta.tables[0].chains[1].policy_packets, Some(0));
        after.tables[0].chains[1].rules.remove(0);
        let (_, changed) = after.since(&before);
        assert!(changed);
    }

    #[test]
    fn parses_native_nft_json_and_skips_iptables_tables() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"table": {"family": "ip", "name": "filter", "handle": 1}},
          {"table": {"family": "inet", "name": "fw", "handle": 2}},
          {"chain": {"family": "inet", "table": "fw", "name": "fwd", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
          {"chain": {"family": "inet", "table": "fw", "name": "pods", "handle": 2}},
          {"rule": {"family": "inet", "table": "fw", "chain": "fwd", "handle": 3, "expr": [{"counter": {"packets": 10, "bytes": 0}}, {"jump": {"target": "pods"}}]}},
          {"rule": {"family": "inet", "table": "fw", "chain": "pods", "handle": 4, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"counter": {"packets": 4, "bytes": 0}}, {"accept": null}]}},
          {"rule": {"family": "inet", "table": "fw", "chain": "pods", "handle": 5, "expr": [{"drop": null}]}},
          {"table": {"family": "ip", "name": "cnitrace_entries", "handle": 3}}]}"#;
        let tables = parse_nft_json(json, &[(Family::Ipv4, "filter".to_owned())]).unwrap();
        assert_eq!(tables.len(), 1);
        let fw = &tables[0];
        assert_eq!((fw.backend, fw.name.as_str()), (Backend::Nft, "fw"));
        assert_eq!(fw.chains[0].hook, Some(Hook::Forward));
        assert_eq!(fw.chains[0].rules[0].target, Target::Jump("pods".into()));
        assert_eq!(fw.chains[1].rules[0].matches, Some(4));
        assert!(!fw.chains[1].rules[0].text.contains("packets"));
        assert_eq!(fw.chains[1].rules[1].matches, None);
        let walks = walk("host", &Ruleset { tables }, false, &|_, _| Some(10));
        // 10 enter fwd: 10 evaluate the jump, 10 evaluate pods' first rule, 6 the second.
        assert_eq!(walks[0].rules_evaluated, Some(26));
        assert!(
            walks[0].approximate,
            "a rule without a counter makes it a bound"
        );
        assert!(parse_nft_json("nope", &[]).is_err());
    }

    #[test]
    fn bad_iptables_save_input_is_an_error_not_a_panic() {
        for bad in [
            "-A FORWARD -j DROP",
            "*filter\n[1:2] -A NOPE -j DROP",
            "*filter\n[x] -A X",
        ] {
            assert!(
                parse_iptables_save(bad, Backend::IptablesNft, Family::Ipv4).is_err(),
                "{bad}"
            );
        }
    }

    /// The deep-walk tests' stack. The recursive walk this replaced overflowed it below 700
    /// nested chains (a 2 MiB blocking thread of the agent below 5,500), so these tests caught it.
    const SMALL_STACK: usize = 256 * 1024;

    fn on_small_stack<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(SMALL_STACK)
            .spawn(work)
            .unwrap()
            .join()
            .unwrap()
    }

    /// FORWARD jumps to C0, each Ci to C(i+1), the last one to `bottom`: what a tenant with
    /// NET_ADMIN can load into x_tables, which sets no nesting limit.
    fn nested_save(depth: usize, bottom: &str) -> String {
        use std::fmt::Write as _;
        let mut text = String::from("*filter\n:FORWARD ACCEPT [5:0]\n");
        for i in 0..depth {
            let _ = writeln!(text, ":C{i} - [0:0]");
        }
        text.push_str("[10:0] -A FORWARD -j C0\n");
        for i in 1..depth {
            let _ = writeln!(text, "[10:0] -A C{} -j C{i}", i - 1);
        }
        let _ = writeln!(text, "[10:0] -A C{} -j {bottom}", depth - 1);
        text.push_str("COMMIT\n");
        text
    }

    fn walk_save_on_small_stack(text: String) -> ChainWalk {
        on_small_stack(move || {
            let tables = parse_iptables_save(&text, Backend::IptablesLegacy, Family::Ipv4).unwrap();
            walk("host", &Ruleset { tables }, false, &|_, _| None).remove(0)
        })
    }

    #[test]
    fn thousands_of_nested_iptables_chains_walk_on_a_small_stack() {
        for depth in [8_000, 20_000] {
            let forward = walk_save_on_small_stack(nested_save(depth, "ACCEPT"));
            assert_eq!(forward.chain_count as usize, depth + 1);
            assert_eq!(forward.rules as usize, depth + 1);
            // 15 enter (5 reach the policy, 10 are accepted at the bottom); all evaluate
            // FORWARD's rule, and the 10 jumping evaluate every chain's.
            assert_eq!(forward.packets, Some(15));
            assert_eq!(forward.rules_evaluated, Some(15 + 10 * depth as u64));
            assert!(!forward.approximate, "{depth}");
        }
    }

    #[test]
    fn a_loop_below_thousands_of_nested_chains_ends_and_makes_the_walk_a_bound() {
        let forward = walk_save_on_small_stack(nested_save(8_000, "C0"));
        assert_eq!(forward.chain_count, 8_001);
        assert!(forward.rules_evaluated.is_some());
        assert!(forward.approximate);
    }

    /// The same nesting as [`nested_save`] in `nft -j list ruleset` form, every rule counted.
    fn nested_nft_json(depth: usize) -> String {
        let chain = |name: String, hook: Option<&str>| {
            serde_json::json!({"chain": {"family": "inet", "table": "fw", "name": name,
                "hook": hook}})
        };
        let rule = |chain: String, verdict: serde_json::Value| {
            serde_json::json!({"rule": {"family": "inet", "table": "fw", "chain": chain,
                "expr": [{"counter": {"packets": 10, "bytes": 0}}, verdict]}})
        };
        let jump = |to: String| serde_json::json!({"jump": {"target": to}});
        let mut items = vec![
            serde_json::json!({"table": {"family": "inet", "name": "fw"}}),
            chain("fwd".into(), Some("forward")),
        ];
        items.extend((0..depth).map(|i| chain(format!("c{i}"), None)));
        items.push(rule("fwd".into(), jump("c0".into())));
        items.extend((1..depth).map(|i| rule(format!("c{}", i - 1), jump(format!("c{i}")))));
        items.push(rule(
            format!("c{}", depth - 1),
            serde_json::json!({"accept": null}),
        ));
        serde_json::json!({ "nftables": items }).to_string()
    }

    #[test]
    fn thousands_of_nested_nft_chains_walk_on_a_small_stack() {
        for depth in [8_000, 20_000] {
            let text = nested_nft_json(depth);
            let fwd = on_small_stack(move || {
                let tables = parse_nft_json(&text, &[]).unwrap();
                walk("host", &Ruleset { tables }, false, &|_, _| Some(10)).remove(0)
            });
            assert_eq!(fwd.chain_count as usize, depth + 1);
            assert_eq!(fwd.rules_evaluated, Some(10 * (depth as u64 + 1)));
            assert!(!fwd.approximate, "{depth}");
        }
    }

    mod properties {
        use std::{collections::BTreeSet, fmt::Write as _};

        use proptest::prelude::*;

        use super::*;

        /// A filter table: per user chain (C0..Cn) and for FORWARD, rules as (jump target
        /// index or none, verdict, packets matched).
        type Spec = Vec<Vec<(Option<usize>, u8, u64)>>;

        fn spec() -> impl Strategy<Value = Spec> {
            (1usize..8).prop_flat_map(|chains| {
                prop::collection::vec(
                    prop::collection::vec((prop::option::of(0..chains), 0u8..3, 0u64..1000), 0..6),
                    chains + 1,
                )
            })
        }

        /// Index 0 is FORWARD; index i > 0 is user chain C{i-1}.
        fn render(spec: &Spec, policy_packets: u64) -> String {
            let mut text = format!("*filter\n:FORWARD ACCEPT [{policy_packets}:0]\n");
            for i in 1..spec.len() {
                let _ = writeln!(text, ":C{} - [0:0]", i - 1);
            }
            for (i, rules) in spec.iter().enumerate() {
                let chain = if i == 0 {
                    "FORWARD".to_owned()
                } else {
                    format!("C{}", i - 1)
                };
                for (target, verdict, packets) in rules {
                    let action = match (target, verdict) {
                        (Some(t), 0) => format!("-j C{t}"),
                        (Some(t), _) => format!("-g C{t}"),
                        (None, 0) => "-j ACCEPT".to_owned(),
                        (None, 1) => "-j RETURN".to_owned(),
                        (None, _) => "-j LOG".to_owned(),
                    };
                    let _ = writeln!(text, "[{packets}:0] -A {chain} -s 10.0.0.{i}/32 {action}");
                }
            }
            text.push_str("COMMIT\n");
            text
        }

        /// Reachable chains (spec indexes) from FORWARD, the naive way.
        fn reachable(spec: &Spec) -> BTreeSet<usize> {
            let mut seen = BTreeSet::from([0]);
            let mut todo = vec![0];
            while let Some(i) = todo.pop() {
                for (target, _, _) in &spec[i] {
                    if let Some(t) = target
                        && seen.insert(t + 1)
                    {
                        todo.push(t + 1);
                    }
                }
            }
            seen
        }

        proptest! {
            /// Any table, loops included: the walk ends, reaches what a naive search reaches,
            /// and every packet entering FORWARD evaluates its first rule.
            #[test]
            fn the_walk_matches_a_naive_search_and_ends(spec in spec(), policy in 0u64..5000) {
                let text = render(&spec, policy);
                let tables = parse_iptables_save(&text, Backend::IptablesLegacy, Family::Ipv4).unwrap();
                let ruleset = Ruleset { tables };
                let (diff, changed) = ruleset.since(&Ruleset::default());
                let walks = walk("host", &diff, changed, &|_, _| None);
                prop_assert_eq!(walks.len(), 1);
                let w = &walks[0];
                let expected = reachable(&spec);
                prop_assert_eq!(w.chain_count as usize, expected.len());
                let rules: usize = expected.iter().map(|&i| spec[i].len()).sum();
                prop_assert_eq!(w.rules as usize, rules);
                prop_assert_eq!(w.chains.len(), expected.len().min(LISTED_CHAINS));
                let packets = w.packets.unwrap();
                let evaluated = w.rules_evaluated.unwrap();
                if !spec[0].is_empty() {
                    prop_assert!(evaluated >= packets, "{} < {}", evaluated, packets);
                }
            }

            /// Garbage never panics the parser.
            #[test]
            fn any_text_parses_or_errs(text in "\\PC{0,400}") {
                let _ = parse_iptables_save(&text, Backend::IptablesNft, Family::Ipv4);
                let _ = parse_nft_json(&text, &[]);
            }
        }
    }

    #[test]
    fn quoted_words() {
        assert_eq!(
            words(r#"-A X -m comment --comment "a b \"c\"" -j DROP"#),
            vec![
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "a b \"c\"",
                "-j",
                "DROP"
            ]
        );
    }
}
