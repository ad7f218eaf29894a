//! The tracing backend: exclusive time per component with a per-CPU nesting stack, fed by
//! kprobe/kretprobe or fentry/fexit pairs on each component's functions.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_ktime_get_ns, generated::bpf_get_func_ip},
    macros::{fentry, fexit, kprobe, kretprobe, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use cnitrace_common::{
    MAX_TRACE_COMPONENTS, MAX_TRACE_FUNCTIONS, TRACE_MAX_DEPTH, TRACE_SLOTS, TraceCost, TraceDepth,
    TraceFrame, fault,
};

use crate::shared::count_fault;

#[map(name = "CNT_TRACE")]
static TRACE: PerCpuArray<TraceCost> = PerCpuArray::with_max_entries(MAX_TRACE_COMPONENTS, 0);

#[map(name = "CNT_TRACE_DEPTH")]
static TRACE_DEPTH: PerCpuArray<TraceDepth> = PerCpuArray::with_max_entries(1, 0);

/// The per-CPU nesting stack's frames; entries 0..depth are in use. A map rather than an array
/// in one value: each frame is its own lookup, which the verifier bounds without arithmetic.
#[map(name = "CNT_TRACE_FRAMES")]
static TRACE_FRAMES: PerCpuArray<TraceFrame> =
    PerCpuArray::with_max_entries(TRACE_MAX_DEPTH as u32, 0);

#[map(name = "CNT_TRACE_FUNCS")]
static TRACE_FUNCTIONS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_TRACE_FUNCTIONS, 0);

#[map(name = "CNT_TRACE_SLOTS")]
static TRACE_SLOTS_MAP: Array<u32> = Array::with_max_entries(TRACE_SLOTS, 0);

/// What happened to the component being charged.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Charge {
    /// It returned.
    Completed,
    /// It called a traced function of its own or another component.
    Nested,
}

fn charge(component: u32, exclusive_ns: u64, inclusive_ns: u64, event: Charge) {
    if let Some(cost) = TRACE.get_ptr_mut(component) {
        // SAFETY: per-CPU slot; tracing programs on one CPU do not preempt each other.
        unsafe {
            (*cost).exclusive_ns += exclusive_ns;
            (*cost).inclusive_ns += inclusive_ns;
            match event {
                Charge::Completed => (*cost).hits += 1,
                Charge::Nested => (*cost).nested_calls += 1,
            }
        }
    }
}

/// A nesting stack whose bottom frame was entered longer ago than this is stale: datapath
/// functions return within microseconds, so one of its returns was missed.
const STALE_NS: u64 = 1_000_000_000;

/// Whether the stack must start again: its bottom frame is stale (with the stack full, entries
/// and returns would otherwise only move the overflow count, and nothing be charged again).
#[inline(always)]
fn is_stale(depth: u32, now: u64) -> bool {
    depth > 0
        && TRACE_FRAMES
            .get(0)
            .is_some_and(|bottom| now.saturating_sub(bottom.entered_ns) > STALE_NS)
}

/// A traced function of `component` starts: the function below it on the stack stops
/// accumulating exclusive time.
fn trace_enter(component: u32) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(state) = TRACE_DEPTH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value, only this CPU touches it, and probe programs do not nest.
    let state = unsafe { &mut *state };
    if state.overflow == 0 && is_stale(state.depth, now) {
        // Returns of the abandoned frames may still come; they find an empty stack and are
        // counted as unmatched.
        state.depth = 0;
        count_fault(fault::TRACE_RESYNC);
    }
    let depth = state.depth;
    if depth >= TRACE_MAX_DEPTH as u32 {
        state.overflow += 1;
        count_fault(fault::TRACE_OVERFLOW);
        return;
    }
    if depth > 0
        && let Some(below) = TRACE_FRAMES.get_ptr(depth - 1)
    {
        // SAFETY: per-CPU frame of this CPU.
        let below = unsafe { &*below };
        charge(
            below.component,
            now.saturating_sub(below.resumed_ns),
            0,
            Charge::Nested,
        );
    }
    let Some(frame) = TRACE_FRAMES.get_ptr_mut(depth) else {
        return;
    };
    // SAFETY: as above.
    unsafe {
        (*frame).component = component;
        (*frame).entered_ns = now;
        (*frame).resumed_ns = now;
    }
    state.depth = depth + 1;
}

