//! cnitrace's kernel side: a `perf_event` stack sampler and two packet counters.
//!
//! Everything aggregates in per-CPU maps; nothing is sent to user space per event. Every way an
//! update can fail increments a counter in `CNT_FAULTS`, so user space can report what was lost.
#![no_std]
#![no_main]

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes, generated::bpf_get_stack,
    },
    macros::{map, perf_event, tracepoint},
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::{PerfEventContext, TracePointContext},
};
use cnitrace_common::{
    FNV_OFFSET, FNV_PRIME, IfaceCounters, IfaceKey, MAX_IFACES, MAX_SAMPLE_KEYS, MAX_STACKS,
    SAMPLE_FLAG_IDLE_TASK, SAMPLE_FLAG_USER, STACK_DEPTH, SampleKey, SampleValue, StackFrames,
    fault,
};

/// Stack table keyed by the frames' hash. Not preallocated: memory grows with distinct stacks
/// only, and a 64-bit key makes collisions negligible (a stack-trace map's buckets collide).
#[map(name = "CNT_STACKS")]
static STACKS: HashMap<u64, StackFrames> = HashMap::with_max_entries(MAX_STACKS, BPF_F_NO_PREALLOC);

/// Per-CPU scratch for copying a stack (too large for the 512-byte BPF stack).
#[map(name = "CNT_SCRATCH")]
static SCRATCH: PerCpuArray<StackFrames> = PerCpuArray::with_max_entries(1, 0);

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

#[inline(always)]
fn global(value: &'static u32) -> usize {
    // SAFETY: the global lives in .rodata; a volatile read keeps the compiler from folding the
    // default value in, so the value user space set at load time is used.
    unsafe { core::ptr::read_volatile(value) as usize }
}

/// Zeroes `*place` with volatile u64 stores, in place. Plain zeroing (or moving a zeroed value)
/// compiles to a call to a `memset` BPF subprogram, which kallsyms lists as a program of its
/// own and would be mistaken for datapath BPF. `T` must be 8-aligned, a multiple of 8 bytes.
///
/// # Safety
/// `place` must be valid for writes of `T`.
#[inline(always)]
unsafe fn zero_in_place<T>(place: *mut T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8) && core::mem::align_of::<T>() == 8) };
    let words = place.cast::<u64>();
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: `i` indexes a u64 inside `*place` (caller guarantees validity and alignment).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
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
    let stack_hash = match record_kernel_stack(ctx) {
        Ok(Some(hash)) => hash,
        Ok(None) => {
            flags |= SAMPLE_FLAG_USER;
            0
        }
        Err(fault_index) => {
            // Keep the sample's time (unattributed) so the busy total stays right.
            count_fault(fault_index);
            0
        }
    };
    let key = SampleKey {
        stack_hash,
        flags,
        padding: 0,
    };
    add_sample(&key, period)
}

/// Copies the sampled kernel stack, stores it under its hash, returns the hash; `None` when the
/// sample hit user mode (no kernel frames).
#[inline(always)]
fn record_kernel_stack(ctx: &PerfEventContext) -> Result<Option<u64>, u32> {
    let frames = SCRATCH.get_ptr_mut(0).ok_or(fault::STACK_LOST)?;
    // SAFETY: the per-CPU scratch slot is ours for the duration of this non-preemptible program.
    let frames = unsafe { &mut *frames };
    let size = core::mem::size_of::<StackFrames>() as u32;
    // SAFETY: the buffer is `size` bytes of writable map memory.
    let copied = unsafe { bpf_get_stack(ctx.as_ptr(), frames.ips.as_mut_ptr().cast(), size, 0) };
    if copied < 0 {
        return Err(fault::STACK_LOST);
    }
    let depth = copied as usize / 8;
    if depth == 0 {
        return Ok(None);
    }
    let mut hash = FNV_OFFSET;
    for i in 0..STACK_DEPTH {
        if i >= depth {
            frames.ips[i] = 0;
        } else {
            hash = (hash ^ frames.ips[i]).wrapping_mul(FNV_PRIME);
        }
    }
    // SAFETY: lookup only; the value is not dereferenced.
    if unsafe { STACKS.get(hash) }.is_none()
        && let Err(errno) = STACKS.insert(hash, frames, u64::from(BPF_NOEXIST))
    {
        // -EEXIST: another CPU stored the same stack meanwhile, which is fine.
        if errno != -17 {
            return Err(fault::STACK_LOST);
        }
    }
    Ok(Some(hash))
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
        .insert(key, value, u64::from(BPF_NOEXIST))
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
    let mut key = MaybeUninit::uninit();
    read_iface_name(ctx, global(&TX_NAME_LOC), &mut key)?;
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
    let mut key = MaybeUninit::uninit();
    read_iface_name(ctx, global(&RX_NAME_LOC), &mut key)?;
    // SAFETY: offset from the tracepoint's format file; the helper checks the read.
    let len = unsafe { ctx.read_at::<u32>(global(&RX_LEN)) }.map_err(|_| fault::TRACEPOINT_READ)?;
    update_iface(&key, |c| {
        c.rx_skbs += 1;
        c.rx_bytes += u64::from(len);
    })
}

/// Reads a `__data_loc char[]` field (a u32 whose low half is the string's offset in the
/// record) into `key`, which must stay in place: see [`zero_in_place`].
#[inline(always)]
fn read_iface_name(
    ctx: &TracePointContext,
    loc_offset: usize,
    key: &mut MaybeUninit<IfaceKey>,
) -> Result<(), u32> {
    // SAFETY: loc_offset is the data_loc field's offset from the format file.
    let loc = unsafe { ctx.read_at::<u32>(loc_offset) }.map_err(|_| fault::TRACEPOINT_READ)?;
    let offset = (loc & 0xffff) as usize;
    // SAFETY: zeroing makes every byte initialised; the string lies inside the tracepoint record
    // and the helper bounds the copy to the 16-byte name, reporting faults instead of reading.
    unsafe {
        zero_in_place(key.as_mut_ptr());
        let src = ctx.as_ptr().cast::<u8>().add(offset);
        bpf_probe_read_kernel_str_bytes(src, &mut (*key.as_mut_ptr()).name)
            .map_err(|_| fault::TRACEPOINT_READ)?;
    }
    Ok(())
}

#[inline(always)]
fn update_iface(
    key: &MaybeUninit<IfaceKey>,
    update: impl Fn(&mut IfaceCounters),
) -> Result<(), u32> {
    // SAFETY: read_iface_name initialised every byte of the key.
    let key = unsafe { key.assume_init_ref() };
    if let Some(counters) = IFACES.get_ptr_mut(key) {
        // SAFETY: per-CPU value, written only by this CPU in a non-preemptible program.
        unsafe { update(&mut *counters) };
        return Ok(());
    }
    let mut counters = MaybeUninit::<IfaceCounters>::uninit();
    // SAFETY: zeroed in place, then a valid all-integer value.
    let counters = unsafe {
        zero_in_place(counters.as_mut_ptr());
        counters.assume_init_mut()
    };
    update(counters);
    IFACES
        .insert(key, counters, u64::from(BPF_NOEXIST))
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
