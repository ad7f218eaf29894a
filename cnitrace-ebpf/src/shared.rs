//! What every program shares: the fault counters, load-time globals, and helpers that keep
//! the compiler from emitting builtin subprograms.

use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::map, maps::PerCpuArray};
use cnitrace_common::fault;

#[map(name = "CNT_FAULTS")]
pub(crate) static FAULTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(fault::COUNT, 0);
#[inline(always)]
pub(crate) fn global(value: &'static u32) -> usize {
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
pub(crate) unsafe fn zero_in_place<T>(place: *mut T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8) && core::mem::align_of::<T>() == 8) };
    let words = place.cast::<u64>();
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: `i` indexes a u64 inside `*place` (caller guarantees validity and alignment).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

#[inline(always)]
pub(crate) fn count_fault(index: u32) {
    if let Some(slot) = FAULTS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it and the program is not preempted.
        unsafe { *slot += 1 };
    }
}

/// Reads a `T` at `base + offset` of kernel memory.
#[inline(always)]
pub(crate) fn read<T>(base: *const u8, offset: usize) -> Result<T, u32> {
    // SAFETY: bpf_probe_read_kernel checks the address; a fault is reported, not dereferenced.
    unsafe { bpf_probe_read_kernel(base.add(offset).cast::<T>()) }.map_err(|_| fault::FIELD_READ)
}
