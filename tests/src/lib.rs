//! Fixtures for privileged tests and the demo: pod pairs in network namespaces the fixture
//! creates itself, real iperf3 traffic between them, and the cnitrace binary.
//!
//! The pairs are built with the lab's own netlink code ([`cnitrace_netns`]), in namespaces
//! named `cnt-<pid>-<n>-<role>`; dropping a [`Topology`] deletes them (and with them every
//! veth, bridge and rule inside), also when a test fails halfway. [`remove_stale`] removes
//! what a crashed run left behind.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
pub use cnitrace_netns::iperf3::{Flow, Stream};
use cnitrace_netns::{LinkSettings, Ns};

/// Prefix of every namespace the fixtures create.
pub const PREFIX: &str = "cnt-";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Runs a command, failing with its stderr when it does not succeed.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let output = Command::new(program).args(args).output().with_context(|| {
        format!("cannot run {program} (is it installed? `cargo xtask bootstrap` installs it)")
    })?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Runs a command inside a named namespace.
pub fn ns_run(ns: &str, args: &[&str]) -> Result<Output> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Runs the lab's async netlink calls from the fixtures' synchronous code.
fn block_on<T>(future: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(future)
}

/// The shape of a pod pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Two pods on a Linux bridge in a node namespace, bridge-nf-call-iptables=1 and `rules`
    /// non-matching FORWARD rules (Flannel / kube-router intra-host).
    Bridged { rules: usize },
    /// Two pods routed by the node namespace's IP stack, no bridge (Calico intra-host).
    Routed,
    /// The client pod on host 1 (`node`), the server pod on host 2 (`second_node`), routed
    /// veths, the hosts joined by an underlay veth. The server pod is reachable two ways from
    /// the same namespaces: `server_ip` over a VXLAN device between the hosts (Flannel
    /// inter-host) and `server_native_ip` routed over the underlay (Calico without overlay).
    TwoHosts,
}

/// Addresses of [`Shape::TwoHosts`]. Each pod has one address per path: the client's source
/// picks the way out of host 2 for the replies, by destination alone.
mod two_hosts {
    use std::net::Ipv4Addr;

    pub const UNDERLAY: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 79, 0, 1), Ipv4Addr::new(10, 79, 0, 2)];
    /// The VXLAN devices' own addresses: the next hops of the overlay routes.
    pub const TUNNEL: [Ipv4Addr; 2] =
        [Ipv4Addr::new(10, 79, 100, 1), Ipv4Addr::new(10, 79, 100, 2)];
    /// Each host's pod gateway (on its end of the pod's veth).
    pub const GATEWAY: [Ipv4Addr; 2] =
        [Ipv4Addr::new(10, 79, 1, 254), Ipv4Addr::new(10, 79, 2, 254)];
    /// Pod addresses routed natively (subnets 10.79.1/24 and 10.79.2/24).
    pub const NATIVE: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 79, 1, 1), Ipv4Addr::new(10, 79, 2, 1)];
    /// Pod addresses routed over VXLAN (subnets 10.79.11/24 and 10.79.12/24).
    pub const OVERLAY: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 79, 11, 1), Ipv4Addr::new(10, 79, 12, 1)];
    pub const VNI: u32 = 79;
    /// The IANA VXLAN port.
    pub const PORT: u16 = 4789;
    /// Room for VXLAN's 50 bytes on the underlay, so pods and the tunnel keep 1500 and both
    /// paths carry the same segments.
    pub const UNDERLAY_MTU: u32 = 1600;
    pub const POD_MTU: u32 = 1500;

    /// Fixed tunnel MACs, so each host's neighbour entry can name the other's device.
    pub fn tunnel_mac(host: usize) -> [u8; 6] {
        [0x02, 0x79, 0, 0xff, host as u8, 0x01]
    }

    /// The /24 a pod address lives in, for routes.
    pub fn subnet(address: Ipv4Addr) -> Ipv4Addr {
        let [a, b, c, _] = address.octets();
        Ipv4Addr::new(a, b, c, 0)
    }
}

