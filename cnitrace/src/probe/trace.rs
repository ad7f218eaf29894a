//! The tracing backend: entry and exit probes on each component's functions, with exclusive
//! time per component kept by a per-CPU nesting stack in the kernel (a netfilter hook called
//! from the bridge is netfilter's time, not the bridge's), as sampling's innermost rule does.
//!
//! Per function: fentry/fexit (BPF trampolines) where the kernel has them and the function is
//! in vmlinux BTF, else kprobe/kretprobe; `--attach` forces one. A function that is missing
//! (module not loaded, inlined) is reported, never fatal. The cost of one probe pair is
//! calibrated on `getpid` at start-up so it can be stated and subtracted.

use std::{collections::BTreeMap, time::Instant};

use aya::{
    Btf, Ebpf,
    maps::{Array, HashMap as BpfHashMap},
    programs::{
        FEntry, FExit, KProbe, fentry::FEntryLinkId, fexit::FExitLinkId, kprobe::KProbeLinkId,
    },
};
use cnitrace_common::{MAX_TRACE_COMPONENTS, TRACE_SLOTS, map, program};
use serde::{Deserialize, Serialize};

use super::program_mut;
use crate::{components::COMPONENTS, contract::TracedFunction, error::Error, kallsyms::Kallsyms};

/// How probes attach.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    /// fentry/fexit per function where possible, else kprobe/kretprobe.
    #[default]
    Auto,
    Fentry,
    Kprobe,
}

/// The function the probe-pair cost is calibrated on: getpid() calls it once per call, and it
/// is in vmlinux BTF (syscall wrappers are not, on every kernel).
const CALIBRATION_TARGET: &str = "__task_pid_nr_ns";
/// Component id the calibration probes charge (never reported).
const CALIBRATION_COMPONENT: u32 = MAX_TRACE_COMPONENTS - 1;
/// The fentry slot kept for calibration.
const CALIBRATION_SLOT: u32 = TRACE_SLOTS - 1;

impl TracedFunction {
    fn new(function: &str, component: &str, mode: &str, note: Option<String>) -> Self {
        Self {
            function: function.to_owned(),
            component: component.to_owned(),
            mode: mode.to_owned(),
            note,
        }
    }
}

/// Why a target function has no symbol to attach to.
const NOT_IN_KALLSYMS: &str = "not in /proc/kallsyms (module not loaded, not built, or inlined)";

/// What the tracer attached, and its calibration.
#[derive(Debug, Clone, Default)]
pub struct TracerState {
    /// The attach mode asked for (per function, `functions` says what was used).
    pub mode: AttachMode,
    pub functions: Vec<TracedFunction>,
    /// Cost of one entry+exit probe pair, by attach mode (`fentry`, `kprobe`), measured on
    /// this node at start-up for each mode in use.
    pub pair_ns: BTreeMap<String, f64>,
    pub calibration: String,
}

impl TracerState {
    /// The calibrated pair cost of a component: of the mode its functions use (the costlier
    /// one if they mix).
    pub fn component_pair_ns(&self, component: &str) -> Option<f64> {
        self.functions
            .iter()
            .filter(|f| f.component == component)
            .filter_map(|f| self.pair_ns.get(&f.mode).copied())
            .reduce(f64::max)
    }
}

/// The component id of a taxonomy component (its index).
pub fn component_id(name: &str) -> Option<u32> {
    COMPONENTS
        .iter()
        .position(|c| c.name == name)
        .map(|i| i as u32)
}

pub fn kprobes_available() -> bool {
    std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
}

/// The symbol to attach for `function`: itself, or a compiler clone (`.isra.0`,
/// `.constprop.0`), never a `.cold` part.
fn resolve<'a>(kallsyms: &'a Kallsyms, function: &str) -> Option<(&'a str, u64)> {
    let mut best: Option<(&str, u64)> = None;
    for (name, address) in kallsyms.entries() {
        if name == function {
            return Some((name, address));
        }
        if best.is_none()
            && crate::components::base_name(name) == function
            && !name.contains(".cold")
            && !name.contains(".part")
        {
            best = Some((name, address));
        }
    }
    best
}

/// How each traced function would attach in auto mode, without attaching (for `doctor`).
pub fn plan(kallsyms: &Kallsyms, trampolines: bool, kprobes: bool) -> Vec<TracedFunction> {
    crate::components::traced_functions()
        .map(|(function, component)| {
            let (mode, note) = match resolve(kallsyms, function) {
                None => ("not attached", Some(NOT_IN_KALLSYMS.to_owned())),
                Some((symbol, _)) if trampolines && !kallsyms.in_module(symbol) => (
                    "fentry",
                    (symbol != function).then(|| format!("as {symbol}")),
                ),
                Some((symbol, _)) if kprobes => (
                    "kprobe",
                    Some(if kallsyms.in_module(symbol) {
                        "module function: not in vmlinux BTF".to_owned()
                    } else {
                        "no BPF trampolines on this kernel".to_owned()
                    }),
                ),
                Some(_) => (
                    "not attached",
                    Some("no kprobes on this kernel and no fentry for it".to_owned()),
                ),
            };
            TracedFunction::new(function, component, mode, note)
        })
        .collect()
}

