//! cnitrace's kernel side: a `perf_event` stack sampler and two packet counters.
//!
//! Everything aggregates in per-CPU maps; nothing is sent to user space per event. Every way an
//! update can fail increments a counter in `CNT_FAULTS`, so user space can report what was lost.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes},
    macros::{map, perf_event, tracepoint},
    maps::{PerCpuArray, PerCpuHashMap, StackTrace},
    programs::{PerfEventContext, TracePointContext, tracing::StackIdContext},
};
use cnitrace_common::{
    IfaceCounters, IfaceKey, MAX_IFACES, MAX_SAMPLE_KEYS, MAX_STACKS, SAMPLE_FLAG_IDLE_TASK,
    SAMPLE_FLAG_USER, SampleKey, SampleValue, fault,
};

#[map(name = "CNT_STACKS")]
static STACKS: StackTrace = StackTrace::with_max_entries(MAX_STACKS, 0);

#[map(name = "CNT_SAMPLES")]
static SAMPLES: PerCpuHashMap<SampleKey, SampleValue> =
    PerCpuHashMap::with_max_entries(MAX_SAMPLE_KEYS, 0);

#[map(name = "CNT_IFACES")]
static IFACES: PerCpuHashMap<IfaceKey, IfaceCounters> =
    PerCpuHashMap::with_max_entries(MAX_IFACES, 0);

#[map(name = "CNT_FAULTS")]
static FAULTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(fault::COUNT, 0);

// Tracepoint field offsets, set by user space from tracefs before load.
#[unsafe(no_mangle)]
static TX_NAME_LOC: u32 = 8;
#[unsafe(no_mangle)]
static TX_LEN: u32 = 36;
#[unsafe(no_mangle)]
static TX_GSO_SEGS: u32 = 60;
#[unsafe(no_mangle)]
static RX_NAME_LOC: u32 = 20;
#[unsafe(no_mangle)]
static RX_LEN: u32 = 16;

/// `-EFAULT`: `bpf_get_stackid` found no kernel frames because the sample hit user mode.
const EFAULT: i32 = -14;

#[inline(always)]
fn global(value: &'static u32) -> usize {
    // SAFETY: the global lives in .rodata; a volatile read keeps the compiler from folding the
    // default value in, so the value user space set at load time is used.
    unsafe { core::ptr::read_volatile(value) as usize }
}

#[inline(always)]
fn count_fault(index: u32) {
    if let Some(slot) = FAULTS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it and the program is not preempted.
        unsafe { *slot += 1 };
    }
}

#[perf_event]
pub fn cnitrace_sample(ctx: PerfEventContext) -> u32 {
    match try_sample(&ctx) {
        Ok(()) => 0,
        Err(fault_index) => {
            count_fault(fault_index);
            0
        }
    }
}

fn try_sample(ctx: &PerfEventContext) -> Result<(), u32> {
    count_fault(fault::SAMPLES_SEEN);
    // SAFETY: ctx.ctx points at the bpf_perf_event_data the kernel passed to this program.
    let period = unsafe { (*ctx.ctx).sample_period };
    let pid = bpf_get_current_pid_tgid() as u32;
    let mut flags = if pid == 0 { SAMPLE_FLAG_IDLE_TASK } else { 0 };
    let kernel_stack_id = match ctx.get_stackid(&STACKS, 0) {
        Ok(id) => id as i32,
        Err(EFAULT) => {
            flags |= SAMPLE_FLAG_USER;
            EFAULT
        }
        Err(errno) => {
            // Still account the sample's time (as unattributed) so totals stay right.
            count_fault(fault::STACK_LOST);
            errno
        }
    };
    let key = SampleKey {
        kernel_stack_id,
        flags,
    };
    add_sample(&key, period)
}

