//! CNI on a node: its network configurations (/etc/cni/net.d: the file a container runtime
//! would use, its plugin chain, the datapath components that chain implies), its plugins
//! (CNI_PATH), and whether the lab can run a configuration on one machine (`--cni-conf`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Error;

/// Where kubelet's container runtimes read network configurations from.
pub const NET_D: &str = "/etc/cni/net.d";

/// The specification versions whose result format the lab reads (`ips`, `interfaces`).
const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// Plugins that only work beside a cluster daemon or API, with the lab model of the same
/// shape where there is one.
const NEEDS_A_DAEMON: &[(&str, &str, Option<&str>)] = &[
    ("calico", "calico-node and its datastore", Some("calico-np")),
    ("calico-ipam", "Calico's datastore", Some("calico-np")),
    ("cilium-cni", "the cilium agent", Some("cilium")),
    (
        "flannel",
        "flanneld's /run/flannel/subnet.env",
        Some("flannel"),
    ),
    ("weave-net", "the weave router", Some("weave")),
    ("weave-ipam", "the weave router", Some("weave")),
    ("antrea", "the antrea agent and OVS", None),
    ("ovn-k8s-cni-overlay", "ovnkube-node and OVS", None),
    ("kube-ovn", "the kube-ovn daemon and OVS", None),
    ("multus", "the Kubernetes API", None),
    ("multus-shim", "the multus daemon", None),
    ("whereabouts", "the Kubernetes API", None),
    ("dhcp", "the CNI dhcp daemon and a DHCP server", None),
    ("aws-cni", "ipamd and the EC2 API", None),
    ("azure-vnet", "the Azure network", None),
    ("azure-vnet-ipam", "the Azure network", None),
];

/// Configuration files of a directory in the order runtimes consider them: by name, those
/// ending in .conf, .conflist or .json.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.is_file()
                && path.extension().is_some_and(|ext| {
                    ["conf", "conflist", "json"]
                        .iter()
                        .any(|known| ext.eq_ignore_ascii_case(known))
                })
        })
        .collect();
    found.sort();
    found
}

/// Directories searched for plugins when `CNI_PATH` is not set: the usual install location,
/// then Debian's.
const DEFAULT_CNI_PATH: &[&str] = &["/opt/cni/bin", "/usr/lib/cni"];

/// The plugin search path: `CNI_PATH` if set, else the defaults.
pub fn search_path() -> Vec<PathBuf> {
    std::env::var_os("CNI_PATH").map_or_else(
        || DEFAULT_CNI_PATH.iter().map(PathBuf::from).collect(),
        |path| std::env::split_paths(&path).collect(),
    )
}

/// The executable of plugin `kind`, or a clear error naming where it was looked for.
pub fn find_plugin(kind: &str) -> Result<PathBuf, Error> {
    if kind.is_empty() || kind.contains('/') {
        return Err(Error::InvalidArgument(format!(
            "CNI plugin type `{kind}` is not a plugin name"
        )));
    }
    let path = search_path();
    path.iter()
        .map(|dir| dir.join(kind))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "CNI plugin `{kind}` not found in {} (install containernetworking-plugins or set \
                 CNI_PATH)",
                path.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            ))
        })
}

/// Whether the lab can run a user's list here: no plugin that needs a cluster daemon, every
/// plugin installed. Errors name the file and the plugin.
pub fn check_runnable(loaded: &Loaded) -> Result<(), Error> {
    if let Some(problem) = emulation_problem(loaded) {
        return Err(Error::InvalidArgument(problem));
    }
    for kind in chain(&loaded.conflist) {
        find_plugin(&kind).map_err(|e| {
            Error::InvalidArgument(format!("{}: {}", loaded.file.display(), without_prefix(&e)))
        })?;
    }
    Ok(())
}

fn without_prefix(e: &Error) -> String {
    match e {
        Error::InvalidArgument(message) => message.clone(),
        other => other.to_string(),
    }
}

/// A configuration read from a file.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub file: PathBuf,
    /// As a list: a single configuration (`.conf`) becomes a list of one.
    pub conflist: Value,
}

impl Loaded {
    pub fn name(&self) -> &str {
        self.conflist["name"].as_str().unwrap_or_default()
    }
}

/// Reads `path`: a file, or a directory whose first configuration by name is the one a
/// runtime would use. Errors name the file.
pub fn load(path: &Path) -> Result<Loaded, Error> {
    let file = if path.is_dir() {
        files(path).into_iter().next().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: no CNI configuration (.conf, .conflist, .json) in it",
                path.display()
            ))
        })?
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| Error::io(format!("read {}", file.display()), e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::InvalidArgument(format!("{}: not JSON: {e}", file.display())))?;
    let conflist =
        as_list(&value).map_err(|e| Error::InvalidArgument(format!("{}: {e}", file.display())))?;
    Ok(Loaded { file, conflist })
}

