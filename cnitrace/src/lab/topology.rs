//! The datapaths of common CNIs built from network namespaces: two
//! hosts joined by a veth "wire", three pods (a and b on host 1, c on host 2), and per model the
//! devices, routes and rules that CNI would install. Everything is named `cnl-MODEL-*`, so
//! `lab down` finds and removes it, also after a crash.

use std::net::Ipv4Addr;

use cnitrace_common::LabRoute;
use serde::Serialize;

use crate::{error::Error, netns};
use cnitrace_netns::{LinkSettings, Ns};

/// Prefix of every namespace the lab makes.
pub const PREFIX: &str = "cnl-";

/// MTU of the host-to-host wire: room for VXLAN's 50 bytes so pods keep 1500.
const WIRE_MTU: u32 = 1600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Model {
    /// A bridge per host, VXLAN between hosts (L3 over the host stack).
    Flannel,
    /// Routed veths, host routes, no policy rules; native routing between hosts.
    CalicoNp,
    /// calico-np with a Calico-shaped iptables policy ruleset.
    CalicoWp,
    /// calico-np with IP-in-IP between hosts.
    CalicoIpip,
    /// tc eBPF programs redirecting pod to pod; VXLAN between hosts.
    Cilium,
    /// A bridge per host, native routing between hosts.
    KubeRouter,
    /// A bridge plus a veth pair to an overlay bridge with VXLAN (flat L2).
    Weave,
    /// Pods' veths on a kernel Open vSwitch datapath programmed with flows, VXLAN between
    /// hosts (Antrea's and OVN-Kubernetes' datapath).
    Ovs,
    /// The CNI reference plugins: bridge + host-local + firewall + portmap (the containerd
    /// and podman default); native routing between hosts.
    CniBridge,
    /// The CNI reference plugins: ptp (routed veths, /32 host routes) + host-local +
    /// firewall; native routing between hosts.
    CniPtp,
    /// The CNI reference plugins: macvlan (bridge mode) on the host's uplink + host-local;
    /// pods on one L2 segment across hosts.
    CniMacvlan,
    /// The CNI reference plugins: ipvlan (L2 mode) on the host's uplink + host-local.
    CniIpvlan,
    /// cni-bridge with the bandwidth plugin limiting each pod both ways (tc: a tbf qdisc on
    /// the host's veth, an ifb device for the pod's egress).
    CniBandwidth,
    /// A configuration list of the user's (`--cni-conf`), run by the plugins installed here;
    /// two pods on one host (a node's IPAM hands every host the same range).
    #[value(skip)]
    CniConf,
}

impl Model {
    pub const ALL: [Model; 8] = [
        Model::Flannel,
        Model::CalicoNp,
        Model::CalicoWp,
        Model::CalicoIpip,
        Model::Cilium,
        Model::KubeRouter,
        Model::Weave,
        Model::Ovs,
    ];

    /// Models whose datapath the real CNI plugins make (run by the lab as a CNI runtime).
    pub const CNI: [Model; 5] = [
        Model::CniBridge,
        Model::CniPtp,
        Model::CniMacvlan,
        Model::CniIpvlan,
        Model::CniBandwidth,
    ];

    /// Every model, shaped or made by plugins: [`Model::ALL`] then [`Model::CNI`].
    pub const EVERY: [Model; 14] = {
        let mut every = [Model::CniConf; 14];
        let mut i = 0;
        while i < Model::ALL.len() {
            every[i] = Model::ALL[i];
            i += 1;
        }
        while i < Model::ALL.len() + Model::CNI.len() {
            every[i] = Model::CNI[i - Model::ALL.len()];
            i += 1;
        }
        every
    };

    /// The built-in configuration list the model runs, if the plugins make it.
    pub fn cni(self) -> Option<super::cni::BuiltIn> {
        match self {
            Model::CniBridge => Some(super::cni::BuiltIn::Bridge),
            Model::CniPtp => Some(super::cni::BuiltIn::Ptp),
            Model::CniMacvlan => Some(super::cni::BuiltIn::Macvlan),
            Model::CniIpvlan => Some(super::cni::BuiltIn::Ipvlan),
            Model::CniBandwidth => Some(super::cni::BuiltIn::Bandwidth),
            Model::CniConf => Some(super::cni::BuiltIn::User),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Model::Flannel => "flannel",
            Model::CalicoNp => "calico-np",
            Model::CalicoWp => "calico-wp",
            Model::CalicoIpip => "calico-ipip",
            Model::Cilium => "cilium",
            Model::KubeRouter => "kube-router",
            Model::Weave => "weave",
            Model::Ovs => "ovs",
            Model::CniBridge => "cni-bridge",
            Model::CniPtp => "cni-ptp",
            Model::CniMacvlan => "cni-macvlan",
            Model::CniIpvlan => "cni-ipvlan",
            Model::CniBandwidth => "cni-bandwidth",
            Model::CniConf => "cni-conf",
        }
    }