/// Attaches the tracer. The first fentry load tells whether trampolines work; forcing a mode
/// the kernel lacks is an error.
pub fn attach(
    ebpf: &mut Ebpf,
    mode: AttachMode,
    kallsyms: &Kallsyms,
) -> Result<TracerState, Error> {
    let kprobes = kprobes_available();
    if mode == AttachMode::Kprobe && !kprobes {
        return Err(Error::InvalidArgument(
            "--attach kprobe: this kernel has no kprobes (CONFIG_KPROBES is not set; no \
             /sys/bus/event_source/devices/kprobe)"
                .to_owned(),
        ));
    }
    let btf = Btf::from_sys_fs().ok();
    let mut trampolines = mode != AttachMode::Kprobe && btf.is_some();
    let mut trampoline_error: Option<String> = btf
        .is_none()
        .then(|| "no kernel BTF (/sys/kernel/btf/vmlinux)".to_owned());
    let mut state = TracerState {
        mode,
        ..TracerState::default()
    };
    let mut slot = 0u32;
    let mut kprobe_loaded = false;
    let mut kprobe_targets: Vec<(String, u64, u32)> = Vec::new();

    {
        let mut slots: Array<_, u32> = Array::try_from(
            ebpf.map_mut(map::TRACE_SLOTS)
                .ok_or_else(|| Error::Object(format!("map {} missing", map::TRACE_SLOTS)))?,
        )
        .map_err(|e| Error::map(map::TRACE_SLOTS, e))?;
        slots
            .set(CALIBRATION_SLOT, CALIBRATION_COMPONENT, 0)
            .map_err(|e| Error::map(map::TRACE_SLOTS, e))?;
    }

    for (function, component) in crate::components::traced_functions() {
        let id = component_id(component).expect("taxonomy component");
        let Some((symbol, address)) = resolve(kallsyms, function) else {
            state.functions.push(TracedFunction::new(
                function,
                component,
                "not attached",
                Some(NOT_IN_KALLSYMS.to_owned()),
            ));
            continue;
        };
        let note = (symbol != function).then(|| format!("attached as {symbol}"));
        if trampolines && slot < CALIBRATION_SLOT {
            match attach_trampoline(ebpf, slot, symbol, id, btf.as_ref().expect("checked")) {
                Ok(_) => {
                    slot += 1;
                    state
                        .functions
                        .push(TracedFunction::new(function, component, "fentry", note));
                    continue;
                }
                Err(e) => {
                    let message = e.to_string();
                    // The first refusal of a vmlinux function means no trampolines at all.
                    if slot == 0 && !is_module_symbol(kallsyms, symbol) {
                        trampolines = false;
                        trampoline_error = Some(message.clone());
                    }
                    if mode == AttachMode::Fentry && !trampolines {
                        return Err(Error::InvalidArgument(format!(
                            "--attach fentry: BPF trampolines do not work on this kernel \
                             ({message}); use --attach kprobe or auto"
                        )));
                    }
                    tracing::debug!("fentry on {symbol} failed ({message}); trying a kprobe");
                }
            }
        }
        if mode == AttachMode::Fentry {
            let why = if slot >= CALIBRATION_SLOT {
                "all trampoline slots used"
            } else {
                "not in vmlinux BTF: a module function"
            };
            state.functions.push(TracedFunction::new(
                function,
                component,
                "not attached",
                Some(format!(
                    "no fentry ({why}), and --attach fentry forbids the kprobe fallback"
                )),
            ));
            continue;
        }
        if !kprobes {
            state.functions.push(TracedFunction::new(
                function,
                component,
                "not attached",
                Some(format!(
                    "no kprobes on this kernel, and no fentry: {}",
                    trampoline_error.as_deref().unwrap_or("a module function")
                )),
            ));
            continue;
        }
        if !kprobe_loaded {
            for name in [program::TRACE_KPROBE, program::TRACE_KRETPROBE] {
                let prog: &mut KProbe = program_mut(ebpf, name)?;
                prog.load()
                    .map_err(|e| Error::program(format!("load {name}"), e))?;
            }
            kprobe_loaded = true;
        }
        match attach_kprobe_pair(ebpf, symbol) {
            Ok(_) => {
                kprobe_targets.push((symbol.to_owned(), address, id));
                state
                    .functions
                    .push(TracedFunction::new(function, component, "kprobe", note));
            }
            Err(e) => state.functions.push(TracedFunction::new(
                function,
                component,
                "not attached",
                Some(format!("kprobe refused: {e}")),
            )),
        }
    }
    {
        let mut functions: BpfHashMap<_, u64, u32> = BpfHashMap::try_from(
            ebpf.map_mut(map::TRACE_FUNCTIONS)
                .ok_or_else(|| Error::Object(format!("map {} missing", map::TRACE_FUNCTIONS)))?,
        )
        .map_err(|e| Error::map(map::TRACE_FUNCTIONS, e))?;
        for (_, address, id) in &kprobe_targets {
            functions
                .insert(address, id, 0)
                .map_err(|e| Error::map(map::TRACE_FUNCTIONS, e))?;
        }
    }
    if state.functions.iter().all(|f| f.mode == "not attached") {
        return Err(Error::InvalidArgument(format!(
            "the tracing backend could not attach to any function: {}",
            state
                .functions
                .iter()
                .find_map(|f| f.note.as_deref())
                .unwrap_or("no reason")
        )));
    }
    let mut notes = Vec::new();
    for (mode_name, fentry) in [("fentry", true), ("kprobe", false)] {
        if !state.functions.iter().any(|f| f.mode == mode_name) {
            continue;
        }
        match calibrate(ebpf, kallsyms, fentry, btf.as_ref()) {
            Ok((ns, how)) => {
                state.pair_ns.insert(mode_name.to_owned(), ns);
                notes.push(how);
            }
            Err(e) => notes.push(format!("{mode_name} probe cost not calibrated: {e}")),
        }
    }
    state.calibration = notes.join("; ");
    Ok(state)
}

