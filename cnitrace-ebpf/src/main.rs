//! cnitrace's kernel side, one module per concern: the stack sampler, the packet counter, the
//! softirq timer, the tracer's entry/exit probes, and the lab's own datapath programs.
//!
//! Everything aggregates in per-CPU maps; nothing is sent to user space per event. Every way an
//! update can fail increments a counter in `CNT_FAULTS`, so user space can report what was lost.
#![no_std]
#![no_main]
// Program entry points take their context by value (the aya macros' signature), and helpers are
// inlined on purpose: a call that stays a call becomes a BPF subprogram with its own limits.
#![allow(clippy::needless_pass_by_value, clippy::inline_always)]

mod lab;
mod packets;
mod sampler;
mod shared;
mod softirq;
mod tracer;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