/// A configuration as a list, checked: a name, a supported `cniVersion`, plugins that each
/// have a `type`.
fn as_list(value: &Value) -> Result<Value, String> {
    if value["plugins"].is_array() {
        plugins_of(value).map_err(|e| e.to_string())?;
        return Ok(value.clone());
    }
    if value["type"].is_string() {
        let mut plugin = value.clone();
        let object = plugin.as_object_mut().ok_or("not a JSON object")?;
        let name = object.remove("name").unwrap_or(Value::Null);
        let version = object.remove("cniVersion").unwrap_or(Value::Null);
        let list = serde_json::json!({"name": name, "cniVersion": version, "plugins": [plugin]});
        plugins_of(&list).map_err(|e| e.to_string())?;
        return Ok(list);
    }
    Err("CNI configuration: neither `plugins` nor `type`".to_owned())
}

/// The list's name, cniVersion and plugins, checked; a single configuration (with `type` at
/// the top) is taken as a list of one.
pub fn plugins_of(conflist: &Value) -> Result<(String, String, Vec<Value>), Error> {
    let bad = |what: &str| Error::InvalidArgument(format!("CNI configuration: {what}"));
    let name = conflist["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad("no `name`"))?
        .to_owned();
    let version = conflist["cniVersion"]
        .as_str()
        .ok_or_else(|| bad("no `cniVersion`"))?
        .to_owned();
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(bad(&format!(
            "cniVersion {version} is not supported (the lab runs {})",
            SUPPORTED_VERSIONS.join(", ")
        )));
    }
    let plugins = if let Some(list) = conflist["plugins"].as_array() {
        list.clone()
    } else if conflist["type"].is_string() {
        vec![conflist.clone()]
    } else {
        return Err(bad("neither `plugins` nor `type`"));
    };
    if plugins.is_empty() {
        return Err(bad("`plugins` is empty"));
    }
    for plugin in &plugins {
        plugin["type"]
            .as_str()
            .ok_or_else(|| bad("a plugin without `type`"))?;
    }
    Ok((name, version, plugins))
}

/// Whether CHECK exists in this version of the specification (from 0.4.0).
pub fn has_check(version: &str) -> bool {
    !version.starts_with("0.3.")
}

/// Plugin types of a list, IPAM plugins after the plugin that calls them.
pub fn chain(conflist: &Value) -> Vec<String> {
    let plugins = conflist["plugins"].as_array().cloned().unwrap_or_default();
    let mut types = Vec::new();
    for plugin in &plugins {
        if let Some(kind) = plugin["type"].as_str() {
            types.push(kind.to_owned());
        }
        if let Some(ipam) = plugin["ipam"]["type"].as_str() {
            types.push(ipam.to_owned());
        }
    }
    types
}

/// The datapath components (of the one taxonomy) a plugin's configuration puts on packets'
/// paths.
pub fn components_of(plugin: &Value) -> Vec<&'static str> {
    let masquerades = plugin["ipMasq"] == Value::Bool(true);
    let mut components: Vec<&'static str> = match plugin["type"].as_str().unwrap_or_default() {
        "bridge" => vec!["veth", "bridge"],
        "ptp" => vec!["veth", "ip_forward"],
        "macvlan" | "ipvlan" | "vlan" | "host-device" => vec!["other.netdev"],
        "firewall" | "portmap" => vec!["netfilter"],
        "bandwidth" => vec!["tc"],
        "flannel" => vec!["veth", "bridge", "vxlan", "netfilter"],
        "calico" => vec!["veth", "ip_forward", "netfilter"],
        "cilium-cni" => vec!["veth", "bpf"],
        "weave-net" => vec!["veth", "bridge", "ovs", "vxlan"],
        "antrea" | "ovn-k8s-cni-overlay" | "kube-ovn" => vec!["veth", "ovs"],
        _ => Vec::new(),
    };
    if masquerades {
        components.push("netfilter");
    }
    components
}

/// Why the lab cannot run this list on one machine, if it cannot: a plugin (or IPAM plugin)
/// that needs a cluster daemon, named with the file.
pub fn emulation_problem(loaded: &Loaded) -> Option<String> {
    chain(&loaded.conflist).iter().find_map(|kind| {
        NEEDS_A_DAEMON
            .iter()
            .find(|(name, _, _)| name == kind)
            .map(|(name, daemon, model)| {
                format!(
                    "{}: plugin `{name}` needs {daemon}, which a single machine does not run{}",
                    loaded.file.display(),
                    model.map_or_else(String::new, |m| format!(
                        "; the lab's `{m}` model has its datapath's shape"
                    ))
                )
            })
    })
}

/// One configuration file as `doctor` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigSummary {
    pub file: String,
    /// The file a runtime uses: the first by name.
    pub in_use: bool,
    pub name: Option<String>,
    pub cni_version: Option<String>,
    /// Plugin types in chain order, IPAM plugins after their caller.
    pub plugins: Vec<String>,
    /// Datapath components the chain implies.
    pub components: Vec<String>,
    /// Why `lab bench --cni-conf` cannot run it here, if it cannot.
    pub lab: Option<String>,
    /// Why it could not be read, if it could not.
    pub error: Option<String>,
}

