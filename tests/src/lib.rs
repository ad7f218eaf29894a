//! Fixtures for privileged tests and the demo: pod pairs in network namespaces the fixture
//! creates itself, real iperf3 traffic between them, and the cnitrace binary.
//!
//! Everything lives in namespaces named `cnt-<pid>-<n>-<role>`; dropping a [`Topology`] deletes
//! them (and with them every veth, bridge and rule inside), also when a test fails halfway.
//! [`remove_stale`] removes what a crashed run left behind.

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

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

/// The shape of a pod pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Two pods on a Linux bridge in a node namespace, bridge-nf-call-iptables=1 and `rules`
    /// non-matching FORWARD rules (Flannel / kube-router intra-host).
    Bridged { rules: usize },
    /// Two pods routed by the node namespace's IP stack, no bridge (Calico intra-host).
    Routed,
}

/// A node namespace with two pod namespaces. Dropping it removes all three.
pub struct Topology {
    pub shape: Shape,
    pub node: String,
    pub client: String,
    pub server: String,
    pub server_ip: String,
    /// The client pod's interface (unique name): it transmits the benchmark's data packets.
    pub client_iface: String,
    /// The node-namespace end of the client pod's veth: the benchmark's data enters the node
    /// through its ingress.
    pub node_client_iface: String,
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
            server_ip: String::new(),
            client_iface: format!("ca{tag}"),
            node_client_iface: format!("na{tag}"),
            tag: tag.clone(),
            namespaces: Vec::new(),
        };
        for ns in [topo.node.clone(), topo.client.clone(), topo.server.clone()] {
            run("ip", &["netns", "add", &ns])?;
            topo.namespaces.push(ns.clone());
            ns_run(&ns, &["ip", "link", "set", "lo", "up"])?;
        }
        let server_iface = format!("cb{tag}");
        let (node_a, node_b) = (topo.node_client_iface.clone(), format!("nb{tag}"));
        let (client_ns, server_ns, node_ns) =
            (topo.client.clone(), topo.server.clone(), topo.node.clone());
        for (pod_ns, pod_if, node_if) in [
            (&client_ns, &topo.client_iface, &node_a),
            (&server_ns, &server_iface, &node_b),
        ] {
            ns_run(
                &node_ns,
                &[
                    "ip", "link", "add", node_if, "type", "veth", "peer", "name", pod_if, "netns",
                    pod_ns,
                ],
            )?;
            ns_run(&node_ns, &["ip", "link", "set", node_if, "up"])?;
            ns_run(pod_ns, &["ip", "link", "set", pod_if, "up"])?;
        }
        match shape {
            Shape::Bridged { rules } => {
                let bridge = format!("br{tag}");
                ns_run(&node_ns, &["ip", "link", "add", &bridge, "type", "bridge"])?;
                ns_run(&node_ns, &["ip", "link", "set", &bridge, "up"])?;
                for node_if in [&node_a, &node_b] {
                    ns_run(&node_ns, &["ip", "link", "set", node_if, "master", &bridge])?;
                }
                ns_run(
                    &client_ns,
                    &[
                        "ip",
                        "addr",
                        "add",
                        "10.77.0.1/24",
                        "dev",
                        &topo.client_iface,
                    ],
                )?;
                ns_run(
                    &server_ns,
                    &["ip", "addr", "add", "10.77.0.2/24", "dev", &server_iface],
                )?;
                "10.77.0.2".clone_into(&mut topo.server_ip);
                ns_run(
                    &node_ns,
                    &["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"],
                )?;
                add_forward_rules(&node_ns, rules)?;
            }
            Shape::Routed => {
                ns_run(&node_ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
                ns_run(
                    &node_ns,
                    &["ip", "addr", "add", "10.78.1.254/24", "dev", &node_a],
                )?;
                ns_run(
                    &node_ns,
                    &["ip", "addr", "add", "10.78.2.254/24", "dev", &node_b],
                )?;
                ns_run(
                    &client_ns,
                    &[
                        "ip",
                        "addr",
                        "add",
                        "10.78.1.1/24",
                        "dev",
                        &topo.client_iface,
                    ],
                )?;
                ns_run(
                    &server_ns,
                    &["ip", "addr", "add", "10.78.2.1/24", "dev", &server_iface],
                )?;
                ns_run(
                    &client_ns,
                    &["ip", "route", "add", "default", "via", "10.78.1.254"],
                )?;
                ns_run(
                    &server_ns,
                    &["ip", "route", "add", "default", "via", "10.78.2.254"],
                )?;
                "10.78.2.1".clone_into(&mut topo.server_ip);
            }
        }
        Ok(topo)
    }

    /// Adds `count` more pods to a bridged topology (10.77.0.10 upwards); returns their
    /// namespaces and addresses. They are removed with the topology.
    pub fn add_pods(&mut self, count: usize) -> Result<Vec<(String, String)>> {
        if !matches!(self.shape, Shape::Bridged { .. }) || count > 200 {
            bail!("extra pods need a bridged topology (and at most 200)");
        }
        let bridge = format!("br{}", self.tag);
        let mut pods = Vec::with_capacity(count);
        for i in 0..count {
            let ns = format!("{}-p{i}", self.node.trim_end_matches("-node"));
            run("ip", &["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            let (node_if, pod_if) = (format!("p{i}{}", self.tag), format!("q{i}{}", self.tag));
            let ip = format!("10.77.0.{}", 10 + i);
            ns_run(
                &self.node,
                &[
                    "ip", "link", "add", &node_if, "type", "veth", "peer", "name", &pod_if,
                    "netns", &ns,
                ],
            )?;
            ns_run(
                &self.node,
                &["ip", "link", "set", &node_if, "master", &bridge, "up"],
            )?;
            ns_run(&ns, &["ip", "link", "set", "lo", "up"])?;
            ns_run(
                &ns,
                &["ip", "addr", "add", &format!("{ip}/24"), "dev", &pod_if],
            )?;
            ns_run(&ns, &["ip", "link", "set", &pod_if, "up"])?;
            pods.push((ns, ip));
        }
        Ok(pods)
    }

    /// Starts an iperf3 TCP stream from the client pod to the server pod for `seconds`.
    pub fn start_iperf3(&self, seconds: u32) -> Result<Traffic> {
        start_iperf3_flow(
            &self.client,
            &self.server,
            &self.server_ip,
            5201,
            seconds,
            &[],
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
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "iptables-restore", "--noflush"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run iptables-restore (is iptables installed?)")?;
    std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, script.as_bytes())?;
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
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
        // Kill anything still running inside before deleting (iperf3 servers).
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|out| {
                    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Starts an iperf3 server in `server_ns` on `port` and a client in `client_ns` with extra
/// arguments (e.g. `-P 100`, `-b 1G`); no readiness wait beyond a short pause.
pub fn start_iperf3_flow(
    client_ns: &str,
    server_ns: &str,
    server_ip: &str,
    port: u16,
    seconds: u32,
    extra: &[&str],
) -> Result<Traffic> {
    let port = port.to_string();
    let server = Command::new("ip")
        .args([
            "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server_ip, "-p", &port,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start iperf3")?;
    let mut traffic = Traffic {
        server,
        client: None,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let listening = ns_run(
            server_ns,
            &["ss", "-Hltn", "sport", "=", &format!(":{port}")],
        )
        .is_ok_and(|out| !out.stdout.is_empty());
        if listening {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let client = Command::new("ip")
        .args([
            "netns",
            "exec",
            client_ns,
            "iperf3",
            "-c",
            server_ip,
            "-p",
            &port,
            "-t",
            &seconds.to_string(),
            "-J",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the iperf3 client")?;
    traffic.client = Some(client);
    Ok(traffic)
}

/// A running iperf3 pair. Dropping it kills both ends.
pub struct Traffic {
    server: Child,
    client: Option<Child>,
}

impl Traffic {
    /// Waits for the client and returns the throughput it reported, in Gbit/s.
    pub fn finish(mut self) -> Result<f64> {
        let client = self.client.take().context("no client")?;
        let out = client.wait_with_output()?;
        let _ = self.server.kill();
        let _ = self.server.wait();
        if !out.status.success() {
            bail!(
                "iperf3 client failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
        json["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|bps| bps / 1e9)
            .context("no end.sum_received.bits_per_second in iperf3 output")
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        if let Some(mut client) = self.client.take() {
            let _ = client.kill();
            let _ = client.wait();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Deletes fixture namespaces whose creating process is gone (left by a crash or kill -9).
pub fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let owner_alive = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| PathBuf::from(format!("/proc/{pid}")).exists());
        if !owner_alive {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
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

/// A running `cnitrace agent` on a free loopback port; SIGTERM on drop.
pub struct AgentProcess {
    pub url: String,
    pub token: String,
    child: Option<Child>,
    token_file: PathBuf,
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
        let token = token.map_or_else(|| format!("t{}{port}", std::process::id()), str::to_owned);
        let token_file = std::env::temp_dir().join(format!(
            "cnitrace-token-{}-{port}",
            listen.replace([':', '.'], "_")
        ));
        std::fs::write(&token_file, format!("{token}\n"))?;
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