    /// Host-side name of a pod's veth, as the CNI names it (Calico's policy matches `cali+`).
    fn host_veth(self, pod: char) -> String {
        match self {
            Model::CalicoNp | Model::CalicoWp | Model::CalicoIpip => format!("cali{pod}"),
            Model::Cilium => format!("lxc{pod}"),
            Model::Flannel
            | Model::KubeRouter
            | Model::Weave
            | Model::Ovs
            | Model::CniBridge
            | Model::CniPtp
            | Model::CniMacvlan
            | Model::CniIpvlan
            | Model::CniBandwidth
            | Model::CniConf => format!("veth{pod}"),
        }
    }

    fn bridge(self) -> Option<&'static str> {
        match self {
            Model::Flannel => Some("cni0"),
            Model::KubeRouter => Some("kube-bridge"),
            Model::Weave => Some("weave"),
            _ => None,
        }
    }

    fn routed(self) -> bool {
        matches!(
            self,
            Model::CalicoNp | Model::CalicoWp | Model::CalicoIpip | Model::Cilium
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// Pod to pod on one host.
    Intra,
    /// Pod to pod across the two hosts.
    Inter,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Intra => "intra",
            Scenario::Inter => "inter",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub letter: char,
    /// The pod's network namespace.
    pub netns: String,
    pub ip: Ipv4Addr,
    /// 1 or 2.
    pub host: u8,
}

/// A lab that is up.
#[derive(Debug, Clone)]
pub struct Lab {
    pub model: Model,
    pub pods: Vec<Pod>,
}

impl Lab {
    pub fn client(&self) -> &Pod {
        &self.pods[0]
    }

    pub fn server(&self, scenario: Scenario) -> &Pod {
        match scenario {
            Scenario::Intra => &self.pods[1],
            Scenario::Inter => &self.pods[2],
        }
    }

    pub fn host_netns(&self, host: u8) -> String {
        host_name(self.model, host)
    }
}

fn host_name(model: Model, host: u8) -> String {
    format!("{PREFIX}{}-h{host}", model.name())
}

fn pod_name(model: Model, letter: char) -> String {
    format!("{PREFIX}{}-{letter}", model.name())
}

fn wire_ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, host)
}

fn pod_ip(host: u8, index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, host, index)
}

/// Pod MACs, fixed so routes and neighbours can be written before devices exist.
fn pod_mac(letter: char) -> [u8; 6] {
    [0x02, 0x77, 0, 0, letter as u8, 0x02]
}

fn host_veth_mac(model: Model, letter: char) -> [u8; 6] {
    if matches!(model, Model::CalicoNp | Model::CalicoWp | Model::CalicoIpip) {
        [0xee; 6] // Calico gives every host-side veth this MAC.
    } else {
        [0x02, 0x77, 0, 0, letter as u8, 0x01]
    }
}

fn tunnel_mac(host: u8) -> [u8; 6] {
    [0x02, 0x77, 0, 0xff, host, 0x01]
}

/// The gateway address routed pods use (Calico's and Cilium's link-local next hop).
const LINK_LOCAL_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The namespaces of any lab that exists, found by prefix.
pub fn existing() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(netns::NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.starts_with(PREFIX))
        .collect();
    names.sort();
    names
}

/// The model of the lab that is up, if one is.
pub fn current() -> Option<Lab> {
    let names = existing();
    let model = Model::EVERY
        .into_iter()
        .find(|m| names.contains(&host_name(*m, 1)))?;
    Some(Lab {
        model,
        pods: pods(model),
    })
}

