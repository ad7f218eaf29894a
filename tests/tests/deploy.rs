//! The DaemonSet's contract with the binary: its exact arguments and environment (as the kubelet
//! expands them) start a working agent, in a PID namespace of its own, listening on the node's
//! address only, over HTTPS with the mounted TLS Secret (and taking up a renewed one without a
//! restart), with the operator token and the scrapers' read-only one from their Secrets; the
//! ServiceMonitor scrapes it over verified HTTPS with the read-only token; and `collect` finds
//! agents through DNS (a headless Service's A records).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use cnitrace_tests::{AgentProcess, cnitrace_bin, privileged, programs_left_after_exit};
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

const NODE: &str = "node-from-downward-api";
/// The node's address as the downward API's status.hostIP gives it. A loopback address other
/// than 127.0.0.1, so that 127.0.0.1 tells whether the agent took every address instead.
const HOST_IP: &str = "127.0.0.2";

fn manifest(name: &str) -> Yaml {
    let path = format!("{}/../deploy/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

fn daemonset() -> Yaml {
    manifest("daemonset.yaml")
}

/// A plain-HTTP request that may find nobody listening: (0, "") then.
fn http(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    cnitrace_tests::http(method, url, token, None).unwrap_or_default()
}

/// An HTTPS request (a POST with an empty JSON body), the agent's certificate verified against
/// `ca`: (status, body), or (0, curl's error) when nobody answers or the certificate fails.
/// curl, because this crate's ureq is built without TLS. The token goes to curl through its
/// standard input, not on a command line that every user can read.
fn https(method: &str, url: &str, token: Option<&str>, ca: &Path) -> (u16, String) {
    let mut command = Command::new("curl");
    command
        .args([
            "--silent",
            "--show-error",
            "--noproxy",
            "*",
            "--max-time",
            "30",
        ])
        .args(["--config", "-", "--cacert"])
        .arg(ca)
        .args(["--request", method, "--write-out", "\n%{http_code}"]);
    if method == "POST" {
        command.args([
            "--header",
            "Content-Type: application/json",
            "--data-binary",
            "",
        ]);
    }
    let mut child = command
        .arg(url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl");
    let config = token.map_or_else(String::new, |token| {
        format!("header = \"Authorization: Bearer {token}\"\n")
    });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    match status.trim().parse() {
        Ok(status) if status != 0 => (status, body.to_owned()),
        _ => (0, String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// A directory (0700) under the tests' temporary directory for a throwaway key, removed when
/// dropped. Not under /run, which the agent's mount namespace covers with a tmpfs.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new(name: &str) -> Self {
        use std::os::unix::fs::DirBuilderExt as _;
        let path =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .unwrap();
        Self(path)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed P-256 certificate for `ip`, valid a day, as `dir/NAME.crt` and its key
/// `dir/NAME.key`: (certificate, key). A leaf (CA:FALSE), so that it can be its own trust root.
fn self_signed(dir: &Path, name: &str, ip: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", &format!("/CN={name}")])
        .args(["-addext", &format!("subjectAltName=IP:{ip}")])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// The mount path of the Secret volume whose Secret is `secret`.
fn secret_mount(spec: &Yaml, secret: &str) -> String {
    let volume = spec["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"].as_str() == Some(secret))
        .unwrap_or_else(|| panic!("no volume of the Secret {secret}"));
    let mount = spec["containers"][0]["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .unwrap_or_else(|| panic!("the Secret {secret} is not mounted"));
    assert!(
        mount["subPath"].is_badvalue(),
        "a subPath mount of {secret} is never updated"
    );
    mount["mountPath"].as_str().unwrap().to_owned()
}

#[test]
fn the_agent_serves_https_and_the_servicemonitor_verifies_it() {
    let ds = daemonset();
    let spec = &ds["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let value_of = |flag: &str| args[args.iter().position(|a| *a == flag).expect(flag) + 1];
    // The keys of a kubernetes.io/tls Secret, in the Secret's mount.
    let tls = secret_mount(spec, "cnitrace-tls");
    assert_eq!(value_of("--tls-cert"), format!("{tls}/tls.crt"));
    assert_eq!(value_of("--tls-key"), format!("{tls}/tls.key"));
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["httpGet"]["scheme"].as_str(),
            Some("HTTPS"),
            "{probe}: the agent serves HTTPS only"
        );
    }
    let monitor = manifest("servicemonitor.yaml");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["scheme"].as_str(), Some("https"));
    // The scraper holds the read-only token, not the operator's: what it sends is the
    // Secret the agent reads its --read-only-token-file from.
    let credentials = &endpoint["authorization"]["credentials"];
    assert_eq!(
        credentials["name"].as_str(),
        Some("cnitrace-read-token"),
        "the ServiceMonitor sends the read-only token"
    );
    assert_eq!(credentials["key"].as_str(), Some("token"));
    assert_eq!(
        value_of("--read-only-token-file"),
        format!("{}/token", secret_mount(spec, "cnitrace-read-token")),
        "the agent's read-only token is the key the ServiceMonitor sends"
    );
    assert_eq!(
        value_of("--token-file"),
        format!("{}/token", secret_mount(spec, "cnitrace-token"))
    );
    let tls_config = &endpoint["tlsConfig"];
    assert_ne!(
        tls_config["insecureSkipVerify"].as_bool(),
        Some(true),
        "the token would go to whoever answers"
    );
    assert_eq!(
        tls_config["ca"]["secret"]["name"].as_str(),
        Some("cnitrace-tls")
    );
    assert_eq!(tls_config["ca"]["secret"]["key"].as_str(), Some("ca.crt"));
    // One certificate for every node names the headless Service, whatever address is scraped.
    let service = manifest("service.yaml");
    assert_eq!(service["spec"]["clusterIP"].as_str(), Some("None"));
    let name = format!(
        "{}.{}.svc",
        service["metadata"]["name"].as_str().unwrap(),
        service["metadata"]["namespace"].as_str().unwrap()
    );
    assert_eq!(tls_config["serverName"].as_str(), Some(name.as_str()));
    // The ServiceMonitor's port is the Service's, and that goes to the agent's.
    let port = &service["spec"]["ports"][0];
    assert_eq!(endpoint["port"].as_str(), port["name"].as_str());
    assert_eq!(
        port["targetPort"].as_i64(),
        container["ports"][0]["containerPort"].as_i64()
    );
}

/// The process `parent` forked, if any (from every process's /proc/PID/stat).
fn child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|entry| {
            let candidate: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let its_parent: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (its_parent == parent).then_some(candidate)
        })
}

/// Kills `unshare` if the test ends early; its --kill-child then sends the agent SIGTERM.
struct Unshare(std::process::Child);

impl Drop for Unshare {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
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
    assert_ne!(
        spec["hostPID"].as_bool(),
        Some(true),
        "the agent needs no host PIDs"
    );
    let container = &spec["containers"][0];
    // The container's seccompProfile would override the pod's.
    let seccomp = [
        &container["securityContext"]["seccompProfile"]["type"],
        &spec["securityContext"]["seccompProfile"]["type"],
    ]
    .into_iter()
    .find_map(Yaml::as_str);
    assert_eq!(seccomp, Some("RuntimeDefault"));
    let raw_args: Vec<String> = container["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    // The environment as the kubelet builds it: fieldRef spec.nodeName becomes the node name,
    // status.hostIP the node's address; then $(VAR) in the arguments is expanded from it.
    let mut env = Vec::new();
    for var in container["env"].as_vec().unwrap() {
        let name = var["name"].as_str().unwrap().to_owned();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_owned()
        } else {
            match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => NODE.to_owned(),
                Some("status.hostIP") => HOST_IP.to_owned(),
                other => panic!("{name}: fieldRef {other:?} is not emulated"),
            }
        };
        env.push((name, value));
    }
    let args: Vec<String> = raw_args
        .iter()
        .map(|a| cnitrace_tests::expand_kubernetes_vars(a, &env))
        .collect();
    let value_of = |flag: &str| args[args.iter().position(|a| a == flag).expect(flag) + 1].clone();
    let token_path = value_of("--token-file");
    let read_only_path = value_of("--read-only-token-file");
    let (tls_cert, tls_key) = (value_of("--tls-cert"), value_of("--tls-key"));
    let port = container["ports"][0]["containerPort"].as_i64().unwrap();
    assert_eq!(
        value_of("--listen"),
        format!("{HOST_IP}:{port}"),
        "the agent listens on the node's address (status.hostIP) only"
    );
    // Component-wise: /run/secrets/cnitrace-read/token is not inside /run/secrets/cnitrace.
    let token_mount = secret_mount(spec, "cnitrace-token");
    assert!(
        Path::new(&token_path).starts_with(&token_mount),
        "the token file is in the Secret's mount"
    );
    let read_only_mount = secret_mount(spec, "cnitrace-read-token");
    assert!(
        Path::new(&read_only_path).starts_with(&read_only_mount),
        "the read-only token file is in its Secret's mount"
    );
    assert!(
        !Path::new(&read_only_path).starts_with(&token_mount)
            && !Path::new(&token_path).starts_with(&read_only_mount),
        "each token is in its own Secret, to be given and rotated apart"
    );
    let tls_mount = secret_mount(spec, "cnitrace-tls");
    // The keys of a kubernetes.io/tls Secret.
    assert_eq!(tls_cert, format!("{tls_mount}/tls.crt"));
    assert_eq!(tls_key, format!("{tls_mount}/tls.key"));
    // The probes go to the pod's IP (no `host`), which with hostNetwork is the node's.
    for probe in ["readinessProbe", "livenessProbe"] {
        assert!(
            container[probe]["httpGet"]["host"].is_badvalue(),
            "{probe} names a host"
        );
    }
    let probe = &container["readinessProbe"]["httpGet"];
    assert_eq!(probe["scheme"].as_str(), Some("HTTPS"));
    let health = format!(
        "https://{HOST_IP}:{}{}",
        probe["port"].as_i64().unwrap(),
        probe["path"].as_str().unwrap()
    );
    let base = format!("https://{HOST_IP}:{port}");
    let port = u16::try_from(port).unwrap();
    let loopback_free = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();

    // A throwaway certificate for the node's address (what the Secret would hold), trusted
    // by this test's requests alone.
    let keys = PrivateDir::new("deploy-tls");
    let (cert, key) = self_signed(&keys.0, "first", HOST_IP);

    // The Secrets, emulated in a private mount namespace (a tmpfs over /run), so the host's
    // filesystem is untouched: the two token files, and the TLS Secret laid out as the kubelet
    // does (tls.crt and tls.key link into `..data`, a link to the current version's directory,
    // which an update swaps); a PID namespace of its own with its own /proc, as the container
    // has without hostPID (the agent is its PID 1, as the image's entrypoint is); then exactly
    // the container's arguments. Two tokens that differ, as the agent requires.
    let token = cnitrace_tests::random_token();
    let read_only = cnitrace_tests::random_token();
    assert_ne!(token, read_only);
    let script = r#"mount -t tmpfs tmpfs /run && mkdir -p "$(dirname "$1")" && printf %s "$2" > "$1" \
        && mkdir -p "$(dirname "$3")" && printf %s "$4" > "$3" \
        && mkdir -p "$5/..v1" && cp "$6" "$5/..v1/tls.crt" && cp "$7" "$5/..v1/tls.key" \
        && ln -s ..v1 "$5/..data" && ln -s ..data/tls.crt "$5/tls.crt" \
        && ln -s ..data/tls.key "$5/tls.key" && shift 7 && exec "$@""#;
    let child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--mount-proc",
            "--kill-child=SIGTERM",
            "sh",
            "-c",
            script,
            "sh",
            &token_path,
            &token,
            &read_only_path,
            &read_only,
            &tls_mount,
        ])
        .arg(&cert)
        .arg(&key)
        .arg(cnitrace_bin())
        .args(&args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare (util-linux)");
    let mut child = Unshare(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    while https("GET", &health, None, &cert).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the readiness probe never passed"
        );
        thread::sleep(Duration::from_millis(100));
    }
    // unshare forked the agent into the new PID namespace, where it is PID 1.
    let agent = child_of(child.0.id()).expect("the agent, unshare's child");
    let status = std::fs::read_to_string(format!("/proc/{agent}/status")).unwrap();
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .unwrap();
    assert_eq!(
        nspid.split_whitespace().last(),
        Some("1"),
        "the agent is PID 1 of a namespace of its own: {nspid}"
    );
    if loopback_free {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "the agent took 127.0.0.1:{port} as well: it listens on more than the node's address"
        );
    }
    assert_eq!(
        http("GET", &health.replace("https:", "http:"), None).0,
        0,
        "the agent answers plain HTTP: the token would cross the network in clear"
    );
    assert_eq!(
        https("GET", &format!("{base}/api/v1/node"), None, &cert).0,
        401,
        "the Secret's token is enforced"
    );
    // The ServiceMonitor's token, from its own Secret: it scrapes, and opens no session.
    let (status, body) = https("GET", &format!("{base}/metrics"), Some(&read_only), &cert);
    assert_eq!(status, 200, "the read-only token scrapes /metrics: {body}");
    assert!(body.contains("cnitrace_"), "{body}");
    let (status, body) = https(
        "POST",
        &format!("{base}/api/v1/sessions"),
        Some(&read_only),
        &cert,
    );
    assert_eq!(status, 403, "the read-only token opened a session: {body}");
    assert!(body.contains("read-only"), "{body}");
    // The operator token reads too, and opens and stops sessions (below).
    let (status, body) = https("GET", &format!("{base}/metrics"), Some(&token), &cert);
    assert_eq!(status, 200, "the operator token scrapes /metrics: {body}");
    let (status, body) = https(
        "POST",
        &format!("{base}/api/v1/sessions"),
        Some(&token),
        &cert,
    );
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_u64()
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    let (status, body) = https(
        "POST",
        &format!("{base}/api/v1/sessions/{id}/stop"),
        Some(&token),
        &cert,
    );
    assert_eq!(status, 200, "{body}");
    let view: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        view["breakdown"]["node"], NODE,
        "NODE_NAME from the downward API names the node"
    );
    // cert-manager renews the Secret and the kubelet swaps the files in, in the agent's own
    // mount namespace (reached through its /proc/PID/root): the new certificate is presented
    // without a restart (the agent looks at most once a second, on a handshake).
    let (renewed, renewed_key) = self_signed(&keys.0, "renewed", HOST_IP);
    let volume = PathBuf::from(format!("/proc/{agent}/root{tls_mount}"));
    std::fs::create_dir(volume.join("..v2")).unwrap();
    std::fs::copy(&renewed, volume.join("..v2/tls.crt")).unwrap();
    std::fs::copy(&renewed_key, volume.join("..v2/tls.key")).unwrap();
    std::os::unix::fs::symlink("..v2", volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    thread::sleep(Duration::from_millis(1200));
    let (status, answer) = https("GET", &health, None, &renewed);
    assert_eq!(
        status, 200,
        "the renewed certificate is not presented: {answer}"
    );
    assert_eq!(
        https("GET", &health, None, &cert).0,
        0,
        "the first certificate is still presented"
    );
    // SIGTERM to the agent itself, as the kubelet stops a container (unshare blocks it).
    Command::new("kill")
        .arg(agent.to_string())
        .status()
        .unwrap();
    let status = child.0.wait().unwrap();
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
    let token = format!("dns-test-token-{}", std::process::id());
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