fn is_module_symbol(kallsyms: &Kallsyms, symbol: &str) -> bool {
    kallsyms.in_module(symbol)
}

/// Attached probe pair, so calibration can take its own off again.
enum PairLinks {
    Trampoline(FExitLinkId, FEntryLinkId, u32),
    Kprobe(KProbeLinkId, KProbeLinkId),
}

fn detach(ebpf: &mut Ebpf, links: PairLinks) -> Result<(), Error> {
    match links {
        PairLinks::Trampoline(exit, entry, slot) => {
            let prog: &mut FEntry =
                program_mut(ebpf, &format!("{}{slot}", program::TRACE_FENTRY_PREFIX))?;
            prog.detach(entry)
                .map_err(|e| Error::program("detach fentry", e))?;
            let prog: &mut FExit =
                program_mut(ebpf, &format!("{}{slot}", program::TRACE_FEXIT_PREFIX))?;
            prog.detach(exit)
                .map_err(|e| Error::program("detach fexit", e))
        }
        PairLinks::Kprobe(exit, entry) => {
            let prog: &mut KProbe = program_mut(ebpf, program::TRACE_KPROBE)?;
            prog.detach(entry)
                .map_err(|e| Error::program("detach kprobe", e))?;
            let prog: &mut KProbe = program_mut(ebpf, program::TRACE_KRETPROBE)?;
            prog.detach(exit)
                .map_err(|e| Error::program("detach kretprobe", e))
        }
    }
}

fn attach_trampoline(
    ebpf: &mut Ebpf,
    slot: u32,
    symbol: &str,
    component: u32,
    btf: &Btf,
) -> Result<PairLinks, Error> {
    let entry = format!("{}{slot}", program::TRACE_FENTRY_PREFIX);
    let exit = format!("{}{slot}", program::TRACE_FEXIT_PREFIX);
    {
        let prog: &mut FEntry = program_mut(ebpf, &entry)?;
        prog.load(symbol, btf)
            .map_err(|e| Error::program(format!("load fentry for {symbol}"), e))?;
    }
    let exit_link = {
        let prog: &mut FExit = program_mut(ebpf, &exit)?;
        prog.load(symbol, btf)
            .map_err(|e| Error::program(format!("load fexit for {symbol}"), e))?;
        prog.attach()
            .map_err(|e| Error::program(format!("attach fexit to {symbol}"), e))?
    };
    let mut slots: Array<_, u32> = Array::try_from(
        ebpf.map_mut(map::TRACE_SLOTS)
            .ok_or_else(|| Error::Object(format!("map {} missing", map::TRACE_SLOTS)))?,
    )
    .map_err(|e| Error::map(map::TRACE_SLOTS, e))?;
    slots
        .set(slot, component, 0)
        .map_err(|e| Error::map(map::TRACE_SLOTS, e))?;
    // The entry last: an exit without its entry would count an unmatched exit.
    let prog: &mut FEntry = program_mut(ebpf, &entry)?;
    let entry_link = prog
        .attach()
        .map_err(|e| Error::program(format!("attach fentry to {symbol}"), e))?;
    Ok(PairLinks::Trampoline(exit_link, entry_link, slot))
}