fn pods(model: Model) -> Vec<Pod> {
    let layout: &[(char, u8, u8)] = if model == Model::CniConf {
        &[('a', 1, 2), ('b', 1, 3)]
    } else {
        &[('a', 1, 2), ('b', 1, 3), ('c', 2, 2)]
    };
    let recorded = if model == Model::CniConf {
        super::cni::recorded()
    } else {
        Vec::new()
    };
    layout
        .iter()
        .map(|&(letter, host, index)| {
            let netns = pod_name(model, letter);
            // A user's IPAM chooses the address: the one its ADD result gave, once there is one.
            let ip = if model == Model::CniConf {
                recorded
                    .iter()
                    .find(|a| a.netns == netns)
                    .and_then(|a| super::cni::result_ipv4(&a.result))
                    .unwrap_or(Ipv4Addr::UNSPECIFIED)
            } else {
                pod_ip(host, index)
            };
            Pod {
                letter,
                netns,
                ip,
                host,
            }
        })
        .collect()
}

/// Builds the lab of a user's configuration list (`--cni-conf`): what one machine cannot run
/// is refused before anything is made.
pub async fn up_with_conf(loaded: &crate::cni_config::Loaded) -> Result<Lab, Error> {
    if let Some(lab) = current() {
        return Err(Error::InvalidArgument(format!(
            "a lab is already up ({}); run `cnitrace lab down` first",
            lab.model.name()
        )));
    }
    if let Err(e) = super::cni::store_user(loaded) {
        super::cni::remove_all();
        return Err(e);
    }
    up(Model::CniConf).await
}

/// Why a scenario cannot be run on a model, if it cannot.
pub fn scenario_unavailable(model: Model, scenario: Scenario) -> Option<String> {
    match (model, scenario) {
        (Model::CniConf, Scenario::Inter) => Some(
            "a node's configuration is one node's: its IPAM would hand both lab hosts the same \
             range, so only pods on one host are measured"
                .to_owned(),
        ),
        _ => None,
    }
}

/// Removes every lab namespace and what runs and lives in it ([`cnitrace_netns::remove`]).
pub async fn down() -> Result<Vec<String>, Error> {
    // Plugins first, while the namespaces they made interfaces in still exist: their DEL
    // releases the IPAM leases and removes their rules.
    for failure in super::cni::remove_all() {
        tracing::warn!("removing the CNI plugins' attachments: {failure}");
    }
    let names = existing();
    for name in &names {
        cnitrace_netns::remove(name).await?;
    }
    Ok(names)
}

/// Whether the kernel can make IP-in-IP devices (the `ipip` module or built in).
pub fn ipip_available() -> bool {
    std::path::Path::new("/sys/module/ipip").exists()
        || std::fs::read_to_string("/proc/modules").is_ok_and(|m| m.contains("ipip "))
        || has_module_file("ipip")
}

/// Whether the kernel has a driver (macvlan, ipvlan, openvswitch): built in or loaded (its
/// functions are in /proc/kallsyms, or /sys/module has it), or a module file modprobe can load.
fn has_driver(module: &str) -> bool {
    let release = crate::window::kernel_release();
    let prefix = format!(" {module}_");
    std::fs::read_to_string("/proc/kallsyms").is_ok_and(|k| k.contains(&prefix))
        || std::path::Path::new(&format!("/sys/module/{module}")).exists()
        || std::fs::read_to_string(format!("/lib/modules/{release}/modules.builtin"))
            .is_ok_and(|m| m.contains(&format!("/{module}.ko")))
        || std::fs::read_to_string(format!("/lib/modules/{release}/modules.dep"))
            .is_ok_and(|m| m.contains(&format!("/{module}.ko")))
}

fn has_module_file(module: &str) -> bool {
    let release = crate::window::kernel_release();
    let dir = std::path::PathBuf::from(format!("/lib/modules/{release}/kernel/net/ipv4"));
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{module}.ko"))
        })
}

/// Why a model cannot be built here, if it cannot.
pub fn unavailable_reason(model: Model) -> Option<String> {
    if model == Model::Ovs {
        return super::ovs::unavailable_reason(has_driver("openvswitch"));
    }
    for (driven, driver) in [(Model::CniMacvlan, "macvlan"), (Model::CniIpvlan, "ipvlan")] {
        if model == driven && !has_driver(driver) {
            return Some(format!(
                "unavailable on this kernel: no {driver} driver (module {driver} absent)"
            ));
        }
    }
    if let Some(kind) = model.cni() {
        let list = super::cni::builtin(kind, 1);
        let missing: Vec<String> = crate::cni_config::plugins_of(&list)
            .map(|(_, _, plugins)| plugins)
            .unwrap_or_default()
            .iter()
            .chain(std::iter::once(&serde_json::json!({"type": "host-local"})))
            .filter_map(|p| p["type"].as_str())
            .filter_map(|kind| crate::cni_config::find_plugin(kind).err())
            .map(|e| e.to_string())
            .collect();
        return (!missing.is_empty()).then(|| format!("unavailable here: {}", missing.join("; ")));
    }
    (model == Model::CalicoIpip && !ipip_available()).then(|| {
        "unavailable on this kernel: no IP-in-IP support (module ipip absent, \
         CONFIG_NET_IPIP not set)"
            .to_owned()
    })
}

