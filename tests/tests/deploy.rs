//! The DaemonSet's contract with the binary: its exact arguments and environment start a working
//! agent; and `collect` finds agents through DNS (a headless Service's A records).

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use cnitrace_tests::{AgentProcess, cnitrace_bin, privileged, programs_left_after_exit};
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

const NODE: &str = "node-from-downward-api";

fn daemonset() -> Yaml {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

/// A request that may find nobody listening yet: (0, "") then.
fn http(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    cnitrace_tests::http(method, url, token, None).unwrap_or_default()
}

#[test]
fn the_daemonsets_arguments_and_environment_start_a_working_agent() {
    if !privileged("the_daemonsets_arguments_and_environment_start_a_working_agent") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    let ds = daemonset();
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true));
    assert_eq!(spec["hostPID"].as_bool(), Some(true));
    let container = &spec["containers"][0];
    let args: Vec<String> = container["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let token_path = args[args
        .iter()
        .position(|a| a == "--token-file")
        .expect("--token-file")
        + 1]
    .clone();
    let secret_mount = container["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|m| m["name"].as_str() == Some("token"))
        .unwrap()["mountPath"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        token_path.starts_with(&secret_mount),
        "the token file is in the Secret's mount"
    );
    // The environment as the kubelet builds it: fieldRef spec.nodeName becomes the node name.
    let mut env = Vec::new();
    for var in container["env"].as_vec().unwrap() {
        let name = var["name"].as_str().unwrap().to_owned();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_owned()
        } else {
            assert_eq!(
                var["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
                Some("spec.nodeName"),
                "{name}"
            );
            NODE.to_owned()
        };
        env.push((name, value));
    }
    let probe = &container["readinessProbe"]["httpGet"];
    let health = format!(
        "http://127.0.0.1:{}{}",
        probe["port"].as_i64().unwrap(),
        probe["path"].as_str().unwrap()
    );
    let base = format!(
        "http://127.0.0.1:{}",
        container["ports"][0]["containerPort"].as_i64().unwrap()
    );

    // The Secret, emulated in a private mount namespace (a tmpfs over /run), so the host's
    // filesystem is untouched; then exactly the container's arguments.
    let token = format!("tok{}", std::process::id());
    let script = r#"mount -t tmpfs tmpfs /run && mkdir -p "$(dirname "$1")" && printf %s "$2" > "$1" && shift 2 && exec "$@""#;
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            &token_path,
            &token,
        ])
        .arg(cnitrace_bin())
        .args(&args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare (util-linux)");
    let deadline = Instant::now() + Duration::from_secs(15);
    while http("GET", &health, None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the readiness probe never passed"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        http("GET", &format!("{base}/api/v1/node"), None).0,
        401,
        "the Secret's token is enforced"
    );
    let (status, body) = http("POST", &format!("{base}/api/v1/sessions"), Some(&token));
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_u64()
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    let (status, body) = http(
        "POST",
        &format!("{base}/api/v1/sessions/{id}/stop"),
        Some(&token),
    );
    assert_eq!(status, 200, "{body}");
    let view: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        view["breakdown"]["node"], NODE,
        "NODE_NAME from the downward API names the node"
    );
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM exit {status:?}");
    assert!(programs_left_after_exit().unwrap().is_empty());
}

#[test]
fn collect_discovers_agents_through_dns() {
    if !privileged("collect_discovers_agents_through_dns") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = format!("dns{}", std::process::id());
    let a = AgentProcess::start_at(
        &format!("127.0.0.1:{port}"),
        &token,
        &[("NODE_NAME", "node-a")],
    )
    .expect("agent a");
    let b = AgentProcess::start_at(
        &format!("127.0.0.2:{port}"),
        &token,
        &[("NODE_NAME", "node-b")],
    )
    .expect("agent b");
    // One name, two A records, as a headless Service has; visible only to this command through
    // a private mount namespace.
    let dir = std::env::temp_dir().join(format!("cnitrace-dns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hosts = dir.join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 agents.cnitrace.test\n127.0.0.2 agents.cnitrace.test\n",
    )
    .unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, &token).unwrap();
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            r#"mount --bind "$1" /etc/hosts && shift && exec "$@""#,
            "sh",
        ])
        .arg(&hosts)
        .arg(cnitrace_bin())
        .args([
            "collect",
            &format!("dns+http://agents.cnitrace.test:{port}"),
            "--duration",
            "1",
            "--format",
            "json",
        ])
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "collect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let collected: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut nodes: Vec<&str> = collected["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    nodes.sort_unstable();
    assert_eq!(
        nodes,
        vec!["node-a", "node-b"],
        "both addresses of the name were collected"
    );
    drop((a, b));
}