fn attach_kprobe_pair(ebpf: &mut Ebpf, symbol: &str) -> Result<PairLinks, Error> {
    let exit: &mut KProbe = program_mut(ebpf, program::TRACE_KRETPROBE)?;
    let exit_link = exit
        .attach(symbol, 0)
        .map_err(|e| Error::program(format!("kretprobe on {symbol}"), e))?;
    let entry: &mut KProbe = program_mut(ebpf, program::TRACE_KPROBE)?;
    let entry_link = entry
        .attach(symbol, 0)
        .map_err(|e| Error::program(format!("kprobe on {symbol}"), e))?;
    Ok(PairLinks::Kprobe(exit_link, entry_link))
}

/// Time of `calls` getpid() calls.
fn time_getpid(calls: u32) -> f64 {
    let start = Instant::now();
    for _ in 0..calls {
        std::hint::black_box(nix::unistd::getpid());
    }
    start.elapsed().as_secs_f64() * 1e9
}

/// The cost of one probe pair: getpid() timed without and with a probe pair on it (the
/// lowest of several rounds each, against noise), the difference per call.
fn calibrate(
    ebpf: &mut Ebpf,
    kallsyms: &Kallsyms,
    fentry: bool,
    btf: Option<&Btf>,
) -> Result<(f64, String), Error> {
    const CALLS: u32 = 100_000;
    let (symbol, address) = resolve(kallsyms, CALIBRATION_TARGET)
        .ok_or_else(|| Error::InvalidArgument(format!("{CALIBRATION_TARGET} not in kallsyms")))?;
    let best = |f: &dyn Fn() -> f64| (0..5).map(|_| f()).fold(f64::INFINITY, f64::min);
    let bare = best(&|| time_getpid(CALLS));
    let mode;
    let links;
    if fentry {
        let btf = btf.ok_or_else(|| Error::Btf("no kernel BTF".to_owned()))?;
        links = attach_trampoline(ebpf, CALIBRATION_SLOT, symbol, CALIBRATION_COMPONENT, btf)?;
        mode = "fentry/fexit";
    } else {
        let mut functions: BpfHashMap<_, u64, u32> = BpfHashMap::try_from(
            ebpf.map_mut(map::TRACE_FUNCTIONS)
                .ok_or_else(|| Error::Object(format!("map {} missing", map::TRACE_FUNCTIONS)))?,
        )
        .map_err(|e| Error::map(map::TRACE_FUNCTIONS, e))?;
        functions
            .insert(address, CALIBRATION_COMPONENT, 0)
            .map_err(|e| Error::map(map::TRACE_FUNCTIONS, e))?;
        links = attach_kprobe_pair(ebpf, symbol)?;
        mode = "kprobe/kretprobe";
    }
    let probed = best(&|| time_getpid(CALLS));
    detach(ebpf, links)?;
    let per_pair = ((probed - bare) / f64::from(CALLS)).max(0.0);
    Ok((
        per_pair,
        format!(
            "{mode} pair on {symbol}: {:.0} ns per call with it, {:.0} ns without ({CALLS} calls, best of 5)",
            probed / f64::from(CALLS),
            bare / f64::from(CALLS)
        ),
    ))
}

/// Per-component trace costs summed over CPUs, by component name.
pub fn costs_by_component(
    costs: &[cnitrace_common::TraceCost],
) -> BTreeMap<&'static str, cnitrace_common::TraceCost> {
    COMPONENTS
        .iter()
        .enumerate()
        .filter_map(|(index, c)| costs.get(index).map(|cost| (c.name, *cost)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_is_a_taxonomy_component_and_fits_the_maps() {
        for (function, component) in crate::components::traced_functions() {
            let id = component_id(component).unwrap_or_else(|| panic!("{function}: {component}"));
            assert!(id < CALIBRATION_COMPONENT);
            // The sampling taxonomy puts the function in the same component (`other`'s are
            // layer boundaries, in none).
            if component == crate::components::OTHER {
                assert!(crate::components::is_layer_boundary(function), "{function}");
                assert_eq!(crate::components::classify(function), None, "{function}");
            } else {
                assert_eq!(
                    crate::components::classify(function).map(crate::components::top_level),
                    Some(component),
                    "{function}"
                );
            }
        }
        assert!(
            crate::components::traced_functions().count()
                < cnitrace_common::MAX_TRACE_FUNCTIONS as usize
        );
        assert!(COMPONENTS.len() < CALIBRATION_COMPONENT as usize);
    }
}
