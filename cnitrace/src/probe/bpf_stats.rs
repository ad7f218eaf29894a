//! The cost of every BPF program on the node: run-time statistics switched on only while a
//! window is open (BPF_ENABLE_STATS, else the sysctl, restored afterwards), per-program run
//! counts and times, and where each program is attached (from its BPF link).

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use std::sync::{Arc, Mutex, Weak};

use crate::{error::Error, snapshot::ProgramStats};

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Keeps run-time statistics enabled while alive.
pub enum StatsGuard {
    /// BPF_ENABLE_STATS: the kernel counts while this descriptor is open; nothing to restore.
    Fd(OwnedFd),
    /// kernel.bpf_stats_enabled was switched on; the previous value is written back on drop.
    Sysctl { previous: String },
    /// Statistics were already enabled by someone else; leave them alone.
    AlreadyOn,
}

/// Where a process that switched the sysctl on notes the value to restore, so that after a
/// crash or `kill -9` the next start (or `cnitrace doctor --repair`) restores it instead of
/// taking "on" for the user's own setting.
const MARKER_DIR: &str = "/run/cnitrace";

fn marker_path(pid: u32) -> std::path::PathBuf {
    std::path::Path::new(MARKER_DIR).join(format!("bpf_stats_enabled.{pid}"))
}

/// Whether to skip BPF_ENABLE_STATS and use the sysctl, as kernels before 5.8 must (set
/// `CNITRACE_BPF_STATS=sysctl` to exercise that path on a newer kernel).
fn sysctl_forced() -> bool {
    std::env::var_os("CNITRACE_BPF_STATS").is_some_and(|v| v == "sysctl")
}

impl StatsGuard {
    pub fn enable() -> Result<Self, Error> {
        let syscall = if sysctl_forced() {
            Err("CNITRACE_BPF_STATS=sysctl".to_owned())
        } else {
            aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| e.to_string())
        };
        match syscall {
            Ok(fd) => Ok(Self::Fd(fd)),
            Err(syscall_error) => {
                tracing::debug!("BPF_ENABLE_STATS failed ({syscall_error}); using the sysctl");
                restore_after_crash();
                let previous = std::fs::read_to_string(SYSCTL)
                    .map_err(|e| Error::io(format!("read {SYSCTL}"), e))?;
                if previous.trim() == "1" {
                    return Ok(Self::AlreadyOn);
                }
                // The marker first: a crash between the two writes then restores a value
                // that was never changed, which is harmless.
                let marker = marker_path(std::process::id());
                if let Err(e) = std::fs::create_dir_all(MARKER_DIR)
                    .and_then(|()| std::fs::write(&marker, previous.trim()))
                {
                    tracing::warn!(
                        "cannot note {SYSCTL}'s value in {}: {e}; after a crash, restore it by hand",
                        marker.display()
                    );
                }
                std::fs::write(SYSCTL, "1").map_err(|e| Error::io(format!("write {SYSCTL}"), e))?;
                Ok(Self::Sysctl { previous })
            }
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            Self::Fd(_) => "BPF_ENABLE_STATS",
            Self::Sysctl { .. } => "kernel.bpf_stats_enabled (restored afterwards)",
            Self::AlreadyOn => "kernel.bpf_stats_enabled (already on)",
        }
    }
}

/// The guard every open window shares: statistics stay on while any window holds it and go off
/// (the sysctl restored) when the last one closes.
pub fn shared() -> Result<Arc<StatsGuard>, Error> {
    static SHARED: Mutex<Weak<StatsGuard>> = Mutex::new(Weak::new());
    let mut slot = SHARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(guard) = slot.upgrade() {
        return Ok(guard);
    }
    let guard = Arc::new(StatsGuard::enable()?);
    *slot = Arc::downgrade(&guard);
    Ok(guard)
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        if let Self::Sysctl { previous } = self {
            if let Err(e) = std::fs::write(SYSCTL, previous.trim()) {
                tracing::warn!("could not restore {SYSCTL} to {}: {e}", previous.trim());
            }
            let _ = std::fs::remove_file(marker_path(std::process::id()));
        }
    }
}

/// Restores the sysctl that processes now gone switched on and never restored; returns
/// what it did. While another live process holds it on, only the dead ones' markers go.
pub fn restore_after_crash() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(MARKER_DIR) else {
        return Vec::new();
    };
    let mut live = false;
    let mut restore = None;
    let mut dead_markers = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("bpf_stats_enabled.")
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || crate::netns::pid_alive(pid) {
            live = true;
            continue;
        }
        // The oldest value wins: a second crashed run may have noted the first one's "1".
        if let Ok(value) = std::fs::read_to_string(entry.path())
            && (restore.is_none() || value.trim() == "0")
        {
            restore = Some(value.trim().to_owned());
        }
        dead_markers.push(entry.path());
    }
    let mut done = Vec::new();
    if let Some(value) = restore
        && !live
    {
        match std::fs::write(SYSCTL, &value) {
            Ok(()) => done.push(format!(
                "{SYSCTL} restored to {value} (left on by a cnitrace process that is gone)"
            )),
            Err(e) => {
                tracing::warn!("could not restore {SYSCTL} to {value}: {e}");
                return done;
            }
        }
    }
    for marker in dead_markers {
        let _ = std::fs::remove_file(marker);
    }
    done
}

