//! Kernel-facing mechanisms. Each reports what it could attach and why not; nothing above this
//! module needs privileges.

pub mod bpf_stats;
pub mod btf;
pub mod clock;
pub mod privileges;
pub mod sampling;
pub mod tracefs;

/// The eBPF object built by build.rs from cnitrace-ebpf, embedded in the binary.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cnitrace"));
