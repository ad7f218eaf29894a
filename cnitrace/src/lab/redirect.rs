//! The lab's Cilium-like datapath: `lab_redirect` on the ingress of each pod's host-side
//! device (and of the VXLAN device) sends packets for a local pod straight to that pod's
//! device. Attached through netlink tc filters so it stays after `lab up` exits; it goes away
//! with the lab's namespaces (`lab down`).

use std::{net::Ipv4Addr, os::fd::AsFd as _};

use aya::{
    EbpfLoader,
    maps::HashMap,
    programs::{SchedClassifier, TcAttachType, tc},
};
use cnitrace_common::{LabRoute, map, program};

use crate::{
    error::Error,
    netns,
    probe::{EBPF_OBJECT, privileges, program_mut},
};

/// Loads `lab_redirect` in `netns`, attaches it to every device in `devices`, and fills its
/// table with `routes` (destination pod address -> device and MACs).
pub fn attach(
    netns_name: &str,
    devices: &[String],
    routes: &[(Ipv4Addr, LabRoute)],
) -> Result<(), Error> {
    privileges::check()?;
    privileges::raise_memlock_limit();
    let file = std::fs::File::open(netns::path(netns_name))
        .map_err(|e| Error::io(format!("open netns {netns_name}"), e))?;
    let devices = devices.to_vec();
    let routes = routes.to_vec();
    // tc attachment goes through netlink sockets of the calling thread's namespace.
    std::thread::spawn(move || -> Result<(), Error> {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::io("setns", e.into()))?;
        let mut ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .map_err(|e| Error::Load(Box::new(e)))?;
        {
            let mut table: HashMap<_, u32, LabRoute> = HashMap::try_from(
                ebpf.map_mut(map::LAB_ROUTES)
                    .ok_or_else(|| Error::Object(format!("no map {}", map::LAB_ROUTES)))?,
            )
            .map_err(|e| Error::map(map::LAB_ROUTES, e))?;
            for (address, route) in &routes {
                // The program reads the address as it is on the wire.
                table
                    .insert(u32::from_ne_bytes(address.octets()), route, 0)
                    .map_err(|e| Error::map(map::LAB_ROUTES, e))?;
            }
        }
        let prog: &mut SchedClassifier = program_mut(&mut ebpf, program::LAB_REDIRECT)?;
        prog.load()
            .map_err(|e| Error::program(format!("load {}", program::LAB_REDIRECT), e))?;
        for device in &devices {
            let _ = tc::qdisc_add_clsact(device);
            let id = prog
                .attach_with_options(
                    device,
                    TcAttachType::Ingress,
                    tc::TcAttachOptions::Netlink(tc::NlOptions::default()),
                )
                .map_err(|e| {
                    Error::program(format!("attach {} to {device}", program::LAB_REDIRECT), e)
                })?;
            let link = prog
                .take_link(id)
                .map_err(|e| Error::program("take the tc link", e))?;
            // The filter must outlive this process: the lab owns it until its namespace goes.
            std::mem::forget(link);
        }
        Ok(())
    })
    .join()
    .map_err(|_| Error::InvalidArgument("tc attach thread panicked".to_owned()))?
}