/// Every loaded program's statistics, by program id.
pub fn programs() -> BTreeMap<u32, ProgramStats> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|info| {
            (
                info.id(),
                ProgramStats {
                    name: info.name_as_str().unwrap_or("").to_owned(),
                    program_type: info.program_type() as u32,
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                },
            )
        })
        .collect()
}

/// Where a program is attached, as far as its BPF link tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub kind: String,
    pub ifindex: Option<u32>,
}

// bpf(2) commands and link types (include/uapi/linux/bpf.h).
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const LINK_TYPE_CGROUP: u32 = 3;
const LINK_TYPE_NETNS: u32 = 5;
const LINK_TYPE_XDP: u32 = 6;
const LINK_TYPE_NETFILTER: u32 = 10;
const LINK_TYPE_TCX: u32 = 11;
const LINK_TYPE_NETKIT: u32 = 13;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_NETKIT_PRIMARY: u32 = 54;

/// bpf(2) with a 128-byte `bpf_attr` (larger than any member cnitrace uses).
pub(crate) fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> libc::c_long {
    // SAFETY: the attr buffer is 128 bytes, larger than any bpf_attr member used here, and
    // lives for the duration of the call.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) }
}

fn u32_at(buf: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(buf[offset..offset + 4].try_into().expect("4 bytes"))
}

/// Decodes the head of a `bpf_link_info`: type, id, prog_id, then the type's union at 16.
pub fn decode_link(info: &[u8]) -> (u32, Attachment) {
    let (link_type, prog_id) = (u32_at(info, 0), u32_at(info, 8));
    let attachment = match link_type {
        LINK_TYPE_TCX | LINK_TYPE_NETKIT => {
            let (ifindex, attach_type) = (u32_at(info, 16), u32_at(info, 20));
            let kind = match (link_type, attach_type) {
                (LINK_TYPE_TCX, BPF_TCX_INGRESS) => "tcx ingress",
                (LINK_TYPE_TCX, BPF_TCX_EGRESS) => "tcx egress",
                (LINK_TYPE_TCX, _) => "tcx",
                (_, BPF_NETKIT_PRIMARY) => "netkit primary",
                _ => "netkit peer",
            };
            Attachment {
                kind: kind.to_owned(),
                ifindex: Some(ifindex),
            }
        }
        LINK_TYPE_XDP => Attachment {
            kind: "xdp".to_owned(),
            ifindex: Some(u32_at(info, 16)),
        },
        LINK_TYPE_CGROUP => Attachment {
            kind: "cgroup".to_owned(),
            ifindex: None,
        },
        LINK_TYPE_NETNS => Attachment {
            kind: "netns".to_owned(),
            ifindex: None,
        },
        LINK_TYPE_NETFILTER => Attachment {
            kind: "netfilter".to_owned(),
            ifindex: None,
        },
        other => Attachment {
            kind: format!("link type {other}"),
            ifindex: None,
        },
    };
    (prog_id, attachment)
}

/// Attachments by program id, from every BPF link on the node. Programs attached without a
/// link (legacy tc through netlink, socket filters) do not appear.
pub fn attachments() -> HashMap<u32, Vec<Attachment>> {
    let mut by_program: HashMap<u32, Vec<Attachment>> = HashMap::new();
    let mut id = 0u32;
    loop {
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&id.to_ne_bytes());
        if bpf(BPF_LINK_GET_NEXT_ID, &mut attr) != 0 {
            break; // ENOENT: no more links.
        }
        id = u32_at(&attr, 4);
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&id.to_ne_bytes());
        let fd = bpf(BPF_LINK_GET_FD_BY_ID, &mut attr);
        if fd < 0 {
            continue; // The link went away meanwhile.
        }
        // SAFETY: the kernel returned a new descriptor we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut info = [0u8; 128];
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
        if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) != 0 {
            continue;
        }
        let (prog_id, attachment) = decode_link(&info);
        by_program.entry(prog_id).or_default().push(attachment);
    }
    by_program
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(link_type: u32, prog_id: u32, a: u32, b: u32) -> [u8; 32] {
        let mut buf = [0u8; 32];
        buf[0..4].copy_from_slice(&link_type.to_ne_bytes());
        buf[8..12].copy_from_slice(&prog_id.to_ne_bytes());
        buf[16..20].copy_from_slice(&a.to_ne_bytes());
        buf[20..24].copy_from_slice(&b.to_ne_bytes());
        buf
    }

    #[test]
    fn decodes_link_infos() {
        let (prog, a) = decode_link(&info(LINK_TYPE_TCX, 42, 7, BPF_TCX_INGRESS));
        assert_eq!(
            (prog, a.kind.as_str(), a.ifindex),
            (42, "tcx ingress", Some(7))
        );
        let (_, a) = decode_link(&info(LINK_TYPE_TCX, 1, 3, BPF_TCX_EGRESS));
        assert_eq!(a.kind, "tcx egress");
        let (_, a) = decode_link(&info(LINK_TYPE_XDP, 1, 9, 0));
        assert_eq!((a.kind.as_str(), a.ifindex), ("xdp", Some(9)));
        let (_, a) = decode_link(&info(LINK_TYPE_CGROUP, 1, 0, 0));
        assert_eq!((a.kind.as_str(), a.ifindex), ("cgroup", None));
    }

    #[test]
    fn datapath_types() {}
}