/// What every shape is built from: the pods, their hosts' ends of the veths.
struct Parts {
    node: Ns,
    /// The server pod's host: `node`, or host 2 of [`Shape::TwoHosts`].
    server_host: Ns,
    client: Ns,
    server: Ns,
    server_iface: String,
    node_server_iface: String,
}

/// A node namespace with two pod namespaces (and host 2's for [`Shape::TwoHosts`]). Dropping
/// it removes them all.
pub struct Topology {
    pub shape: Shape,
    pub node: String,
    pub client: String,
    pub server: String,
    pub server_ip: Ipv4Addr,
    /// The client pod's interface (unique name): it transmits the benchmark's data packets.
    pub client_iface: String,
    /// The node-namespace end of the client pod's veth: the benchmark's data enters the node
    /// through its ingress.
    pub node_client_iface: String,
    /// [`Shape::TwoHosts`]: host 2's namespace, where the server pod lives.
    pub second_node: Option<String>,
    /// [`Shape::TwoHosts`]: the server pod's address routed natively over the underlay
    /// (`server_ip` goes over VXLAN).
    pub server_native_ip: Option<Ipv4Addr>,
    tag: String,
    namespaces: Vec<String>,
}

impl Topology {
    pub fn new(shape: Shape) -> Result<Self> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let base = format!("{PREFIX}{pid}-{id}");
        // Interface names are global to the packet counters (keyed by name), so make them unique.
        let tag = format!("{:x}", (pid % 0xfffff) * 16 + id % 16);
        let mut topo = Topology {
            shape,
            node: format!("{base}-node"),
            client: format!("{base}-a"),
            server: format!("{base}-b"),
            server_ip: Ipv4Addr::UNSPECIFIED,
            client_iface: format!("ca{tag}"),
            node_client_iface: format!("na{tag}"),
            second_node: (shape == Shape::TwoHosts).then(|| format!("{base}-node2")),
            server_native_ip: None,
            tag,
            namespaces: Vec::new(),
        };
        // On failure the half-built topology is dropped, which removes what was made.
        block_on(topo.build())?;
        Ok(topo)
    }

    async fn build(&mut self) -> Result<()> {
        let names = [&self.node, &self.client, &self.server]
            .into_iter()
            .chain(&self.second_node)
            .cloned()
            .collect::<Vec<_>>();
        for name in names {
            cnitrace_netns::add_namespace(&name).await?;
            self.namespaces.push(name.clone());
            let ns = Ns::open(&name)?;
            quiet(&ns)?;
            ns.set_up("lo", LinkSettings::default()).await?;
        }
        let tag = &self.tag;
        let parts = Parts {
            node: Ns::open(&self.node)?,
            server_host: Ns::open(self.second_node.as_deref().unwrap_or(&self.node))?,
            client: Ns::open(&self.client)?,
            server: Ns::open(&self.server)?,
            server_iface: format!("cb{tag}"),
            node_server_iface: format!("nb{tag}"),
        };
        let Parts {
            node,
            client,
            server,
            server_iface,
            node_server_iface,
            ..
        } = &parts;
        node.add_veth_into(
            &self.node_client_iface,
            LinkSettings::default(),
            client,
            &self.client_iface,
            LinkSettings::default(),
        )
        .await?;
        parts
            .server_host
            .add_veth_into(
                node_server_iface,
                LinkSettings::default(),
                server,
                server_iface,
                LinkSettings::default(),
            )
            .await?;
        match self.shape {
            Shape::Bridged { rules } => {
                let bridge = format!("br{tag}");
                node.add_bridge(&bridge).await?;
                node.enslave(&self.node_client_iface, &bridge).await?;
                node.enslave(node_server_iface, &bridge).await?;
                client
                    .add_address(&self.client_iface, Ipv4Addr::new(10, 77, 0, 1), 24)
                    .await?;
                self.server_ip = Ipv4Addr::new(10, 77, 0, 2);
                server.add_address(server_iface, self.server_ip, 24).await?;
                node.sysctl("net.bridge.bridge-nf-call-iptables", "1")?;
                add_forward_rules(&self.node, rules)?;
                // Static neighbours: no ARP probe lands in one window and not in another.
                let client_ip = Ipv4Addr::new(10, 77, 0, 1);
                let server_mac = server.mac(server_iface).await?;
                let client_mac = client.mac(&self.client_iface).await?;
                client
                    .add_neighbour(&self.client_iface, self.server_ip, server_mac)
                    .await?;
                server
                    .add_neighbour(server_iface, client_ip, client_mac)
                    .await?;
            }
            Shape::Routed => {
                node.sysctl("net.ipv4.ip_forward", "1")?;
                let (client_gateway, server_gateway) =
                    (Ipv4Addr::new(10, 78, 1, 254), Ipv4Addr::new(10, 78, 2, 254));
                node.add_address(&self.node_client_iface, client_gateway, 24)
                    .await?;
                node.add_address(node_server_iface, server_gateway, 24)
                    .await?;
                client
                    .add_address(&self.client_iface, Ipv4Addr::new(10, 78, 1, 1), 24)
                    .await?;
                self.server_ip = Ipv4Addr::new(10, 78, 2, 1);
                server.add_address(server_iface, self.server_ip, 24).await?;
                client
                    .add_route(
                        Ipv4Addr::UNSPECIFIED,
                        0,
                        &self.client_iface,
                        Some(client_gateway),
                    )
                    .await?;
                server
                    .add_route(Ipv4Addr::UNSPECIFIED, 0, server_iface, Some(server_gateway))
                    .await?;
            }
            Shape::TwoHosts => self.two_hosts(&parts).await?,
        }
        Ok(())
    }

    /// [`Shape::TwoHosts`]: pods and hosts addressed, the underlay, the tunnel, and a route
    /// per path on each host.
    async fn two_hosts(&mut self, parts: &Parts) -> Result<()> {
        use two_hosts::{NATIVE, OVERLAY};
        self.server_ip = OVERLAY[1];
        self.server_native_ip = Some(NATIVE[1]);
        let hosts = [&parts.node, &parts.server_host];
        for host in hosts {
            host.sysctl("net.ipv4.ip_forward", "1")?;
        }
        pod_side(&parts.client, &self.client_iface, 0).await?;
        pod_side(&parts.server, &parts.server_iface, 1).await?;
        host_side(
            hosts[0],
            &parts.client,
            &self.client_iface,
            &self.node_client_iface,
            0,
        )
        .await?;
        host_side(
            hosts[1],
            &parts.server,
            &parts.server_iface,
            &parts.node_server_iface,
            1,
        )
        .await?;
        let underlay = [format!("w1{}", self.tag), format!("w2{}", self.tag)];
        let mtu = LinkSettings {
            mtu: Some(two_hosts::UNDERLAY_MTU),
            ..LinkSettings::default()
        };
        hosts[0]
            .add_veth_into(&underlay[0], mtu, hosts[1], &underlay[1], mtu)
            .await?;
        let tunnels = [format!("x1{}", self.tag), format!("x2{}", self.tag)];
        for (n, host) in hosts.into_iter().enumerate() {
            let other = 1 - n;
            let peer_mac = hosts[other].mac(&underlay[other]).await?;
            host.add_address(&underlay[n], two_hosts::UNDERLAY[n], 24)
                .await?;
            host.add_neighbour(&underlay[n], two_hosts::UNDERLAY[other], peer_mac)
                .await?;
            // Native: the other pod's subnet via the other host's underlay address.
            host.add_route(
                two_hosts::subnet(NATIVE[other]),
                24,
                &underlay[n],
                Some(two_hosts::UNDERLAY[other]),
            )
            .await?;
            tunnel(host, &tunnels[n], n).await?;
        }
        Ok(())
    }

    /// Adds `count` more pods to a bridged topology (10.77.0.10 upwards); returns their
    /// namespaces and addresses. They are removed with the topology.
    pub fn add_pods(&mut self, count: usize) -> Result<Vec<(String, Ipv4Addr)>> {
        if !matches!(self.shape, Shape::Bridged { .. }) || count > 200 {
            bail!("extra pods need a bridged topology (and at most 200)");
        }
        block_on(async {
            let node = Ns::open(&self.node)?;
            let bridge = format!("br{}", self.tag);
            let mut pods = Vec::with_capacity(count);
            for i in 0..count {
                let name = format!("{}-p{i}", self.node.trim_end_matches("-node"));
                cnitrace_netns::add_namespace(&name).await?;
                self.namespaces.push(name.clone());
                let pod = Ns::open(&name)?;
                pod.set_up("lo", LinkSettings::default()).await?;
                let (node_if, pod_if) = (format!("p{i}{}", self.tag), format!("q{i}{}", self.tag));
                node.add_veth_into(
                    &node_if,
                    LinkSettings::default(),
                    &pod,
                    &pod_if,
                    LinkSettings::default(),
                )
                .await?;
                node.enslave(&node_if, &bridge).await?;
                let ip = Ipv4Addr::new(10, 77, 0, 10 + u8::try_from(i)?);
                pod.add_address(&pod_if, ip, 24).await?;
                pods.push((name, ip));
            }
            Ok(pods)
        })
    }

    /// Starts an iperf3 TCP stream from the client pod to the server pod for `seconds`.
    pub fn start_iperf3(&self, seconds: u32) -> Result<Stream> {
        Ok(Flow::new(&self.client, &self.server, self.server_ip, seconds).start()?)
    }

    /// [`Topology::start_iperf3`] with more client arguments (`-b 2G` for a fixed load).
    pub fn start_iperf3_with(&self, seconds: u32, client_args: &[&str]) -> Result<Stream> {
        Ok(
            Flow::new(&self.client, &self.server, self.server_ip, seconds)
                .client_args(client_args)
                .start()?,
        )
    }

    /// Profiles `seconds` of iperf3 traffic from the client pod with `cnitrace profile`,
    /// counting packets on the client pod's interface, and returns the JSON breakdown.
    pub fn profile_traffic(&self, seconds: u32) -> Result<serde_json::Value> {
        self.profile_traffic_with(seconds, &[])
    }

    /// [`Topology::profile_traffic`] with more `profile` arguments (`--stacks`, ...).
    pub fn profile_traffic_with(&self, seconds: u32, extra: &[&str]) -> Result<serde_json::Value> {
        let traffic = self.start_iperf3(seconds + 3)?;
        thread::sleep(Duration::from_millis(700));
        let out = Command::new(cnitrace_bin())
            .args([
                "profile",
                "--duration",
                &seconds.to_string(),
                "--format",
                "json",
            ])
            .args(["--iface", &self.client_iface, "--netns", &self.client])
            .args(extra)
            .output()
            .context("run cnitrace")?;
        let gbps = traffic.finish()?;
        if !out.status.success() {
            bail!("cnitrace failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        eprintln!("iperf3: {gbps:.1} Gbit/s");
        serde_json::from_slice(&out.stdout).context("JSON breakdown")
    }
}

/// A pod of [`Shape::TwoHosts`]: both its addresses, its gateway (a static neighbour) and
/// a route per path, the overlay one with the overlay source so the replies come back
/// through the tunnel.
async fn pod_side(pod: &Ns, iface: &str, n: usize) -> Result<()> {
    use two_hosts::{GATEWAY, NATIVE, OVERLAY};
    pod.add_address(iface, NATIVE[n], 24).await?;
    pod.add_address(iface, OVERLAY[n], 24).await?;
    pod.add_route(Ipv4Addr::UNSPECIFIED, 0, iface, Some(GATEWAY[n]))
        .await?;
    ns_run(
        &pod.name,
        &[
            "ip",
            "route",
            "add",
            &format!("{}/24", two_hosts::subnet(OVERLAY[1 - n])),
            "via",
            &GATEWAY[n].to_string(),
            "dev",
            iface,
            "src",
            &OVERLAY[n].to_string(),
            "onlink",
        ],
    )?;
    Ok(())
}

/// A host's end of a [`Shape::TwoHosts`] pod: the gateway address, the pod's overlay
/// subnet on the link, static neighbours both ways.
async fn host_side(host: &Ns, pod: &Ns, pod_iface: &str, host_iface: &str, n: usize) -> Result<()> {
    use two_hosts::{GATEWAY, NATIVE, OVERLAY};
    host.add_address(host_iface, GATEWAY[n], 24).await?;
    host.add_route(two_hosts::subnet(OVERLAY[n]), 24, host_iface, None)
        .await?;
    let (pod_mac, host_mac) = (pod.mac(pod_iface).await?, host.mac(host_iface).await?);
    for address in [NATIVE[n], OVERLAY[n]] {
        host.add_neighbour(host_iface, address, pod_mac).await?;
    }
    pod.add_neighbour(pod_iface, GATEWAY[n], host_mac).await?;
    Ok(())
}

/// Host `n`'s VXLAN device of [`Shape::TwoHosts`] (remote: the other host's underlay
/// address), addressed, and the other pod's overlay subnet routed through it.
async fn tunnel(host: &Ns, device: &str, n: usize) -> Result<()> {
    use two_hosts::{OVERLAY, TUNNEL, UNDERLAY, tunnel_mac};
    let other = 1 - n;
    host.add_vxlan(
        device,
        two_hosts::VNI,
        two_hosts::PORT,
        UNDERLAY[n],
        UNDERLAY[other],
        tunnel_mac(n),
    )
    .await?;
    let mtu = LinkSettings {
        mtu: Some(two_hosts::POD_MTU),
        ..LinkSettings::default()
    };
    host.set_up(device, mtu).await?;
    host.add_address(device, TUNNEL[n], 32).await?;
    host.add_route(
        two_hosts::subnet(OVERLAY[other]),
        24,
        device,
        Some(TUNNEL[other]),
    )
    .await?;
    // The inner frame's destination: the other tunnel device, which drops any other MAC.
    host.add_neighbour(device, TUNNEL[other], tunnel_mac(other))
        .await?;
    Ok(())
}

/// A namespace that sends nothing on its own: IPv6 off before any device arrives (no duplicate
/// address detection, router solicitation or MLD report), so the devices carry only what a test
/// sends and packet counts taken by two windows at slightly different times agree.
fn quiet(ns: &Ns) -> Result<()> {
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    Ok(())
}

fn add_forward_rules(ns: &str, rules: usize) -> Result<()> {
    if rules == 0 {
        return Ok(());
    }
    // One iptables-restore call: thousands of `iptables -A` calls would take minutes.
    let mut script = String::from("*filter\n:FORWARD ACCEPT [0:0]\n");
    for i in 0..rules {
        // 10.200.0.0/16 never appears in the fixtures, so no rule matches and every packet
        // walks all of them.
        let _ = writeln!(
            script,
            "-A FORWARD -s 10.200.{}.{}/32 -j DROP",
            (i / 250) % 250,
            i % 250 + 1
        );
    }
    script.push_str("COMMIT\n");
    let out =
        cnitrace_netns::output_in(Some(ns), "iptables-restore", &["--noflush"], Some(&script))?
            .context("cannot run iptables-restore (is iptables installed?)")?;
    if !out.status.success() {
        bail!(
            "iptables-restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Drop for Topology {
    fn drop(&mut self) {
        let namespaces = std::mem::take(&mut self.namespaces);
        // Ends what still runs inside (iperf3 servers), then deletes each namespace.
        let _ = block_on(async {
            for name in namespaces.iter().rev() {
                let _ = cnitrace_netns::remove(name).await;
            }
            Ok(())
        });
    }
}

/// Deletes fixture namespaces whose creating process is gone (left by a crash or kill -9).
pub fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(cnitrace_netns::NETNS_DIR) else {
        return;
    };
    let stale: Vec<String> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| {
            name.strip_prefix(PREFIX).is_some_and(|rest| {
                !rest
                    .split('-')
                    .next()
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| PathBuf::from(format!("/proc/{pid}")).exists())
            })
        })
        .collect();
    let _ = block_on(async {
        for name in &stale {
            let _ = cnitrace_netns::remove(name).await;
        }
        Ok(())
    });
}

