//! The agent as a real process: sessions over HTTP around real iperf3 traffic, Prometheus
//! metrics, `collect` across two agents, and a clean SIGTERM.

use std::{process::Command, thread, time::Duration};

use cnitrace_tests::{
    AgentProcess, Shape, Topology, cnitrace_bin, http, privileged, programs_left_after_exit,
    remove_stale, run,
};
use serde_json::{Value, json};

fn component_cycles(b: &Value, name: &str) -> u64 {
    b["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()["cycles"]
        .as_u64()
        .unwrap()
}

#[test]
fn agent_session_round_trip_metrics_and_sigterm() {
    if !privileged("agent_session_round_trip_metrics_and_sigterm") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let topo = Topology::new(Shape::Bridged { rules: 50 }).expect("topology");
    let agent = AgentProcess::start(&[], &[("NODE_NAME", "node-under-test")]).expect("agent");
    let (status, body) = agent.request("GET", "/api/v1/node", None).unwrap();
    assert_eq!(status, 200, "{body}");
    // A scraper's first scrape starts its measurement: a baseline, no counters yet.
    let (status, text) = agent.request("GET", "/metrics", None).unwrap();
    assert_eq!(status, 200);
    assert!(!text.contains("cnitrace_component_cycles_total{"), "{text}");
    let traffic = topo.start_iperf3(5).expect("iperf3");
    thread::sleep(Duration::from_millis(700));
    // The node namespace holds the 50 FORWARD rules: naming it has the agent read its ruleset.
    let request = json!({"ifaces": [topo.client_iface], "netns": [topo.client, topo.node]});
    let (status, body) = agent
        .request("POST", "/api/v1/sessions", Some(&request))
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_u64()
        .unwrap();
    thread::sleep(Duration::from_secs(3));
    let (status, body) = agent
        .request("POST", &format!("/api/v1/sessions/{id}/stop"), None)
        .unwrap();
    traffic.finish().expect("iperf3 result");
    assert_eq!(status, 200, "{body}");
    let view: Value = serde_json::from_str(&body).unwrap();
    let b = &view["breakdown"];
    assert_eq!(b["node"], "node-under-test", "NODE_NAME is reported");
    assert!(
        component_cycles(b, "bridge") > 0,
        "bridge cost: {}",
        b["components"]
    );
    assert!(component_cycles(b, "netfilter") > 0);
    assert!(b["packets"]["count"].as_u64().unwrap() > 10_000);
    assert_eq!(b["packets"]["interfaces"][0], topo.client_iface.as_str());
    // A session takes the same window path as `profile`: the rulesets read around it give
    // the FORWARD hook its chains and rules.
    let forward = b["netfilter"]["chains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["netns"] == topo.node.as_str() && c["hook"] == "FORWARD" && c["table"] == "filter"
        })
        .unwrap_or_else(|| panic!("no FORWARD chain walk: {}", b["netfilter"]));
    assert!(
        forward["rules"].as_u64().unwrap() >= 50,
        "rules of the node's FORWARD chain: {forward}"
    );

    let (status, text) = agent.request("GET", "/metrics", None).unwrap();
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text");
    let bridge = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "cnitrace_component_cycles_total"
                && s.labels.get("component") == Some("bridge")
        })
        .expect("bridge counter");
    // prometheus-parse reads the classic text format, where TYPE names the sample itself; in
    // OpenMetrics the family is named without `_total`, so check the TYPE line separately.
    assert!(
        matches!(bridge.value, prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) if v > 0.0),
        "{:?}",
        bridge.value
    );
    assert!(
        text.contains("# TYPE cnitrace_component_cycles counter"),
        "{text}"
    );
    assert_eq!(bridge.labels.get("node"), Some("node-under-test"));

    // Where the session's cycles went: a flame graph and folded stacks, behind the token.
    let (status, svg) = agent
        .request(
            "GET",
            &format!("/api/v1/sessions/{id}/flamegraph.svg"),
            None,
        )
        .unwrap();
    assert_eq!(status, 200, "{svg}");
    assert!(
        svg.contains("<svg") && svg.contains("br_forward"),
        "bridge frames missing"
    );
    let (status, folded) = agent
        .request("GET", &format!("/api/v1/sessions/{id}/folded"), None)
        .unwrap();
    assert_eq!(status, 200, "{folded}");
    assert!(folded.lines().any(|l| l.contains("nf_hook_slow")));
    let (status, body) = agent
        .request("GET", "/api/v1/sessions/999999/flamegraph.svg", None)
        .unwrap();
    assert_eq!(status, 404, "{body}");
    let tokenless = ureq::get(format!("{}/api/v1/sessions/{id}/folded", agent.url))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    assert_eq!(tokenless.status().as_u16(), 401);
    // `diff` reads sessions from the agent: a session against itself changes nothing.
    let token_file = cnitrace_tests::private_token_file("diff", &agent.token).unwrap();
    let id_text = id.to_string();
    let out = Command::new(cnitrace_bin())
        .args(["diff", "--agent", &agent.url, "--token-file"])
        .arg(&token_file)
        .args([&id_text, &id_text, "--format", "json"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(token_file.parent().unwrap());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let diff: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!diff["functions"].as_array().unwrap().is_empty());
    assert!(
        diff["components"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["delta_cpp"].as_f64() == Some(0.0)),
        "{diff}"
    );

    let status = agent.terminate().unwrap();
    assert!(status.success(), "SIGTERM exit: {status:?}");
    drop(topo);
    assert!(
        programs_left_after_exit().unwrap().is_empty(),
        "programs left after SIGTERM"
    );
}