#[inline(always)]
fn add_sample(key: &SampleKey, period: u64) -> Result<(), u32> {
    if let Some(value) = SAMPLES.get_ptr_mut(key) {
        // SAFETY: per-CPU value, written only by this CPU in a non-preemptible program.
        unsafe {
            (*value).count += 1;
            (*value).period += period;
        }
        return Ok(());
    }
    let value = SampleValue { count: 1, period };
    SAMPLES
        .insert(key, &value, u64::from(BPF_NOEXIST))
        .map_err(|_| fault::SAMPLE_MAP_FULL)
}

#[tracepoint(category = "net", name = "net_dev_start_xmit")]
pub fn cnitrace_tx(ctx: TracePointContext) -> u32 {
    if let Err(fault_index) = try_tx(&ctx) {
        count_fault(fault_index);
    }
    0
}

fn try_tx(ctx: &TracePointContext) -> Result<(), u32> {
    let key = read_iface_name(ctx, global(&TX_NAME_LOC))?;
    // SAFETY: offsets come from the tracepoint's format file; reads are bounds-checked helpers.
    let (len, segs) = unsafe {
        (
            ctx.read_at::<u32>(global(&TX_LEN)),
            ctx.read_at::<u16>(global(&TX_GSO_SEGS)),
        )
    };
    let (len, segs) = (
        len.map_err(|_| fault::TRACEPOINT_READ)?,
        segs.map_err(|_| fault::TRACEPOINT_READ)?,
    );
    let segs = if segs == 0 { 1 } else { u64::from(segs) };
    update_iface(&key, |c| {
        c.tx_skbs += 1;
        c.tx_segments += segs;
        c.tx_bytes += u64::from(len);
    })
}

#[tracepoint(category = "net", name = "netif_receive_skb")]
pub fn cnitrace_rx(ctx: TracePointContext) -> u32 {
    if let Err(fault_index) = try_rx(&ctx) {
        count_fault(fault_index);
    }
    0
}

fn try_rx(ctx: &TracePointContext) -> Result<(), u32> {
    let key = read_iface_name(ctx, global(&RX_NAME_LOC))?;
    // SAFETY: offset from the tracepoint's format file; the helper checks the read.
    let len = unsafe { ctx.read_at::<u32>(global(&RX_LEN)) }.map_err(|_| fault::TRACEPOINT_READ)?;
    update_iface(&key, |c| {
        c.rx_skbs += 1;
        c.rx_bytes += u64::from(len);
    })
}

/// Reads a `__data_loc char[]` field: a u32 whose low half is the string's offset in the record.
#[inline(always)]
fn read_iface_name(ctx: &TracePointContext, loc_offset: usize) -> Result<IfaceKey, u32> {
    // SAFETY: loc_offset is the data_loc field's offset from the format file.
    let loc = unsafe { ctx.read_at::<u32>(loc_offset) }.map_err(|_| fault::TRACEPOINT_READ)?;
    let offset = (loc & 0xffff) as usize;
    let mut key = IfaceKey::default();
    // SAFETY: the string lies inside the tracepoint record; the helper bounds the copy to 16
    // bytes and faults are reported, not dereferenced.
    unsafe {
        let src = ctx.as_ptr().cast::<u8>().add(offset);
        bpf_probe_read_kernel_str_bytes(src, &mut key.name).map_err(|_| fault::TRACEPOINT_READ)?;
    }
    Ok(key)
}

#[inline(always)]
fn update_iface(key: &IfaceKey, update: impl Fn(&mut IfaceCounters)) -> Result<(), u32> {
    if let Some(counters) = IFACES.get_ptr_mut(key) {
        // SAFETY: per-CPU value, written only by this CPU in a non-preemptible program.
        unsafe { update(&mut *counters) };
        return Ok(());
    }
    let mut counters = IfaceCounters::default();
    update(&mut counters);
    IFACES
        .insert(key, &counters, u64::from(BPF_NOEXIST))
        .map_err(|_| fault::IFACE_MAP_FULL)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
