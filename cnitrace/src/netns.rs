//! Named network namespaces (/run/netns/NAME, as `ip netns` makes them) and interface lookups
//! inside them, for validating `--netns` and `--iface` before anything is attached.

use std::{os::fd::AsFd as _, path::PathBuf};

use crate::error::Error;

pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Inode number of a network namespace file: what the kernel calls the namespace's `inum`.
fn inode_of(path: &std::path::Path) -> Result<u32, Error> {
    use std::os::unix::fs::MetadataExt as _;
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    u32::try_from(meta.ino())
        .map_err(|_| Error::InvalidArgument(format!("{}: inode out of range", path.display())))
}

/// The inode of this process's network namespace (the host's, for the agent).
pub fn own_inode() -> Result<u32, Error> {
    inode_of(std::path::Path::new("/proc/self/ns/net"))
}

/// The inode of a named namespace.
pub fn inode(name: &str) -> Result<u32, Error> {
    validate(name)?;
    inode_of(&path(name))
}

/// Whether a process is still running: what tells state left by a crashed cnitrace (named
/// after its pid) from state a live one holds.
pub fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The processes whose network namespace is the named one (as `ip netns pids`).
pub fn pids_in(name: &str) -> Result<Vec<i32>, Error> {
    let wanted = inode(name)?;
    Ok(std::fs::read_dir("/proc")
        .map_err(|e| Error::io("read /proc", e))?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            inode_of(std::path::Path::new(&format!("/proc/{pid}/ns/net"))).ok() == Some(wanted)
        })
        .collect())
}

/// The namespaces (inodes) named interfaces may be in: this process's and the `--netns` ones;
/// empty when no interface is named (any device may then be the busiest).
pub fn selection_inodes(ifaces: &[String], namespaces: &[String]) -> Result<Vec<u32>, Error> {
    if ifaces.is_empty() {
        return Ok(Vec::new());
    }
    let mut inodes = vec![own_inode()?];
    for name in namespaces {
        inodes.push(inode(name)?);
    }
    Ok(inodes)
}

/// Checks that a named namespace exists.
pub fn validate(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.contains('/') || !path(name).exists() {
        return Err(Error::InvalidArgument(format!(
            "unknown network namespace `{name}`: no {} (list them with `ip netns list`)",
            path(name).display()
        )));
    }
    Ok(())
}

/// Whether `iface` exists in the namespace `netns` (`None`: this process's namespace).
pub fn has_interface(netns: Option<&str>, iface: &str) -> Result<bool, Error> {
    let Some(netns) = netns else {
        return Ok(nix::net::if_::if_nametoindex(iface).is_ok());
    };
    let file = std::fs::File::open(path(netns))
        .map_err(|e| Error::io(format!("open {}", path(netns).display()), e))?;
    let iface = iface.to_owned();
    // setns affects only the calling thread, so do it on a thread of its own that then exits.
    std::thread::spawn(move || -> Result<bool, Error> {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::io("setns", e.into()))?;
        Ok(nix::net::if_::if_nametoindex(iface.as_str()).is_ok())
    })
    .join()
    .unwrap_or_else(|_| {
        Err(Error::InvalidArgument(
            "namespace lookup thread panicked".to_owned(),
        ))
    })
}

/// Runs a program in the named network namespace (`None`: this process's) and returns its
/// output. `Ok(None)` when the program is not installed.
pub fn output_in(
    netns: Option<&str>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Option<std::process::Output>, Error> {
    let file = netns
        .map(|name| {
            validate(name)?;
            std::fs::File::open(path(name))
                .map_err(|e| Error::io(format!("open {}", path(name).display()), e))
        })
        .transpose()?;
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|&a| a.to_owned()).collect();
    let stdin = stdin.map(str::to_owned);
    // The child inherits the namespaces of the thread that forks it: enter on a thread of its
    // own so this process's other threads stay where they are.
    std::thread::spawn(move || -> Result<Option<std::process::Output>, Error> {
        use std::io::Write as _;
        if let Some(file) = &file {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::io("setns", e.into()))?;
        }
        let mut command = std::process::Command::new(&program);
        command
            .args(&args)
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("run {program}"), e)),
        };
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .map_err(|e| Error::io(format!("write to {program}"), e))?;
        }
        child
            .wait_with_output()
            .map(Some)
            .map_err(|e| Error::io(format!("run {program}"), e))
    })
    .join()
    .unwrap_or_else(|_| {
        Err(Error::InvalidArgument(
            "namespace command thread panicked".to_owned(),
        ))
    })
}

/// Starts a program in the named network namespace; it keeps running there.
pub fn spawn_in(netns: &str, command: std::process::Command) -> Result<std::process::Child, Error> {
    validate(netns)?;
    let file = std::fs::File::open(path(netns))
        .map_err(|e| Error::io(format!("open {}", path(netns).display()), e))?;
    let mut command = command;
    // Forked from a thread that entered the namespace; the child stays there.
    std::thread::spawn(move || -> Result<std::process::Child, Error> {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::io("setns", e.into()))?;
        let program = command.get_program().to_string_lossy().into_owned();
        command
            .spawn()
            .map_err(|e| Error::io(format!("run {program}"), e))
    })
    .join()
    .unwrap_or_else(|_| {
        Err(Error::InvalidArgument(
            "namespace spawn thread panicked".to_owned(),
        ))
    })
}

/// Runs `f` on a thread inside the named network namespace (sockets it opens live there).
pub fn run_in<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> std::thread::JoinHandle<Result<T, Error>> {
    let file = std::fs::File::open(path(netns));
    std::thread::spawn(move || {
        let file = file.map_err(|e| Error::io("open netns", e))?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::io("setns", e.into()))?;
        f()
    })
}

/// Checks every interface exists in this namespace or one of `namespaces`.
pub fn validate_interfaces(ifaces: &[String], namespaces: &[String]) -> Result<(), Error> {
    for ns in namespaces {
        validate(ns)?;
    }
    for iface in ifaces {
        if iface.is_empty() || iface.len() >= cnitrace_common::IFNAMSIZ {
            return Err(Error::InvalidArgument(format!(
                "`{iface}` is not a valid interface name (1 to 15 bytes)"
            )));
        }
        let mut found = has_interface(None, iface)?;
        for ns in namespaces {
            found = found || has_interface(Some(ns), iface)?;
        }
        if !found {
            let scope = if namespaces.is_empty() {
                "this network namespace (name the pod's with --netns)".to_owned()
            } else {
                format!("this network namespace or in {}", namespaces.join(", "))
            };
            return Err(Error::InvalidArgument(format!(
                "unknown interface `{iface}`: not found in {scope}; list them with `ip link`"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_exists_and_nonsense_does_not() {
        assert!(has_interface(None, "lo").unwrap());
        assert!(!has_interface(None, "cnt-nope0").unwrap());
        let err = validate_interfaces(&["cnt-nope0".into()], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown interface `cnt-nope0`"), "{err}");
        let err = validate_interfaces(&["x".repeat(20)], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a valid interface name"), "{err}");
    }

    #[test]
    fn own_namespace_has_an_inode() {
        assert!(own_inode().unwrap() > 0);
        assert!(inode("cnitrace-no-such-ns").is_err());
    }

    #[test]
    fn unknown_namespace_is_named() {
        let err = validate("cnitrace-no-such-ns").unwrap_err().to_string();
        assert!(
            err.contains("cnitrace-no-such-ns") && err.contains("ip netns list"),
            "{err}"
        );
        assert!(validate("../etc").is_err());
    }
}