/// Builds `model`. A lab that is already up is an error; a failure halfway removes what was
/// made.
pub async fn up(model: Model) -> Result<Lab, Error> {
    if let Some(reason) = unavailable_reason(model) {
        return Err(Error::InvalidArgument(format!(
            "{}: {reason}",
            model.name()
        )));
    }
    if let Some(lab) = current() {
        return Err(Error::InvalidArgument(format!(
            "a lab is already up ({}); run `cnitrace lab down` first",
            lab.model.name()
        )));
    }
    let leftovers = existing();
    if !leftovers.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "lab namespaces are left from an earlier run ({}); run `cnitrace lab down`",
            leftovers.join(", ")
        )));
    }
    match build(model).await {
        Ok(lab) => Ok(lab),
        Err(e) => {
            if let Err(cleanup) = down().await {
                tracing::warn!("removing the half-built lab: {cleanup}");
            }
            Err(e)
        }
    }
}

async fn build(model: Model) -> Result<Lab, Error> {
    let pods = pods(model);
    let host_names = [host_name(model, 1), host_name(model, 2)];
    for name in host_names.iter().chain(pods.iter().map(|p| &p.netns)) {
        cnitrace_netns::add_namespace(name).await?;
    }
    let hosts = [Ns::open(&host_names[0])?, Ns::open(&host_names[1])?];
    for host in &hosts {
        host.set_up("lo", LinkSettings::default()).await?;
        host.sysctl("net.ipv4.ip_forward", "1")?;
        if model.bridge().is_some()
            || matches!(
                model,
                Model::CniBridge | Model::CniBandwidth | Model::CniConf
            )
        {
            // What kubelet's br_netfilter set-up does: bridged IPv4 goes through iptables.
            host.sysctl("net.bridge.bridge-nf-call-iptables", "1")?;
        }
    }
    // The wire: one veth pair between the hosts.
    let wire = LinkSettings {
        mtu: Some(WIRE_MTU),
        ..LinkSettings::default()
    };
    let renamed = LinkSettings {
        rename: Some("wire"),
        ..wire
    };
    hosts[0]
        .add_veth_into("wire", wire, &hosts[1], "wire2", renamed)
        .await?;
    for (index, host) in hosts.iter().enumerate() {
        host.add_address("wire", wire_ip(index as u8 + 1), 24)
            .await?;
    }
    for pod in &pods {
        if let Some(kind) = model.cni() {
            add_pod_by_plugins(model, kind, &host_names[usize::from(pod.host) - 1], pod).await?;
        } else {
            add_pod(model, &hosts[usize::from(pod.host) - 1], pod).await?;
        }
    }
    for (index, host) in hosts.iter().enumerate() {
        let n = index as u8 + 1;
        let other = 3 - n;
        match model {
            Model::Flannel | Model::Cilium => {
                let device = if model == Model::Flannel {
                    "flannel.1"
                } else {
                    "cilium_vxlan"
                };
                host.add_vxlan(device, 1, 8472, wire_ip(n), wire_ip(other), tunnel_mac(n))
                    .await?;
                host.set_up(device, LinkSettings::default()).await?;
                host.add_address(device, pod_ip(n, 0), 32).await?;
                host.add_route(pod_ip(other, 0), 24, device, Some(pod_ip(other, 0)))
                    .await?;
                host.add_neighbour(device, pod_ip(other, 0), tunnel_mac(other))
                    .await?;
            }
            Model::CalicoNp
            | Model::CalicoWp
            | Model::KubeRouter
            | Model::CniBridge
            | Model::CniBandwidth
            | Model::CniPtp => {
                host.add_route(pod_ip(other, 0), 24, "wire", Some(wire_ip(other)))
                    .await?;
            }
            // One L2 segment over the wire, or (ovs) over the datapaths' VXLAN ports: nothing
            // to route. A user's list has pods on one host only.
            Model::CniMacvlan | Model::CniIpvlan | Model::CniConf | Model::Ovs => {}
            Model::CalicoIpip => {
                host.add_ipip("tunl1", wire_ip(n), wire_ip(other)).await?;
                host.set_up("tunl1", LinkSettings::default()).await?;
                host.add_address("tunl1", pod_ip(n, 0), 32).await?;
                host.add_route(pod_ip(other, 0), 24, "tunl1", Some(wire_ip(other)))
                    .await?;
            }
            Model::Weave => {
                // weave bridge <-> vethwe-bridge/vethwe-datapath <-> datapath bridge + VXLAN.
                host.add_bridge("datapath").await?;
                host.add_veth("vethwe-bridge", "vethwe-datapath").await?;
                host.enslave("vethwe-bridge", "weave").await?;
                host.enslave("vethwe-datapath", "datapath").await?;
                host.set_up("vethwe-bridge", LinkSettings::default())
                    .await?;
                host.set_up("vethwe-datapath", LinkSettings::default())
                    .await?;
                host.add_vxlan(
                    "vxlan-6784",
                    1,
                    6784,
                    wire_ip(n),
                    wire_ip(other),
                    tunnel_mac(n),
                )
                .await?;
                host.enslave("vxlan-6784", "datapath").await?;
                host.set_up("vxlan-6784", LinkSettings::default()).await?;
            }
        }
    }
    if model == Model::Ovs {
        for n in [1u8, 2] {
            let port = |pod: &Pod| super::ovs::PodPort {
                device: model.host_veth(pod.letter),
                mac: pod_mac(pod.letter),
            };
            let local: Vec<_> = pods.iter().filter(|p| p.host == n).map(port).collect();
            let peer = super::ovs::Peer {
                remote: wire_ip(3 - n),
                macs: pods
                    .iter()
                    .filter(|p| p.host != n)
                    .map(|p| pod_mac(p.letter))
                    .collect(),
            };
            super::ovs::build(&host_names[usize::from(n) - 1], &local, &peer)?;
        }
    }
    if matches!(model, Model::CalicoNp | Model::CalicoWp | Model::CalicoIpip) {
        for (index, host) in host_names.iter().enumerate() {
            super::policy::install_calico_policy(host, index as u8 + 1, model == Model::CalicoWp)?;
        }
    }
    // What every node of the CNI carries: kubelet's and kube-proxy's rules and the CNI's own.
    // The plugins' models carry what the plugins installed, nothing added.
    for (index, host) in host_names
        .iter()
        .enumerate()
        .filter(|_| model.cni().is_none())
    {
        let n = index as u8 + 1;
        let local: Vec<Ipv4Addr> = pods.iter().filter(|p| p.host == n).map(|p| p.ip).collect();
        let rules = super::node_rules::ruleset(
            model,
            &format!("10.77.{n}.0/24"),
            &local,
            [pods[1].ip, pods[2].ip],
        );
        // A kernel without some netfilter extension still gets its lab, said loudly: its
        // netfilter figures are then those of a node without the CNI's and kube-proxy's rules.
        if let Err(e) = super::node_rules::install(host, &rules) {
            tracing::warn!("{host}: the node's rules are not installed ({e})");
        }
    }
    if model == Model::Cilium {
        for (index, host) in hosts.iter().enumerate() {
            let n = index as u8 + 1;
            let mut routes = Vec::new();
            for pod in pods.iter().filter(|p| p.host == n) {
                let device = model.host_veth(pod.letter);
                let mut macs = [0u8; 12];
                macs[..6].copy_from_slice(&pod_mac(pod.letter));
                macs[6..].copy_from_slice(&host_veth_mac(model, pod.letter));
                routes.push((
                    pod.ip,
                    LabRoute {
                        ifindex: host.index(&device).await?,
                        macs,
                    },
                    device,
                ));
            }
            let mut devices: Vec<String> = routes.iter().map(|r| r.2.clone()).collect();
            devices.push("cilium_vxlan".to_owned());
            super::redirect::attach(
                &host.name,
                &devices,
                &routes.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            )?;
        }
    }
    let pods = if model == Model::CniConf {
        self::pods(model)
    } else {
        pods
    };
    Ok(Lab { model, pods })
}