#[test]
fn collect_across_two_agents_sums_them() {
    if !privileged("collect_across_two_agents_sums_them") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let topo = Topology::new(Shape::Bridged { rules: 0 }).expect("topology");
    let sender = AgentProcess::start(&[], &[("NODE_NAME", "sender")]).expect("agent 1");
    let receiver = AgentProcess::start(&[], &[("NODE_NAME", "receiver")]).expect("agent 2");
    // Both agents must accept the same token for one --token-file: give them the sender's.
    let token_file = cnitrace_tests::private_token_file("collect", &sender.token).unwrap();
    drop(receiver);
    let receiver = AgentProcess::start_with_token(&sender.token, &[("NODE_NAME", "receiver")])
        .expect("agent 2");
    let server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.server,
            "iperf3",
            "-s",
            "-1",
            "-B",
            &topo.server_ip.to_string(),
        ])
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    let out = Command::new(cnitrace_bin())
        .args([
            "collect",
            &sender.url,
            &receiver.url,
            "--format",
            "json",
            "--token-file",
        ])
        .arg(&token_file)
        .args([
            "--",
            "ip",
            "netns",
            "exec",
            &topo.client,
            "iperf3",
            "-c",
            &topo.server_ip.to_string(),
            "-t",
            "3",
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(token_file.parent().unwrap());
    drop(server);
    assert!(
        out.status.success(),
        "collect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let collected: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let nodes = collected["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(
        (nodes[0]["node"].as_str(), nodes[1]["node"].as_str()),
        (Some("sender"), Some("receiver"))
    );
    for name in ["bridge", "veth", "other"] {
        let summed = collected["sum"]["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()["cycles"]
            .as_u64()
            .unwrap();
        assert_eq!(
            summed,
            component_cycles(&nodes[0], name) + component_cycles(&nodes[1], name),
            "{name}"
        );
    }
    assert!(collected["sum"]["packets"].as_u64().unwrap() > 10_000);
    // Sessions are closed on both agents.
    for agent in [&sender, &receiver] {
        let (_, body) = agent.request("GET", "/api/v1/sessions", None).unwrap();
        let sessions: Value = serde_json::from_str(&body).unwrap();
        assert!(
            sessions
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["state"] != "running"),
            "{body}"
        );
    }
}

#[test]
fn page_draws_a_real_session_in_headless_chromium() {
    if !privileged("page_draws_a_real_session_in_headless_chromium") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let topo = Topology::new(Shape::Bridged { rules: 0 }).expect("topology");
    let agent = AgentProcess::start(&[], &[]).expect("agent");
    let traffic = topo.start_iperf3(4).expect("iperf3");
    thread::sleep(Duration::from_millis(500));
    let (status, body) = agent
        .request("POST", "/api/v1/sessions", Some(&json!({"duration_s": 2})))
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_u64()
        .unwrap();
    thread::sleep(Duration::from_secs(3));
    traffic.finish().expect("iperf3");
    let profile_dir =
        std::env::temp_dir().join(format!("cnitrace-chromium-{}", std::process::id()));
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
        ])
        .args([
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile_dir.display()))
        .args(["--virtual-time-budget=8000", "--dump-dom"])
        .arg(format!("{}/?session={id}#token={}", agent.url, agent.token))
        .output()
        .expect("chromium (cargo xtask bootstrap installs it)");
    let _ = std::fs::remove_dir_all(&profile_dir);
    let dom = String::from_utf8_lossy(&out.stdout);
    // The session's stacked bar has a segment per component with a share, bridge among them.
    let session_bar = dom
        .split("id=\"session-bar\"")
        .nth(1)
        .expect("session bar in the DOM");
    let session_bar = session_bar.split("id=\"session-legend\"").next().unwrap();
    assert!(
        session_bar.contains("data-component=\"bridge\""),
        "no bridge segment drawn: {session_bar}"
    );
    assert!(
        session_bar.contains("data-component=\"other\""),
        "no other segment drawn"
    );
    assert!(
        dom.contains(&format!("Session {id} (stopped)")),
        "session title missing"
    );
    // The session's flame graph, fetched with the token and shown in its frame.
    let frame = dom
        .split("id=\"session-flame\"")
        .nth(1)
        .expect("flame graph frame in the DOM");
    assert!(
        frame.split('>').next().unwrap().contains("src=\"blob:"),
        "the flame graph was not loaded: {}",
        dom.split("id=\"session-flame-note\"").nth(1).unwrap_or("")
    );
}

