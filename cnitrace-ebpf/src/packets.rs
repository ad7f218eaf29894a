//! The exact packet counter: transmitted skbs, GSO segments and bytes per device, from the
//! `net_dev_start_xmit` raw tracepoint, with each device's identity read on its first packet.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_probe_read_kernel_str_bytes,
    macros::{map, raw_tracepoint},
    maps::PerCpuHashMap,
    programs::RawTracePointContext,
};
use cnitrace_common::{IfaceCounters, MAX_IFACES, fault};

use crate::shared::{count_fault, global, read, zero_in_place};

// Struct offsets, set by user space from the kernel's BTF before load.
#[unsafe(no_mangle)]
static SKB_LEN: u32 = 0;
#[unsafe(no_mangle)]
static SKB_HEAD: u32 = 0;
#[unsafe(no_mangle)]
static SKB_END: u32 = 0;
#[unsafe(no_mangle)]
static SHINFO_GSO_SEGS: u32 = 6;
#[unsafe(no_mangle)]
static DEV_NAME: u32 = 0;
#[unsafe(no_mangle)]
static DEV_IFINDEX: u32 = 0;
#[unsafe(no_mangle)]
static DEV_ND_NET: u32 = 0;
#[unsafe(no_mangle)]
static NET_NS_INUM: u32 = 0;
/// Keyed by namespace inode and ifindex (as user space keys devices): a device that takes a
/// dead one's memory gets its own entry, never the dead device's name.
#[map(name = "CNT_IFACES")]
static IFACES: PerCpuHashMap<u64, IfaceCounters> = PerCpuHashMap::with_max_entries(MAX_IFACES, 0);

/// `net_dev_start_xmit(const struct sk_buff *skb, const struct net_device *dev)`: a raw
/// tracepoint gets both pointers without the kernel formatting a trace record first, which is
/// most of a classic tracepoint's per-packet cost.
#[raw_tracepoint(tracepoint = "net_dev_start_xmit")]
pub fn cnitrace_tx(ctx: RawTracePointContext) -> i32 {
    if let Err(fault_index) = try_tx(&ctx) {
        count_fault(fault_index);
    }
    0
}

fn try_tx(ctx: &RawTracePointContext) -> Result<(), u32> {
    let skb: *const u8 = ctx.arg(0);
    let dev: *const u8 = ctx.arg(1);
    let len: u32 = read(skb, global(&SKB_LEN))?;
    let head: *const u8 = read(skb, global(&SKB_HEAD))?;
    // On 64-bit kernels `end` is an offset from `head`; skb_shinfo(skb) = head + end.
    let end: u32 = read(skb, global(&SKB_END))?;
    let segs: u16 = read(head, end as usize + global(&SHINFO_GSO_SEGS))?;
    let segs = if segs == 0 { 1 } else { u64::from(segs) };
    let ifindex: u32 = read(dev, global(&DEV_IFINDEX))?;
    let net: *const u8 = read(dev, global(&DEV_ND_NET))?;
    let netns_inode: u32 = read(net, global(&NET_NS_INUM))?;
    let key = (u64::from(netns_inode) << 32) | u64::from(ifindex);
    if let Some(counters) = IFACES.get_ptr_mut(key) {
        // SAFETY: per-CPU value, written only by this CPU in a non-preemptible program.
        unsafe {
            (*counters).tx_skbs += 1;
            (*counters).tx_segments += segs;
            (*counters).tx_bytes += u64::from(len);
        }
        return Ok(());
    }
    // First packet of this device on this CPU: record who it is.
    let mut counters = MaybeUninit::<IfaceCounters>::uninit();
    // SAFETY: zeroed in place (so no memset subprogram), then only integer fields are written.
    let counters = unsafe {
        zero_in_place(counters.as_mut_ptr());
        counters.assume_init_mut()
    };
    // SAFETY: the helper bounds the copy to the 16-byte name and reports faults.
    unsafe { bpf_probe_read_kernel_str_bytes(dev.add(global(&DEV_NAME)), &mut counters.name) }
        .map_err(|_| fault::FIELD_READ)?;
    counters.ifindex = ifindex;
    counters.netns_inode = netns_inode;
    counters.tx_skbs = 1;
    counters.tx_segments = segs;
    counters.tx_bytes = u64::from(len);
    IFACES
        .insert(key, counters, u64::from(BPF_NOEXIST))
        .map_err(|_| fault::IFACE_MAP_FULL)
}
