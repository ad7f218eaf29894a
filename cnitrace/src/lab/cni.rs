//! The lab as a CNI runtime: runs the CNI reference plugins (bridge, ptp, host-local,
//! firewall, portmap, ... from Debian's `containernetworking-plugins` or /opt/cni/bin) the way
//! the CNI specification says a runtime runs a network configuration list: ADD through the
//! plugins in order, each given the previous one's result, CHECK in the same order, DEL in
//! reverse, with the `CNI_*` variables and the configuration on stdin. The datapaths they make
//! are the plugins' own, not shapes written here.
//!
//! Every attachment is recorded under [`STATE_DIR`] (with the IPAM plugin's state), so `lab
//! down`, a failure halfway or a later run after a crash deletes it through the plugins and
//! then removes the directory.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::{
    cni_config::{self, find_plugin, plugins_of, search_path},
    error::Error,
    netns,
};

/// Where attachments and host-local's leases live while a lab is up.
pub const STATE_DIR: &str = "/run/cnitrace-lab/cni";

/// The CNI specification version the lab speaks (the reference plugins support it from 1.0.0).
const CNI_VERSION: &str = "1.0.0";

/// One interface of one pod made by a configuration list, as recorded for CHECK and DEL.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    /// The namespace the plugins run in (the lab host).
    pub host: String,
    pub container_id: String,
    /// The pod's network namespace name.
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` (host-local reads `IP=` from it).
    pub args: String,
    pub conflist: Value,
    /// The last plugin's ADD result.
    pub result: Value,
}

/// Runs one plugin for one command inside the host's namespace; returns its result (ADD) or
/// `Value::Null` (CHECK, DEL with nothing printed).
fn invoke(
    attachment: &Attachment,
    plugin: &Value,
    command: &str,
    prev_result: Option<&Value>,
) -> Result<Value, Error> {
    let (name, version, _) = plugins_of(&attachment.conflist)?;
    let kind = plugin["type"].as_str().unwrap_or_default().to_owned();
    let executable = find_plugin(&kind)?;
    // The plugin's configuration as the specification builds it from the list.
    let mut config = plugin.clone();
    config["name"] = json!(name);
    config["cniVersion"] = json!(version);
    if let Some(prev) = prev_result {
        config["prevResult"] = prev.clone();
    }
    if plugin["capabilities"]["portMappings"] == json!(true) {
        config["runtimeConfig"] = json!({"portMappings": []});
    }
    let stdin = config.to_string();
    let cni_path = std::env::join_paths(search_path())
        .map_err(|e| Error::InvalidArgument(format!("CNI_PATH: {e}")))?;
    let env = [
        ("CNI_COMMAND", command.to_owned()),
        ("CNI_CONTAINERID", attachment.container_id.clone()),
        (
            "CNI_NETNS",
            netns::path(&attachment.netns).display().to_string(),
        ),
        ("CNI_IFNAME", attachment.ifname.clone()),
        ("CNI_ARGS", attachment.args.clone()),
        ("CNI_PATH", cni_path.to_string_lossy().into_owned()),
        ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin".to_owned()),
    ];
    let what = format!("CNI plugin {kind} {command} for {}", attachment.netns);
    let output = netns::run_in(&attachment.host, {
        let what = what.clone();
        move || {
            let mut child = Command::new(&executable)
                .env_clear()
                .envs(env)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| Error::io(format!("run {}", executable.display()), e))?;
            if let Some(mut pipe) = child.stdin.take() {
                pipe.write_all(stdin.as_bytes())
                    .map_err(|e| Error::io(format!("write to {what}"), e))?;
            }
            child
                .wait_with_output()
                .map_err(|e| Error::io(what.clone(), e))
        }
    })
    .join()
    .unwrap_or_else(|_| Err(Error::InvalidArgument(format!("{what}: thread panicked"))))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // The specification's error object: {"code", "msg", "details"}.
        let error: Value = serde_json::from_str(&stdout).unwrap_or_default();
        return Err(Error::InvalidArgument(format!(
            "{what} failed ({}): {} {}{}",
            output.status,
            error["msg"].as_str().unwrap_or(stdout.trim()),
            error["details"].as_str().unwrap_or_default(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout)
        .map_err(|e| Error::InvalidArgument(format!("{what}: result is not JSON ({e})")))
}

fn state_file(attachment: &Attachment) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{}.json", attachment.container_id))
}

/// ADD: every plugin of the list in order, each given the previous result. A failure deletes
/// what the earlier plugins made (DEL in reverse) before returning the error. The attachment
/// is recorded before the first plugin runs, so a crash midway is still cleaned up.
pub fn add(mut attachment: Attachment) -> Result<Attachment, Error> {
    let (_, _, plugins) = plugins_of(&attachment.conflist)?;
    std::fs::create_dir_all(STATE_DIR).map_err(|e| Error::io(format!("create {STATE_DIR}"), e))?;
    record(&attachment)?;
    let mut prev: Option<Value> = None;
    for (index, plugin) in plugins.iter().enumerate() {
        match invoke(&attachment, plugin, "ADD", prev.as_ref()) {
            Ok(result) => prev = Some(result),
            Err(e) => {
                attachment.result = prev.unwrap_or(Value::Null);
                for earlier in plugins[..=index].iter().rev() {
                    if let Err(del) = invoke(&attachment, earlier, "DEL", Some(&attachment.result))
                    {
                        tracing::warn!("after a failed ADD: {del}");
                    }
                }
                let _ = std::fs::remove_file(state_file(&attachment));
                return Err(e);
            }
        }
    }
    attachment.result = prev.unwrap_or(Value::Null);
    record(&attachment)?;
    Ok(attachment)
}

fn record(attachment: &Attachment) -> Result<(), Error> {
    let path = state_file(attachment);
    let text = serde_json::to_string_pretty(attachment)
        .map_err(|e| Error::InvalidArgument(format!("CNI state: {e}")))?;
    std::fs::write(&path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// CHECK: every plugin in order with the ADD result; the first complaint is the error.
/// Lists older than 0.4.0 have no CHECK.
pub fn check(attachment: &Attachment) -> Result<(), Error> {
    let (_, version, plugins) = plugins_of(&attachment.conflist)?;
    if !cni_config::has_check(&version) {
        return Ok(());
    }
    for plugin in &plugins {
        invoke(attachment, plugin, "CHECK", Some(&attachment.result))?;
    }
    Ok(())
}

/// DEL: every plugin in reverse order with the ADD result; all are run, failures collected.
pub fn del(attachment: &Attachment) -> Result<(), Error> {
    let (_, _, plugins) = plugins_of(&attachment.conflist)?;
    let mut failures = Vec::new();
    for plugin in plugins.iter().rev() {
        if let Err(e) = invoke(attachment, plugin, "DEL", Some(&attachment.result)) {
            failures.push(e.to_string());
        }
    }
    let _ = std::fs::remove_file(state_file(attachment));
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(failures.join("; ")))
    }
}

/// The attachments recorded by a lab that is (or was, before a crash) up.
pub fn recorded() -> Vec<Attachment> {
    let mut found: Vec<Attachment> = std::fs::read_dir(STATE_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|text| serde_json::from_str(&text).ok())
        .collect();
    found.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    found
}

/// DEL for every recorded attachment whose namespaces still exist, then the state directory
/// (IPAM leases included) goes. Called by `lab down` before the namespaces are removed.
pub fn remove_all() -> Vec<String> {
    let mut failures = Vec::new();
    for attachment in recorded().iter().rev() {
        let alive =
            netns::path(&attachment.host).exists() && netns::path(&attachment.netns).exists();
        if alive && let Err(e) = del(attachment) {
            failures.push(e.to_string());
        }
    }
    if Path::new(STATE_DIR).exists()
        && let Err(e) = std::fs::remove_dir_all(STATE_DIR)
    {
        failures.push(format!("remove {STATE_DIR}: {e}"));
    }
    // Its parent too, when nothing else of the lab's is in it.
    if let Some(parent) = Path::new(STATE_DIR).parent() {
        let _ = std::fs::remove_dir(parent);
    }
    failures
}

/// IPAM of lab host `host`: host-local over the host's pod subnet (10.77.HOST.0/24), leases
/// kept under the lab's state directory (not /var/lib/cni), a default route through the
/// gateway.
fn host_local(host: u8) -> Value {
    json!({
        "type": "host-local",
        "ranges": [[{"subnet": format!("10.77.{host}.0/24")}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": format!("{STATE_DIR}/ipam"),
    })
}

/// IPAM of the L2 models: one 10.77.0.0/16 across both hosts (the wire is one segment), each
/// host leasing from its own /24 of it, no gateway.
fn host_local_flat(host: u8) -> Value {
    json!({
        "type": "host-local",
        "ranges": [[{
            "subnet": "10.77.0.0/16",
            "rangeStart": format!("10.77.{host}.2"),
            "rangeEnd": format!("10.77.{host}.254"),
        }]],
        "dataDir": format!("{STATE_DIR}/ipam"),
    })
}

/// Where `--cni-conf` keeps the user's list while its lab is up (removed with the state).
fn user_conflist() -> PathBuf {
    Path::new(STATE_DIR).join("user.conflist")
}

/// Takes a user's list for the lab: refuses what one machine cannot run
/// ([`cni_config::check_runnable`]); keeps
/// host-local's leases under the lab's state directory (never the node's /var/lib/cni) and puts
/// sub-interface plugins (macvlan, ipvlan, vlan) on the lab host's uplink.
pub fn store_user(loaded: &cni_config::Loaded) -> Result<(), Error> {
    cni_config::check_runnable(loaded)?;
    let mut list = loaded.conflist.clone();
    for plugin in list["plugins"].as_array_mut().into_iter().flatten() {
        if plugin["ipam"]["type"] == "host-local" {
            plugin["ipam"]["dataDir"] = json!(format!("{STATE_DIR}/ipam"));
        }
        if matches!(plugin["type"].as_str(), Some("macvlan" | "ipvlan" | "vlan")) {
            plugin["master"] = json!("wire");
        }
    }
    std::fs::create_dir_all(STATE_DIR).map_err(|e| Error::io(format!("create {STATE_DIR}"), e))?;
    let path = user_conflist();
    std::fs::write(&path, list.to_string())
        .map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// The pod's IPv4 address in a plugin chain's result (`ips[].address`, CIDR notation).
pub fn result_ipv4(result: &Value) -> Option<std::net::Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        ip["address"]
            .as_str()?
            .split('/')
            .next()?
            .parse::<std::net::Ipv4Addr>()
            .ok()
    })
}

/// The configuration list of a built-in model on lab host `host` (1 or 2): what containerd,
/// podman and kubenet-style set-ups write, with the lab's addresses.
pub fn builtin(kind: BuiltIn, host: u8) -> Value {
    match kind {
        // The user's own list, as `store_user` adapted it (the same on both hosts).
        BuiltIn::User => std::fs::read_to_string(user_conflist())
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(Value::Null),
        // A bridge with the gateway on it, masquerade out of the subnet, the firewall
        // plugin's forwarding chains and portmap (podman's and nerdctl's default).
        BuiltIn::Bridge => json!({
            "cniVersion": CNI_VERSION,
            "name": "cnitrace-lab-bridge",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": true,
                    "hairpinMode": true,
                    "ipam": host_local(host),
                },
                {"type": "firewall", "backend": "iptables"},
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        }),
        // cni-bridge's list with the bandwidth plugin after it: each pod limited both ways,
        // as `kubernetes.io/ingress-bandwidth` and `egress-bandwidth` annotations do. The
        // limit sits below what one stream reaches here (~20 Gbit/s), so every packet is
        // shaped, yet high enough for a stream of hundreds of thousands of packets a second;
        // the burst holds many GSO super-packets (tbf drops a packet larger than it).
        BuiltIn::Bandwidth => {
            let mut list = builtin(BuiltIn::Bridge, host);
            list["name"] = json!("cnitrace-lab-bandwidth");
            list["plugins"]
                .as_array_mut()
                .expect("the bridge list has plugins")
                .push(json!({
                    "type": "bandwidth",
                    "ingressRate": BANDWIDTH_RATE_BPS,
                    "ingressBurst": BANDWIDTH_BURST_BITS,
                    "egressRate": BANDWIDTH_RATE_BPS,
                    "egressBurst": BANDWIDTH_BURST_BITS,
                }));
            list
        }
        // Routed: a veth per pod with /32 routes on the host (Calico's host side, kindnet).
        BuiltIn::Ptp => json!({
            "cniVersion": CNI_VERSION,
            "name": "cnitrace-lab-ptp",
            "plugins": [
                {
                    "type": "ptp",
                    "ipMasq": true,
                    "ipam": host_local(host),
                },
                {"type": "firewall", "backend": "iptables"},
            ],
        }),
        // Sub-interfaces of the host's uplink (the wire) in bridge mode: pods reach each other
        // and the other host's pods at L2, never through the host's IP stack.
        BuiltIn::Macvlan => json!({
            "cniVersion": CNI_VERSION,
            "name": "cnitrace-lab-macvlan",
            "plugins": [{
                "type": "macvlan",
                "master": "wire",
                "mode": "bridge",
                "ipam": host_local_flat(host),
            }],
        }),
        // The same with the uplink's MAC shared, demultiplexed by IP (ipvlan L2 mode).
        BuiltIn::Ipvlan => json!({
            "cniVersion": CNI_VERSION,
            "name": "cnitrace-lab-ipvlan",
            "plugins": [{
                "type": "ipvlan",
                "master": "wire",
                "mode": "l2",
                "ipam": host_local_flat(host),
            }],
        }),
    }
}

/// The built-in configuration lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltIn {
    Bridge,
    Ptp,
    Macvlan,
    Ipvlan,
    Bandwidth,
    /// The list given with `--cni-conf`.
    User,
}

/// The bandwidth model's limit per pod and direction: 5 Gbit/s.
const BANDWIDTH_RATE_BPS: u64 = 5_000_000_000;
/// Its burst: 4 MiB.
const BANDWIDTH_BURST_BITS: u64 = 32 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configurations_are_clear_errors() {
        for (conf, said) in [
            (json!({"plugins": [{"type": "bridge"}]}), "name"),
            (json!({"name": "n", "cniVersion": "1.0.0"}), "neither"),
            (
                json!({"name": "n", "cniVersion": "1.0.0", "plugins": []}),
                "empty",
            ),
            (
                json!({"name": "n", "plugins": [{"type": "bridge"}]}),
                "cniVersion",
            ),
        ] {
            let err = plugins_of(&conf).unwrap_err().to_string();
            assert!(err.contains(said), "{err}");
        }
    }

    #[test]
    fn addresses_come_from_the_result() {
        let result = json!({"ips": [{"address": "fd00::2/64"}, {"address": "10.88.0.7/16"}]});
        assert_eq!(
            result_ipv4(&result),
            Some(std::net::Ipv4Addr::new(10, 88, 0, 7))
        );
        assert_eq!(result_ipv4(&json!({})), None);
    }

    #[test]
    fn builtins_use_the_lab_state_directory() {
        for kind in [
            BuiltIn::Bridge,
            BuiltIn::Ptp,
            BuiltIn::Macvlan,
            BuiltIn::Ipvlan,
            BuiltIn::Bandwidth,
        ] {
            let list = builtin(kind, 1);
            let (_, _, plugins) = plugins_of(&list).unwrap();
            assert_eq!(
                plugins[0]["ipam"]["dataDir"].as_str().unwrap(),
                format!("{STATE_DIR}/ipam")
            );
        }
    }
}
