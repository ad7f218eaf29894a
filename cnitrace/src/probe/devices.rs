//! Packet counts without a per-packet probe: every device's own transmit counters, read in
//! this network namespace and in each named one (`/run/netns`, where CNIs and the lab keep
//! pods' namespaces), from `/proc/thread-self/net/dev` on a thread that entered the namespace.
//!
//! Devices count skbs (a 64 KB GSO skb is one); wire segments are derived per window from the
//! bytes and the device's MTU (see [`segments`]).

use std::{collections::BTreeMap, os::fd::AsFd as _};

use cnitrace_common::{IFNAMSIZ, IfaceCounters};

use crate::{error::Error, netns};

/// One device's cumulative counters and its MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStats {
    pub counters: IfaceCounters,
    pub mtu: u32,
}

pub use crate::breakdown::segments;

/// Parses `/proc/net/dev`: `name: rx_bytes rx_packets ... (8 rx fields) tx_bytes tx_packets ...`.
pub fn parse_proc_net_dev(text: &str) -> Vec<(String, u64, u64)> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, fields) = line.split_once(':')?;
            let fields: Vec<u64> = fields
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            // tx_bytes is field 8, tx_packets field 9.
            Some((name.trim().to_owned(), *fields.get(9)?, *fields.get(8)?))
        })
        .collect()
}

/// The key of a device in a snapshot: namespace inode and ifindex, unique while both live.
pub fn key(netns_inode: u32, ifindex: u32) -> u64 {
    (u64::from(netns_inode) << 32) | u64::from(ifindex)
}

/// Devices of the calling thread's namespace.
fn read_current(netns_inode: u32) -> Result<Vec<DeviceStats>, Error> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev")
        .map_err(|e| Error::io("read /proc/thread-self/net/dev", e))?;
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::io("socket for device ioctls", e.into()))?;
    Ok(parse_proc_net_dev(&text)
        .into_iter()
        .filter_map(|(name, tx_skbs, tx_bytes)| {
            if name.len() >= IFNAMSIZ {
                return None;
            }
            // A device that went away between the read and the lookup is skipped.
            let ifindex = nix::net::if_::if_nametoindex(name.as_str()).ok()?;
            let mtu = mtu_of(&socket, &name).unwrap_or(1500);
            let mut counters = IfaceCounters {
                ifindex,
                netns_inode,
                tx_skbs,
                tx_segments: 0,
                tx_bytes,
                ..IfaceCounters::default()
            };
            counters.name[..name.len()].copy_from_slice(name.as_bytes());
            Some(DeviceStats { counters, mtu })
        })
        .collect())
}

fn mtu_of(socket: &std::os::fd::OwnedFd, name: &str) -> Option<u32> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: an all-zero ifreq is valid; the name is copied in below, NUL-terminated.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src.cast_signed();
    }
    // SAFETY: SIOCGIFMTU reads ifr_name and writes ifr_mtu in the request we own.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFMTU, &mut request) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the kernel filled the union's mtu member.
    u32::try_from(unsafe { request.ifr_ifru.ifru_mtu }).ok()
}

/// Every device of this namespace and of each namespace named in /run/netns, by [`key`].
pub fn read_all() -> Result<BTreeMap<u64, DeviceStats>, Error> {
    let mut out = BTreeMap::new();
    let own = netns::own_inode()?;
    for device in read_current(own)? {
        out.insert(key(own, device.counters.ifindex), device);
    }
    let Ok(entries) = std::fs::read_dir(netns::NETNS_DIR) else {
        return Ok(out);
    };
    let mut seen = vec![own];
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        let Ok(meta) = file.metadata() else { continue };
        let inode = std::os::unix::fs::MetadataExt::ino(&meta) as u32;
        if seen.contains(&inode) {
            continue;
        }
        seen.push(inode);
        // setns affects only the calling thread: a short-lived thread per namespace.
        let devices = std::thread::spawn(move || -> Result<Vec<DeviceStats>, Error> {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::io("setns", e.into()))?;
            read_current(inode)
        })
        .join()
        .map_err(|_| Error::InvalidArgument("device statistics thread panicked".to_owned()))?;
        // A namespace removed while being read is not an error.
        for device in devices.unwrap_or_default() {
            out.insert(key(inode, device.counters.ifindex), device);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
  eth0: 123456789 4567 0 0 0 0 0 0 987654321 7654 0 0 0 0 0 0
";
        let devices = parse_proc_net_dev(text);
        assert_eq!(
            devices,
            vec![
                ("lo".to_owned(), 10, 1000),
                ("eth0".to_owned(), 7654, 987_654_321)
            ]
        );
    }

    #[test]
    fn segments_of_full_gso_skbs_are_exact() {
        // 100 GSO skbs of 44 full segments at MTU 1500 (1448 bytes of payload each).
        let bytes = 100 * (66 + 44 * 1448);
        assert_eq!(segments(100, bytes, 1500), 4400);
        // Pure ACKs: one segment per skb.
        assert_eq!(segments(50, 50 * 66, 1500), 50);
        assert_eq!(segments(7, 700, 0), 7);
    }
}