/// Kills a child process if a test fails before it stops it.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agent_over_tls_with_collect_trusting_its_certificate() {
    if !privileged("agent_over_tls_with_collect_trusting_its_certificate") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    // A private directory of its own (a key and a token go in it), removed also on failure.
    let token_file =
        cnitrace_tests::private_token_file("tls", &cnitrace_tests::random_token()).unwrap();
    let dir = token_file.parent().unwrap().to_path_buf();
    let _remove = RemoveDirAll(dir.clone());
    let (cert, key, token) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("token"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        // A server certificate, not a CA (webpki refuses a CA as the end entity).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (apt install openssl)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    std::fs::write(&token, format!("{}\n", cnitrace_tests::random_token())).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut agent = Killed(
        Command::new(cnitrace_bin())
            .args(["agent", "--listen", &listen, "--token-file"])
            .arg(&token)
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let collect = |url: &str, ca: Option<&std::path::Path>| {
        let mut command = Command::new(cnitrace_bin());
        command
            .args([
                "collect",
                url,
                "--duration",
                "1",
                "--format",
                "json",
                "--token-file",
            ])
            .arg(&token);
        if let Some(ca) = ca {
            command.arg("--ca-file").arg(ca);
        }
        command.output().unwrap()
    };
    let url = format!("https://{listen}");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let out = loop {
        let out = collect(&url, Some(&cert));
        if out.status.success() || std::time::Instant::now() > deadline {
            break out;
        }
        thread::sleep(Duration::from_millis(300));
    };
    assert!(
        out.status.success(),
        "collect over https: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let collected: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(collected["nodes"].as_array().map(Vec::len), Some(1));
    // Without trusting the certificate, and in plain HTTP, nothing is served.
    let untrusted = collect(&url, None);
    assert!(!untrusted.status.success());
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains(&listen),
        "the error names the agent: {}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
    assert!(!collect(&format!("http://{listen}"), None).status.success());
    run("kill", &["-TERM", &agent.0.id().to_string()]).unwrap();
    let status = agent.0.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "SIGTERM exit: {status:?}");
    assert!(programs_left_after_exit().unwrap().is_empty());
}