/// The cnitrace binary: $CNITRACE_BIN, else target/debug/cnitrace in this workspace.
pub fn cnitrace_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CNITRACE_BIN") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/cnitrace");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p cnitrace` (`cargo xtask test` does), or set CNITRACE_BIN",
        path.display()
    );
    path
}

/// Names of loaded BPF programs that belong to cnitrace, per `bpftool prog show`.
pub fn loaded_cnitrace_programs() -> Result<Vec<String>> {
    let out = run("bpftool", &["prog", "show"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("name cnitrace"))
        .map(str::to_owned)
        .collect())
}

/// cnitrace programs still loaded after waiting up to 3 s: the kernel frees a program in
/// deferred work after its last descriptor closes, so "gone" can lag the process exit a little.
pub fn programs_left_after_exit() -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = loaded_cnitrace_programs()?;
        if left.is_empty() || Instant::now() > deadline {
            return Ok(left);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Profilers, agents and iperf3 runs of one test would disturb another's figures and leftover
/// checks: privileged tests in one binary take this lock to run one at a time.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether privileged tests can run. When they cannot, says why; under
/// CNITRACE_REQUIRE_PRIVILEGED=1 (set by `cargo xtask test`) that is a failure, not a skip.
pub fn privileged(test: &str) -> bool {
    let is_root = is_root();
    if is_root {
        return true;
    }
    let reason = format!("{test}: skipped: needs root (real BPF programs and network namespaces)");
    assert!(
        std::env::var_os("CNITRACE_REQUIRE_PRIVILEGED").is_none(),
        "{reason}, but CNITRACE_REQUIRE_PRIVILEGED is set"
    );
    eprintln!("{reason}");
    false
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A fresh random token: 32 hex digits from the kernel's random source.
pub fn random_token() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut random) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut random, &mut bytes);
    }
    bytes.iter().fold(String::new(), |mut hex, b| {
        let _ = std::fmt::Write::write_fmt(&mut hex, format_args!("{b:02x}"));
        hex
    })
}

/// Writes a token where only root can read it: a fresh 0700 directory of its own, not a
/// predictable path in the shared temporary directory. The directory goes with the file.
pub fn private_token_file(tag: &str, token: &str) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let dir = std::env::temp_dir().join(format!("cnitrace-{tag}-{}", random_token()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("token");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes())?;
    Ok(path)
}

/// A running `cnitrace agent` on a free loopback port; SIGTERM on drop.
pub struct AgentProcess {
    pub url: String,
    pub token: String,
    child: Option<Child>,
    pub token_file: PathBuf,
}

impl AgentProcess {
    /// Starts an agent with a fresh token and waits until /healthz answers.
    pub fn start(extra_args: &[&str], envs: &[(&str, &str)]) -> Result<Self> {
        Self::launch(None, extra_args, envs)
    }

    /// Starts an agent that accepts `token`.
    pub fn start_with_token(token: &str, envs: &[(&str, &str)]) -> Result<Self> {
        Self::launch(Some(token), &[], envs)
    }

    /// Starts a given binary (e.g. the release build) with a fresh token.
    pub fn start_binary(binary: &std::path::Path, envs: &[(&str, &str)]) -> Result<Self> {
        Self::launch_binary(binary, None, None, &[], envs)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts an agent listening on `listen` (e.g. "127.0.0.2:9999") that accepts `token`.
    pub fn start_at(listen: &str, token: &str, envs: &[(&str, &str)]) -> Result<Self> {
        Self::launch_binary(&cnitrace_bin(), Some(token), Some(listen), &[], envs)
    }

    fn launch(token: Option<&str>, extra_args: &[&str], envs: &[(&str, &str)]) -> Result<Self> {
        Self::launch_binary(&cnitrace_bin(), token, None, extra_args, envs)
    }

    fn launch_binary(
        binary: &std::path::Path,
        token: Option<&str>,
        listen: Option<&str>,
        extra_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Self> {
        let listen = match listen {
            Some(listen) => listen.to_owned(),
            None => format!(
                "127.0.0.1:{}",
                std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port()
            ),
        };
        let port: u16 = listen
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .context("listen port")?;
        let token = token.map_or_else(random_token, str::to_owned);
        let token_file = private_token_file(&format!("agent-{port}"), &token)?;
        let mut command = Command::new(binary);
        command
            .args(["agent", "--listen", &listen, "--token-file"])
            .arg(&token_file)
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            command.env(k, v);
        }
        let child = command.spawn().context("start cnitrace agent")?;
        let agent = Self {
            url: format!("http://{listen}"),
            token,
            child: Some(child),
            token_file,
        };
        wait_until_ok(&format!("{}/healthz", agent.url), Duration::from_secs(15))?;
        Ok(agent)
    }

    /// A request with the bearer token; returns status and body text.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, String)> {
        http(
            method,
            &format!("{}{path}", self.url),
            Some(&self.token),
            body,
        )
    }

    /// Waits for an agent the test killed itself.
    pub fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> Result<std::process::ExitStatus> {
        let child = self.child.take().context("already stopped")?;
        run("kill", &["-TERM", &child.id().to_string()])?;
        Ok(child.wait_with_output()?.status)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.token_file);
        if let Some(dir) = self.token_file.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// One request to an agent: GET, or POST with a JSON body (without one, an empty body with a
/// JSON content type, which the agent requires of every POST), with the bearer token when
/// given. Returns the status and the body text, whatever the status.
pub fn http(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Result<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut response = if method == "GET" {
        let mut request = agent.get(url);
        if let Some(auth) = &auth {
            request = request.header("Authorization", auth);
        }
        request.call()?
    } else {
        let mut request = agent.post(url);
        if let Some(auth) = &auth {
            request = request.header("Authorization", auth);
        }
        match body {
            Some(body) => request.send_json(body)?,
            None => request
                .header("Content-Type", "application/json")
                .send_empty()?,
        }
    };
    let status = response.status().as_u16();
    Ok((status, response.body_mut().read_to_string()?))
}

/// Polls `url` with GET until it answers 200 (an agent's /healthz once it has started), for at
/// most `timeout`.
pub fn wait_until_ok(url: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if http("GET", url, None, None).is_ok_and(|(status, _)| status == 200) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("{url} did not answer 200 within {} s", timeout.as_secs())
}

/// `$(NAME)` replaced as the kubelet does in a container's args: by the container's variable
/// of that name (left as written when there is none); `$$` is a literal `$`.
pub fn expand_kubernetes_vars(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().find(|(key, _)| key == name) {
                Some((_, value)) => out.push_str(value),
                None => out.push_str(&rest[i..i + 3 + end]),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn args_are_expanded_as_the_kubelet_does() {
        let env = [("HOST_IP".to_owned(), "10.0.0.7".to_owned())];
        assert_eq!(
            super::expand_kubernetes_vars("$(HOST_IP):9560", &env),
            "10.0.0.7:9560"
        );
        assert_eq!(
            super::expand_kubernetes_vars("[$(HOST_IP)]:9560", &env),
            "[10.0.0.7]:9560"
        );
        assert_eq!(
            super::expand_kubernetes_vars("$(NOPE):1", &env),
            "$(NOPE):1"
        );
        assert_eq!(
            super::expand_kubernetes_vars("$$(HOST_IP) $x $(", &env),
            "$(HOST_IP) $x $("
        );
    }
}