/// The innermost traced function returns: it is charged, and its caller resumes.
fn trace_exit() {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(state) = TRACE_DEPTH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in trace_enter.
    let state = unsafe { &mut *state };
    if state.overflow > 0 {
        state.overflow -= 1;
        return;
    }
    let depth = state.depth;
    if depth == 0 {
        count_fault(fault::TRACE_UNMATCHED_EXIT);
        return;
    }
    if let Some(top) = TRACE_FRAMES.get_ptr(depth - 1) {
        // SAFETY: per-CPU frame of this CPU.
        let top = unsafe { &*top };
        charge(
            top.component,
            now.saturating_sub(top.resumed_ns),
            now.saturating_sub(top.entered_ns),
            Charge::Completed,
        );
    }
    state.depth = depth - 1;
    if depth > 1
        && let Some(caller) = TRACE_FRAMES.get_ptr_mut(depth - 2)
    {
        // SAFETY: as above.
        unsafe { (*caller).resumed_ns = now };
    }
}

/// Entry of any function traced with a kprobe: the component comes from the address.
#[kprobe]
pub fn cnitrace_kprobe(ctx: ProbeContext) -> u32 {
    // SAFETY: plain helper call on this program's own context.
    let ip = unsafe { bpf_get_func_ip(ctx.as_ptr()) };
    // SAFETY: the value is read in place, not kept.
    match unsafe { TRACE_FUNCTIONS.get(ip) } {
        Some(&component) => trace_enter(component),
        None => count_fault(fault::TRACE_UNKNOWN_FUNCTION),
    }
    0
}

#[kretprobe]
pub fn cnitrace_kretprobe(_ctx: RetProbeContext) -> u32 {
    trace_exit();
    0
}

fn enter_slot(slot: u32) -> u32 {
    if let Some(&component) = TRACE_SLOTS_MAP.get(slot) {
        trace_enter(component);
    }
    0
}

/// fentry/fexit pairs, one per function traced through a BPF trampoline (each program is
/// bound to its target when loaded).
macro_rules! trampoline_slots {
    ($($slot:literal => $entry:ident, $exit:ident;)*) => {
        $(
            #[fentry]
            pub fn $entry(_ctx: FEntryContext) -> u32 {
                enter_slot($slot)
            }

            #[fexit]
            pub fn $exit(_ctx: FExitContext) -> u32 {
                trace_exit();
                0
            }
        )*
    };
}

trampoline_slots! {
    0 => cnitrace_fentry_0, cnitrace_fexit_0;
    1 => cnitrace_fentry_1, cnitrace_fexit_1;
    2 => cnitrace_fentry_2, cnitrace_fexit_2;
    3 => cnitrace_fentry_3, cnitrace_fexit_3;
    4 => cnitrace_fentry_4, cnitrace_fexit_4;
    5 => cnitrace_fentry_5, cnitrace_fexit_5;
    6 => cnitrace_fentry_6, cnitrace_fexit_6;
    7 => cnitrace_fentry_7, cnitrace_fexit_7;
    8 => cnitrace_fentry_8, cnitrace_fexit_8;
    9 => cnitrace_fentry_9, cnitrace_fexit_9;
    10 => cnitrace_fentry_10, cnitrace_fexit_10;
    11 => cnitrace_fentry_11, cnitrace_fexit_11;
    12 => cnitrace_fentry_12, cnitrace_fexit_12;
    13 => cnitrace_fentry_13, cnitrace_fexit_13;
    14 => cnitrace_fentry_14, cnitrace_fexit_14;
    15 => cnitrace_fentry_15, cnitrace_fexit_15;
}