/// A pod made by the model's plugins: its namespace's loopback up, then the configuration
/// list's ADD run in the host's namespace, asking host-local for the pod's lab address.
async fn add_pod_by_plugins(
    model: Model,
    kind: super::cni::BuiltIn,
    host: &str,
    pod: &Pod,
) -> Result<(), Error> {
    Ns::open(&pod.netns)?
        .set_up("lo", LinkSettings::default())
        .await?;
    let attachment = super::cni::Attachment {
        host: host.to_owned(),
        container_id: format!("{}-{}", model.name(), pod.letter),
        netns: pod.netns.clone(),
        ifname: "eth0".to_owned(),
        // host-local hands out the lab's address; a user's IPAM chooses its own.
        args: if model == Model::CniConf {
            "IgnoreUnknown=1".to_owned()
        } else {
            format!("IgnoreUnknown=1;IP={}", pod.ip)
        },
        conflist: super::cni::builtin(kind, pod.host),
        result: serde_json::Value::Null,
    };
    // ADD, then CHECK: the plugins confirm the pod's interface, addresses and their rules
    // are as their result says before anything is measured through them.
    tokio::task::spawn_blocking(move || {
        super::cni::add(attachment).and_then(|a| super::cni::check(&a))
    })
    .await
    .map_err(|e| Error::InvalidArgument(format!("CNI ADD task: {e}")))??;
    Ok(())
}