/// Two scopes of credential from files, rotated without a restart: the read-only token reads
/// metrics and is refused sessions; a new operator token replaces the old one within seconds;
/// a wrong token is counted.
#[test]
fn tokens_rotate_without_restart_and_the_read_only_one_opens_no_session() {
    if !privileged("tokens_rotate_without_restart_and_the_read_only_one_opens_no_session") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    let read_only = cnitrace_tests::random_token();
    let read_only_file = cnitrace_tests::private_token_file("read-only", &read_only).unwrap();
    let agent = AgentProcess::start(
        &["--read-only-token-file", read_only_file.to_str().unwrap()],
        &[],
    )
    .expect("agent");
    let url = |path: &str| format!("{}{path}", agent.url);
    let (status, _) = http("GET", &url("/metrics"), Some(&read_only), None).unwrap();
    assert_eq!(status, 200, "the scraper's token reads metrics");
    let (status, body) = http(
        "POST",
        &url("/api/v1/sessions"),
        Some(&read_only),
        Some(&json!({})),
    )
    .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("read-only"), "{body}");

    // Rotation: the Secret's file changes; no restart.
    let rotated = cnitrace_tests::random_token();
    std::fs::write(&agent.token_file, format!("{rotated}\n")).unwrap();
    thread::sleep(Duration::from_millis(1500));
    let (status, body) = http("GET", &url("/api/v1/sessions"), Some(&rotated), None).unwrap();
    assert_eq!(status, 200, "the new token: {body}");
    let started = std::time::Instant::now();
    let (status, _) = http("GET", &url("/api/v1/sessions"), Some(&agent.token), None).unwrap();
    assert_eq!(status, 401, "the old token is gone");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "a refusal is slowed"
    );
    let (_, text) = http("GET", &url("/metrics"), Some(&rotated), None).unwrap();
    let failures = text
        .lines()
        .find(|l| l.starts_with("cnitrace_auth_failures_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(failures.is_some_and(|f| f >= 1.0), "{text}");
    let _ = std::fs::remove_dir_all(read_only_file.parent().unwrap());
}

/// Removes a directory and what it holds on drop.
struct RemoveDirAll(std::path::PathBuf);

impl Drop for RemoveDirAll {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes an (empty) directory on drop: the test's cgroup, also when it fails.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// An agent whose memory cgroup allows less than the node needs refuses to start, saying how
/// much it needs and why, instead of meeting the OOM killer later.
#[test]
fn a_memory_limit_too_small_for_the_node_is_refused_at_start() {
    if !privileged("a_memory_limit_too_small_for_the_node_is_refused_at_start") {
        return;
    }
    // A cgroup of the test's own (v1 here; v2 where that is what the machine mounts).
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory");
    let (root, limit_file) = if v1.join("memory.limit_in_bytes").exists() {
        (v1.to_path_buf(), "memory.limit_in_bytes")
    } else {
        (std::path::PathBuf::from("/sys/fs/cgroup"), "memory.max")
    };
    let group = root.join(format!("cnitrace-test-{}", std::process::id()));
    std::fs::create_dir(&group).expect("make a memory cgroup");
    let _remove = RemoveDir(group.clone());
    std::fs::write(group.join(limit_file), "67108864").unwrap();
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} agent --listen 127.0.0.1:0",
        group.display(),
        cnitrace_bin().display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("memory limit (64 MiB)") && stderr.contains("raise the limit"),
        "{stderr}"
    );
}
