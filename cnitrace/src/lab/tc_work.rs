//! `cnitrace lab tc-work`: attaches `lab_tc_work` (a tc program doing N iterations of work per
//! packet) to a device, and keeps it attached until this process ends. The attachment is a BPF
//! link owned by the process, so however the process ends, the kernel removes it.

use std::os::fd::AsFd as _;

use aya::{
    EbpfLoader,
    programs::{SchedClassifier, TcAttachType, tc},
};
use cnitrace_common::{LAB_MAX_LOOPS, global, program};

use crate::{
    error::Error,
    netns,
    probe::{EBPF_OBJECT, privileges, program_mut},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    Ingress,
    Egress,
}

/// The loaded and attached program; dropping it detaches.
pub struct TcWork {
    _ebpf: aya::Ebpf,
}

pub fn validate_loops(loops: u32) -> Result<(), Error> {
    if loops > LAB_MAX_LOOPS {
        return Err(Error::InvalidArgument(format!(
            "--loops {loops} is out of range: use 0..={LAB_MAX_LOOPS}"
        )));
    }
    Ok(())
}

/// Enters `netns` (this thread, and threads it creates later) and attaches the program to
/// `iface` there. Call before starting other threads.
pub fn attach(
    netns_name: Option<&str>,
    iface: &str,
    direction: Direction,
    loops: u32,
) -> Result<TcWork, Error> {
    validate_loops(loops)?;
    privileges::check()?;
    privileges::raise_memlock_limit();
    if let Some(name) = netns_name {
        netns::validate(name)?;
        let file = std::fs::File::open(netns::path(name))
            .map_err(|e| Error::io(format!("open netns {name}"), e))?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::io(format!("enter netns {name}"), e.into()))?;
    }
    if !netns::has_interface(None, iface)? {
        return Err(Error::InvalidArgument(format!(
            "unknown interface `{iface}` in {}",
            netns_name.map_or_else(
                || "this network namespace".to_owned(),
                |n| format!("netns {n}")
            )
        )));
    }
    // clsact is needed only where tc programs attach through netlink (kernels before 6.6);
    // with TCX it is unused, and "already exists" is fine either way.
    let _ = tc::qdisc_add_clsact(iface);
    let mut ebpf = EbpfLoader::new()
        .override_global(global::LAB_WORK_LOOPS, &loops, true)
        .load(EBPF_OBJECT)
        .map_err(|e| Error::Load(Box::new(e)))?;
    let prog: &mut SchedClassifier = program_mut(&mut ebpf, program::LAB_TC_WORK)?;
    prog.load()
        .map_err(|e| Error::program(format!("load {}", program::LAB_TC_WORK), e))?;
    let attach_type = match direction {
        Direction::Ingress => TcAttachType::Ingress,
        Direction::Egress => TcAttachType::Egress,
    };
    prog.attach(iface, attach_type)
        .map_err(|e| Error::program(format!("attach {} to {iface}", program::LAB_TC_WORK), e))?;
    Ok(TcWork { _ebpf: ebpf })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_bound_is_enforced() {
        assert!(validate_loops(LAB_MAX_LOOPS).is_ok());
        let err = validate_loops(LAB_MAX_LOOPS + 1).unwrap_err().to_string();
        assert!(err.contains("--loops"), "{err}");
    }
}
