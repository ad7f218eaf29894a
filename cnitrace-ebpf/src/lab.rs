//! The lab's own datapath programs (not instrumentation, hence no `cnitrace_` prefix): a tc
//! program with a known cost per packet, and a Cilium-like redirect between pods.

use aya_ebpf::{
    helpers::generated::bpf_redirect,
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use cnitrace_common::{LAB_MAX_LOOPS, LAB_MAX_ROUTES, LabRoute};

use crate::shared::global;

/// Iterations of busy work `lab_tc_work` does per packet, set at load time.
#[unsafe(no_mangle)]
static LAB_WORK_LOOPS: u32 = 0;

#[map(name = "LAB_SINK")]
static LAB_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The project's own datapath program (not cnitrace's instrumentation, hence no `cnitrace_`
/// prefix): a tc program with a known, adjustable amount of work per packet, which lets tests
/// and the lab check that BPF costs are measured and attributed.
#[classifier]
pub fn lab_tc_work(ctx: TcContext) -> i32 {
    let loops = global(&LAB_WORK_LOOPS) as u32;
    let mut acc = u64::from(ctx.len());
    for i in 0..LAB_MAX_LOOPS {
        if i >= loops {
            break;
        }
        acc = acc
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(u64::from(i));
    }
    // Storing the result keeps the loop from being optimised away.
    if let Some(sink) = LAB_SINK.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *sink = acc };
    }
    0 // TC_ACT_OK: the packet continues unchanged.
}

#[map(name = "LAB_ROUTES")]
static LAB_ROUTES: HashMap<u32, LabRoute> = HashMap::with_max_entries(LAB_MAX_ROUTES, 0);

const TC_ACT_OK: i32 = 0;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// Offset of the IPv4 destination address in an Ethernet frame.
const IPV4_DST_OFFSET: usize = 14 + 16;

/// The lab's Cilium-like datapath: on the ingress of a pod's host-side device, IPv4 packets to
/// a known pod are sent straight out of that pod's host-side device (bpf_redirect), skipping
/// the host's IP stack and netfilter, as Cilium's per-endpoint programs do.
#[classifier]
pub fn lab_redirect(ctx: TcContext) -> i32 {
    try_lab_redirect(&ctx).unwrap_or(TC_ACT_OK)
}

fn try_lab_redirect(ctx: &TcContext) -> Result<i32, i64> {
    let ethertype: u16 = ctx.load(12)?;
    if ethertype != ETH_P_IP_BE {
        return Ok(TC_ACT_OK);
    }
    let destination: u32 = ctx.load(IPV4_DST_OFFSET)?;
    // SAFETY: the value is read in place and not kept beyond this program run.
    let Some(route) = (unsafe { LAB_ROUTES.get(destination) }) else {
        return Ok(TC_ACT_OK);
    };
    // The map value is passed to the helper in place: no copy, no compiler memcpy.
    ctx.store(0, &route.macs, 0)?;
    // SAFETY: plain helper call; it only records the target device for the kernel.
    Ok(unsafe { bpf_redirect(route.ifindex, 0) } as i32)
}
