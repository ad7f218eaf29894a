//! Named network namespaces (/run/netns/NAME, as `ip netns` makes them) and interface lookups
//! inside them, for validating `--netns` and `--iface` before anything is attached.

use crate::error::Error;

pub use cnitrace_netns::{NETNS_DIR, inode, output_in, path, pids_in, spawn_in, validate};

/// Runs `f` on a thread inside the named network namespace (sockets it opens live there).
pub fn run_in<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> std::thread::JoinHandle<Result<T, Error>> {
    cnitrace_netns::run_in(netns, f)
}

/// The inode of this process's network namespace (the host's, for the agent).
pub fn own_inode() -> Result<u32, Error> {
    Ok(cnitrace_netns::inode_of(std::path::Path::new(
        "/proc/self/ns/net",
    ))?)
}

/// Whether a process is still running: what tells state left by a crashed cnitrace (named
/// after its pid) from state a live one holds.
pub fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
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

/// Whether `iface` exists in the namespace `netns` (`None`: this process's namespace).
pub fn has_interface(netns: Option<&str>, iface: &str) -> Result<bool, Error> {
    let Some(netns) = netns else {
        return Ok(nix::net::if_::if_nametoindex(iface).is_ok());
    };
    validate(netns)?;
    let iface = iface.to_owned();
    run_in(netns, move || {
        Ok::<_, Error>(nix::net::if_::if_nametoindex(iface.as_str()).is_ok())
    })
    .join()
    .unwrap_or_else(|_| {
        Err(Error::InvalidArgument(
            "namespace lookup thread panicked".to_owned(),
        ))
    })
}

/// Checks every interface exists in this namespace or one of `namespaces`.
/// Most namespaces and interfaces one window may name: each is opened and searched when the
/// window opens, so an unbounded list would be an unbounded amount of work for one request.
pub const MAX_NAMED: usize = 64;

pub fn validate_interfaces(ifaces: &[String], namespaces: &[String]) -> Result<(), Error> {
    for (what, names) in [("network namespaces", namespaces), ("interfaces", ifaces)] {
        if names.len() > MAX_NAMED {
            return Err(Error::InvalidArgument(format!(
                "{} {what} named: at most {MAX_NAMED}",
                names.len()
            )));
        }
        let unique: std::collections::BTreeSet<&String> = names.iter().collect();
        if unique.len() < names.len() {
            return Err(Error::InvalidArgument(format!(
                "{what} named more than once: {}",
                names.join(", ")
            )));
        }
    }
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
    fn directories_long_and_repeated_lists_are_refused() {
        for name in [".", "..", "", "a/b", "a\0b"] {
            let err = validate_interfaces(&[], &[name.to_owned()]).unwrap_err();
            assert!(
                err.to_string().contains("unknown network namespace"),
                "{name:?}: {err}"
            );
        }
        let many: Vec<String> = (0..=MAX_NAMED).map(|i| format!("ns{i}")).collect();
        let err = validate_interfaces(&[], &many).unwrap_err();
        assert!(err.to_string().contains("at most 64"), "{err}");
        let twice = vec!["lo".to_owned(), "lo".to_owned()];
        let err = validate_interfaces(&twice, &[]).unwrap_err();
        assert!(err.to_string().contains("more than once"), "{err}");
    }

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
    fn an_unknown_namespace_is_an_invalid_argument_here() {
        let err = Error::from(validate("cnitrace-no-such-ns").unwrap_err());
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        let err = validate_interfaces(&["lo".into()], &["cnitrace-no-such-ns".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid argument: unknown network namespace"),
            "{err}"
        );
    }
}