async fn add_pod(model: Model, host: &Ns, pod: &Pod) -> Result<(), Error> {
    let host_side = model.host_veth(pod.letter);
    let pod_side = format!("eth0{}", pod.letter);
    let ns = Ns::open(&pod.netns)?;
    ns.set_up("lo", LinkSettings::default()).await?;
    host.add_veth_into(
        &host_side,
        LinkSettings {
            mac: Some(host_veth_mac(model, pod.letter)),
            ..LinkSettings::default()
        },
        &ns,
        &pod_side,
        LinkSettings {
            rename: Some("eth0"),
            mac: Some(pod_mac(pod.letter)),
            mtu: None,
        },
    )
    .await?;
    if let Some(bridge) = model.bridge() {
        if host.index(bridge).await.is_err() {
            host.add_bridge(bridge).await?;
            if model != Model::Weave {
                host.add_address(bridge, pod_ip(pod.host, 1), 24).await?;
            }
        }
        host.enslave(&host_side, bridge).await?;
        if model == Model::Weave {
            // One flat L2 network across hosts.
            ns.add_address("eth0", pod.ip, 16).await?;
        } else {
            ns.add_address("eth0", pod.ip, 24).await?;
            ns.add_route(Ipv4Addr::UNSPECIFIED, 0, "eth0", Some(pod_ip(pod.host, 1)))
                .await?;
        }
    } else if model == Model::Ovs {
        // One L2 segment over both datapaths and the tunnel: no gateway, the pods ARP for
        // each other.
        ns.add_address("eth0", pod.ip, 16).await?;
    } else {
        debug_assert!(model.routed());
        ns.add_address("eth0", pod.ip, 32).await?;
        ns.add_route(Ipv4Addr::UNSPECIFIED, 0, "eth0", Some(LINK_LOCAL_GATEWAY))
            .await?;
        ns.add_neighbour("eth0", LINK_LOCAL_GATEWAY, host_veth_mac(model, pod.letter))
            .await?;
        host.add_route(pod.ip, 32, &host_side, None).await?;
        host.add_neighbour(&host_side, pod.ip, pod_mac(pod.letter))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_round_trip() {
        let distinct: std::collections::BTreeSet<&str> =
            Model::EVERY.iter().map(|m| m.name()).collect();
        assert_eq!(distinct.len(), Model::EVERY.len(), "every model once");
        for model in Model::EVERY {
            // The command line spells models as the report does (cni-conf is `--cni-conf`).
            if model != Model::CniConf {
                assert_eq!(
                    <Model as clap::ValueEnum>::from_str(model.name(), false),
                    Ok(model)
                );
            }
            for letter in ['a', 'b', 'c'] {
                assert!(model.host_veth(letter).len() < 16);
            }
            assert!(host_name(model, 1).starts_with(PREFIX));
        }
    }

    #[test]
    fn pods_and_scenarios() {
        let lab = Lab {
            model: Model::Flannel,
            pods: pods(Model::Flannel),
        };
        assert_eq!(lab.client().ip, Ipv4Addr::new(10, 77, 1, 2));
        assert_eq!(lab.server(Scenario::Intra).host, 1);
        assert_eq!(lab.server(Scenario::Inter).host, 2);
        assert_eq!(lab.server(Scenario::Inter).netns, "cnl-flannel-c");
    }
}