/// Every configuration in `dir`, read and summarised; never fails.
pub fn summarize(dir: &Path) -> Vec<ConfigSummary> {
    files(dir)
        .into_iter()
        .enumerate()
        .map(|(index, file)| {
            let mut summary = ConfigSummary {
                file: file.display().to_string(),
                in_use: index == 0,
                name: None,
                cni_version: None,
                plugins: Vec::new(),
                components: Vec::new(),
                lab: None,
                error: None,
            };
            match load(&file) {
                Ok(loaded) => {
                    summary.name = Some(loaded.name().to_owned());
                    summary.cni_version = loaded.conflist["cniVersion"].as_str().map(Into::into);
                    summary.plugins = chain(&loaded.conflist);
                    let plugins = loaded.conflist["plugins"].as_array().cloned();
                    let mut components: Vec<String> = Vec::new();
                    for plugin in plugins.iter().flatten() {
                        for component in components_of(plugin) {
                            if !components.iter().any(|c| c == component) {
                                components.push(component.to_owned());
                            }
                        }
                    }
                    summary.components = components;
                    summary.lab = emulation_problem(&loaded).or_else(|| {
                        summary
                            .plugins
                            .iter()
                            .find_map(|kind| find_plugin(kind).err())
                            .map(|e| e.to_string())
                    });
                }
                Err(e) => summary.error = Some(e.to_string()),
            }
            summary
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cnitrace-cniconf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_directory_means_its_first_configuration_by_name() {
        let dir = temp_dir("first");
        write(&dir, "README", "not a configuration");
        write(
            &dir,
            "20-other.conflist",
            r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"ptp"}]}"#,
        );
        write(
            &dir,
            "10-bridge.conf",
            r#"{"cniVersion":"0.4.0","name":"podman","type":"bridge","bridge":"cni-podman0","ipMasq":true,"ipam":{"type":"host-local"}}"#,
        );
        let loaded = load(&dir).unwrap();
        assert!(loaded.file.ends_with("10-bridge.conf"));
        assert_eq!(loaded.name(), "podman");
        assert_eq!(chain(&loaded.conflist), ["bridge", "host-local"]);
        let summaries = summarize(&dir);
        assert_eq!(summaries.len(), 2);
        assert!(summaries[0].in_use && !summaries[1].in_use);
        assert_eq!(summaries[0].components, ["veth", "bridge", "netfilter"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_are_errors_that_name_them() {
        let dir = temp_dir("bad");
        for (name, text, said) in [
            ("a.conflist", "{not json", "not JSON"),
            (
                "b.conflist",
                r#"{"cniVersion":"9.9.9","name":"n","plugins":[{"type":"bridge"}]}"#,
                "cniVersion 9.9.9 is not supported",
            ),
            (
                "c.conflist",
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"bridge":"x"}]}"#,
                "without `type`",
            ),
            ("d.conf", r#"{"cniVersion":"1.0.0","name":"n"}"#, "neither"),
        ] {
            let path = write(&dir, name, text);
            let err = load(&path).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(said), "{err}");
        }
        let summaries = summarize(&dir);
        assert!(summaries.iter().all(|s| s.error.is_some()));
        let err = load(&dir.join("missing.conflist")).unwrap_err().to_string();
        assert!(err.contains("missing.conflist"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let empty = temp_dir("empty");
        assert!(
            load(&empty)
                .unwrap_err()
                .to_string()
                .contains("no CNI configuration")
        );
        std::fs::remove_dir_all(&empty).unwrap();
    }

    #[test]
    fn daemon_plugins_are_refused_with_the_model_of_their_shape() {
        let loaded = Loaded {
            file: PathBuf::from("/etc/cni/net.d/10-calico.conflist"),
            conflist: json!({"cniVersion": "0.3.1", "name": "k8s-pod-network", "plugins": [
                {"type": "calico", "ipam": {"type": "calico-ipam"}},
                {"type": "portmap"}
            ]}),
        };
        let problem = emulation_problem(&loaded).unwrap();
        assert!(
            problem.contains("10-calico.conflist")
                && problem.contains("`calico`")
                && problem.contains("calico-np"),
            "{problem}"
        );
        let dhcp = Loaded {
            file: PathBuf::from("x.conf"),
            conflist: json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
                {"type": "macvlan", "ipam": {"type": "dhcp"}}
            ]}),
        };
        assert!(emulation_problem(&dhcp).unwrap().contains("dhcp"));
        let fine = Loaded {
            file: PathBuf::from("x.conf"),
            conflist: json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
                {"type": "bridge", "ipam": {"type": "host-local"}}, {"type": "bandwidth"}
            ]}),
        };
        assert_eq!(emulation_problem(&fine), None);
    }

    #[test]
    fn plugins_are_looked_for_by_name_only() {
        assert!(find_plugin("../etc/passwd").is_err());
        let err = find_plugin("no-such-plugin-here").unwrap_err().to_string();
        assert!(err.contains("CNI_PATH"), "{err}");
    }

    #[test]
    fn check_exists_from_0_4_0() {
        assert!(!has_check("0.3.1"));
        assert!(has_check("0.4.0") && has_check("1.0.0"));
    }
}
