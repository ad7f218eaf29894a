//! `cargo xtask image [--check]`: builds the agent's OCI image from deploy/Dockerfile with
//! podman, and checks it by running it exactly as deploy/daemonset.yaml says (host network
//! but its own PID namespace, the runtime's default seccomp profile, every capability dropped
//! but the manifest's, read-only root, the manifest's mounts, its arguments with `$(HOST_IP)`
//! expanded and its environment, the token from a mounted Secret file).
//!
//! No registry is reachable from the build machines, so the binary is built on the host and
//! handed to the Dockerfile as its `builder` stage (`--build-context builder=DIR`, which
//! `docker buildx build` understands too), and when the Dockerfile's digest-pinned Debian
//! base is neither present nor pullable, a base is made from Debian's packages with
//! mmdebstrap under a local name of its own and passed as `--build-arg RUNTIME_BASE` (its
//! digest cannot be the official image's, so the pin cannot hold for it).
//! `docker build -f deploy/Dockerfile .` on a machine with registry access builds the same
//! image without any of this.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use cnitrace_tests::{Shape, Topology, programs_left_after_exit};
use yaml_rust2::{Yaml, YamlLoader};

use crate::{bootstrap, cargo, run_command, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// The image's name.
    #[arg(long, default_value = "ghcr.io/cnitrace/cnitrace:0.1.0")]
    pub tag: String,
    /// Then run it as the DaemonSet does and check it works (root; real traffic, real BPF).
    #[arg(long)]
    pub check: bool,
    /// With --check: leave out this capability of the manifest's (to see whether it is needed).
    #[arg(long, value_name = "CAP", requires = "check")]
    pub without: Vec<String>,
}

/// Where the base made from Debian's packages is kept: a name of its own, so that it is never
/// taken for the official image (which the Dockerfile pins by digest).
const LOCAL_RUNTIME_BASE: &str = "localhost/cnitrace-debian-minbase:bookworm";

/// The Dockerfile's `ARG NAME=DEFAULT` (its pinned bases; the builder's is replaced by the
/// binary built here, so only RUNTIME_BASE is used).
fn dockerfile_arg(name: &str) -> Result<String> {
    let text = std::fs::read_to_string(workspace_root().join("deploy/Dockerfile"))?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix("ARG ")?
                .strip_prefix(name)?
                .strip_prefix('=')
        })
        .map(|value| value.trim().to_owned())
        .with_context(|| format!("deploy/Dockerfile has no `ARG {name}=...`"))
}

/// podman with runc: crun refuses hosts whose cgroups are mounted in hybrid (v1 + v2) mode,
/// as the build machines' are. Every podman call goes through here.
fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc"]);
    command
}

/// Resource limits for containers: podman would raise RLIMIT_NOFILE and RLIMIT_NPROC to its
/// own defaults, which fails where the host itself runs without CAP_SYS_RESOURCE (as the
/// build machines do); the current limits are kept instead (NPROC a little below: runc is
/// refused even an equal value there).
fn ulimits() -> Vec<String> {
    let limit = |resource| nix::sys::resource::getrlimit(resource).map_or(4096, |(_, hard)| hard);
    let nofile = limit(nix::sys::resource::Resource::RLIMIT_NOFILE).min(1 << 20);
    let nproc = (limit(nix::sys::resource::Resource::RLIMIT_NPROC) / 2).clamp(256, 32768);
    vec![
        "--ulimit".to_owned(),
        format!("nofile={nofile}:{nofile}"),
        "--ulimit".to_owned(),
        format!("nproc={nproc}:{nproc}"),
    ]
}

pub fn run(args: &Args) -> Result<()> {
    if !crate::is_root() {
        bail!("the image build needs root (rootful podman, mmdebstrap)");
    }
    bootstrap::ensure()?;
    let size = build(&args.tag)?;
    eprintln!(
        "xtask: image {} built, {:.1} MB",
        args.tag,
        size as f64 / 1e6
    );
    if args.check {
        print!("{}", check(&args.tag, &args.without)?);
    }
    Ok(())
}

/// Builds the image; returns its size in bytes.
pub fn build(tag: &str) -> Result<u64> {
    run_command(cargo().args(["build", "--release", "--package", "cnitrace"]))?;
    let work = workspace_root().join("target/image");
    // The builder stage's output, where the Dockerfile copies it from.
    let builder = work.join("builder");
    let binary_dir = builder.join("src/target/release");
    std::fs::create_dir_all(&binary_dir)?;
    std::fs::copy(
        workspace_root().join("target/release/cnitrace"),
        binary_dir.join("cnitrace"),
    )
    .context("copy the release binary into the build context")?;
    let mut build = podman();
    build
        .args(["build", "--network", "host", "--pull=never"])
        .args(ulimits())
        .arg("--build-context")
        .arg(format!("builder={}", builder.display()));
    if let Some(base) = ensure_base(&work)? {
        build.arg("--build-arg").arg(format!("RUNTIME_BASE={base}"));
    }
    run_command(
        build
            .args(["-f", "deploy/Dockerfile", "-t", tag, "."])
            .current_dir(workspace_root()),
    )?;
    let out = podman()
        .args(["image", "inspect", "--format", "{{.Size}}", tag])
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("podman image inspect: size")
}

/// The Debian base: the Dockerfile's pinned one from the local store or a registry (`None`:
/// nothing to override), or else one made from Debian's packages (its name, for
/// `--build-arg RUNTIME_BASE`).
fn ensure_base(work: &Path) -> Result<Option<String>> {
    let pinned = dockerfile_arg("RUNTIME_BASE")?;
    let exists = |name: &str| {
        podman()
            .args(["image", "exists", name])
            .status()
            .is_ok_and(|s| s.success())
    };
    if exists(&pinned) {
        return Ok(None);
    }
    let pulled = podman()
        .args(["pull", "--quiet", &pinned])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if pulled {
        return Ok(None);
    }
    if exists(LOCAL_RUNTIME_BASE) {
        eprintln!("xtask: {pinned} cannot be pulled here: using {LOCAL_RUNTIME_BASE}");
        return Ok(Some(LOCAL_RUNTIME_BASE.to_owned()));
    }
    eprintln!(
        "xtask: {pinned} cannot be pulled here: making {LOCAL_RUNTIME_BASE} from Debian's packages"
    );
    // What the official slim image is: Debian's minimal base system, without documentation.
    let tarball = work.join("debian-bookworm-slim.tar");
    run_command(
        Command::new("mmdebstrap")
            .args([
                "--variant=minbase",
                "--quiet",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                "bookworm",
            ])
            .arg(&tarball)
            .arg("deb http://deb.debian.org/debian bookworm main"),
    )?;
    run_command(
        podman()
            .args(["import", "--change", "CMD [\"bash\"]", "--message"])
            .arg("Debian bookworm minbase by mmdebstrap (cargo xtask image)")
            .arg(&tarball)
            .arg(LOCAL_RUNTIME_BASE),
    )?;
    std::fs::remove_file(&tarball)?;
    Ok(Some(LOCAL_RUNTIME_BASE.to_owned()))
}

/// The container as deploy/daemonset.yaml runs it, read from the manifest.
struct Deployment {
    /// With `$(VAR)` expanded as the kubelet does.
    args: Vec<String>,
    env: Vec<(String, String)>,
    caps: Vec<String>,
    read_only: bool,
    port: i64,
    health_path: String,
    /// (host path, container path, propagation)
    host_mounts: Vec<(String, String, String)>,
    secret_mount: String,
    token_path: String,
}

const NODE: &str = "node-from-downward-api";
/// The node's address as the downward API's status.hostIP gives it: on the host network,
/// loopback stands for it (the probes and the scrape below go to it, as the kubelet's and
/// Prometheus's go to the pod's IP, which is the node's).
const HOST_IP: &str = "127.0.0.1";

/// `$(NAME)` replaced as the kubelet does in a container's args: by the container's variable
/// of that name (left as written when there is none); `$$` is a literal `$`.
fn expand(text: &str, env: &[(String, String)]) -> String {
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

fn deployment() -> Result<Deployment> {
    let path = workspace_root().join("deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path)?;
    let ds = YamlLoader::load_from_str(&text)?.remove(0);
    let spec = &ds["spec"]["template"]["spec"];
    if spec["hostNetwork"].as_bool() != Some(true) || spec["hostPID"].as_bool() == Some(true) {
        bail!(
            "the check runs the container with host network and its own PID namespace, as the \
             manifest did: update the check"
        );
    }
    let container = &spec["containers"][0];
    // The container's seccompProfile overrides the pod's.
    let seccomp = [
        &container["securityContext"]["seccompProfile"]["type"],
        &spec["securityContext"]["seccompProfile"]["type"],
    ]
    .into_iter()
    .find_map(Yaml::as_str);
    if seccomp != Some("RuntimeDefault") {
        bail!(
            "the check stands podman's default seccomp profile in for RuntimeDefault, and the \
             manifest now asks for {seccomp:?}: update the check"
        );
    }
    let strings = |y: &Yaml| -> Vec<String> {
        y.as_vec()
            .map(|v| {
                v.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let raw_args = strings(&container["args"]);
    let mut env = Vec::new();
    for var in container["env"].as_vec().into_iter().flatten() {
        let name = var["name"].as_str().context("env name")?.to_owned();
        let value = match (
            var["value"].as_str(),
            var["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(v), _) => v.to_owned(),
            (None, Some("spec.nodeName")) => NODE.to_owned(),
            (None, Some("status.hostIP")) => HOST_IP.to_owned(),
            _ => bail!("env {name}: only values, spec.nodeName and status.hostIP are emulated"),
        };
        env.push((name, value));
    }
    let args: Vec<String> = raw_args.iter().map(|a| expand(a, &env)).collect();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .with_context(|| format!("the manifest's args have no {flag}"))
    };
    let token_path = value_of("--token-file")?;
    let listen = value_of("--listen")?;
    let security = &container["securityContext"];
    let caps = strings(&security["capabilities"]["add"]);
    if strings(&security["capabilities"]["drop"]) != ["ALL"] {
        bail!("the manifest no longer drops ALL capabilities: update the check");
    }
    let volumes = spec["volumes"].as_vec().context("volumes")?;
    let mut host_mounts = Vec::new();
    let mut secret_mount = None;
    for mount in container["volumeMounts"].as_vec().into_iter().flatten() {
        let name = mount["name"].as_str().context("mount name")?;
        let target = mount["mountPath"].as_str().context("mountPath")?.to_owned();
        let volume = volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .with_context(|| format!("volume {name}"))?;
        if let Some(host) = volume["hostPath"]["path"].as_str() {
            let propagation = match mount["mountPropagation"].as_str() {
                Some("HostToContainer") => "rslave",
                Some("Bidirectional") => "rshared",
                _ => "rprivate",
            };
            host_mounts.push((host.to_owned(), target, propagation.to_owned()));
        } else if volume["secret"].as_hash().is_some() {
            secret_mount = Some(target);
        } else {
            bail!("volume {name}: only hostPath and secret volumes are emulated");
        }
    }
    let probe = &container["readinessProbe"]["httpGet"];
    let port = probe["port"].as_i64().context("readinessProbe port")?;
    // The probe goes to the pod's IP (no `host`), the node's on the host network: the
    // agent has to listen there, and nowhere else.
    if !probe["host"].is_badvalue() {
        bail!("the readinessProbe names a host: the check probes the node's address");
    }
    if listen != format!("{HOST_IP}:{port}") {
        bail!("--listen {listen}: not the node's address (status.hostIP) and the probe's port");
    }
    Ok(Deployment {
        args,
        env,
        caps,
        read_only: security["readOnlyRootFilesystem"].as_bool() == Some(true),
        port,
        health_path: probe["path"]
            .as_str()
            .context("readinessProbe path")?
            .to_owned(),
        host_mounts,
        secret_mount: secret_mount.context("no Secret volume for the token")?,
        token_path,
    })
}

/// The scrape the ServiceMonitor configures: its path and the bearer token from the Secret.
fn scrape_path() -> Result<String> {
    let text = std::fs::read_to_string(workspace_root().join("deploy/servicemonitor.yaml"))?;
    let monitor = YamlLoader::load_from_str(&text)?.remove(0);
    let endpoint = &monitor["spec"]["endpoints"][0];
    if endpoint["authorization"]["credentials"]["key"].as_str() != Some("token") {
        bail!("the ServiceMonitor no longer sends the Secret's token: update the check");
    }
    Ok(endpoint["path"].as_str().unwrap_or("/metrics").to_owned())
}

/// A request that may find nobody listening yet: (0, the error) then.
fn http(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    cnitrace_tests::http(method, url, token, None).unwrap_or_else(|e| (0, e.to_string()))
}

/// Removes the check's container whatever happens.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "5", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs the image as the DaemonSet does and checks it end to end; returns a report.
pub fn check(tag: &str, without: &[String]) -> Result<String> {
    let mut deployment = deployment()?;
    deployment.caps.retain(|cap| !without.contains(cap));
    let scrape = scrape_path()?;
    let mut report = String::new();
    let secret_dir = workspace_root().join(format!("target/image/secret-{}", std::process::id()));
    std::fs::create_dir_all(&secret_dir)?;
    let token = format!("image-check-{}", std::process::id());
    let token_file = secret_dir.join(
        Path::new(&deployment.token_path)
            .strip_prefix(&deployment.secret_mount)
            .context("the token file is not in the Secret's mount")?,
    );
    std::fs::write(&token_file, &token)?;
    let name = format!("cnitrace-image-check-{}", std::process::id());
    let mut run = podman();
    run.args(["run", "--detach", "--name", &name])
        // Its own PID namespace (no hostPID); podman's default seccomp profile stands in for
        // the kubelet's RuntimeDefault (both allow bpf, perf_event_open and setns with
        // CAP_SYS_ADMIN), as `isolation` checks.
        .args(["--network", "host", "--user", "0"])
        .args(["--security-opt", "no-new-privileges", "--cap-drop", "ALL"])
        .args(ulimits());
    for cap in &deployment.caps {
        run.args(["--cap-add", cap]);
    }
    if deployment.read_only {
        // As in Kubernetes: no tmpfs on /run, /tmp or /var/tmp either.
        run.args(["--read-only", "--read-only-tmpfs=false"]);
    }
    run.arg("--volume").arg(format!(
        "{}:{}:ro",
        secret_dir.display(),
        deployment.secret_mount
    ));
    for (host, target, propagation) in &deployment.host_mounts {
        std::fs::create_dir_all(host)?;
        run.arg("--volume")
            .arg(format!("{host}:{target}:ro,{propagation}"));
    }
    for (key, value) in &deployment.env {
        run.args(["--env", &format!("{key}={value}")]);
    }
    run.arg(tag).args(&deployment.args);
    let _ = writeln!(
        report,
        "image check: {tag} with --cap-drop ALL --cap-add {}, read-only root: {}",
        deployment.caps.join(","),
        deployment.read_only
    );
    let topology = Topology::new(Shape::Bridged { rules: 50 })?;
    run_command(&mut run)?;
    let container = Container(name.clone());
    let result = isolation(&name, &mut report)
        .and_then(|()| exercise(&deployment, &scrape, &token, &topology, &mut report));
    if result.is_err() {
        let logs = podman().args(["logs", &name]).output()?;
        eprintln!(
            "xtask: the container's log:\n{}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
    }
    result?;
    // SIGTERM, as the kubelet stops a pod, and the exit status it sees.
    run_command(podman().args(["stop", "--time", "20", &name]))?;
    let out = podman()
        .args(["inspect", "--format", "{{.State.ExitCode}}", &name])
        .output()?;
    let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    drop(container);
    drop(topology);
    std::fs::remove_dir_all(&secret_dir)?;
    if code != "0" {
        bail!("SIGTERM: the agent exited with {code}");
    }
    let _ = writeln!(report, "  ok    SIGTERM -> exit 0");
    let left = programs_left_after_exit()?;
    if !left.is_empty() {
        bail!("programs left loaded after the container stopped: {left:?}");
    }
    let _ = writeln!(
        report,
        "  ok    nothing of cnitrace left loaded on the host"
    );
    Ok(report)
}

/// What the manifest does not grant, seen from the host: the agent has a PID namespace of its
/// own, and a seccomp filter.
fn isolation(name: &str, report: &mut String) -> Result<()> {
    let out = podman()
        .args(["inspect", "--format", "{{.State.Pid}}", name])
        .output()?;
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    pid.parse::<u32>()
        .with_context(|| format!("podman inspect: pid {pid:?}"))?;
    let pid_ns = |pid: &str| {
        std::fs::read_link(format!("/proc/{pid}/ns/pid"))
            .with_context(|| format!("/proc/{pid}/ns/pid"))
    };
    if pid_ns(&pid)? == pid_ns("self")? {
        bail!("the container shares the host's PID namespace");
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let seccomp = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(str::trim);
    if seccomp != Some("2") {
        bail!("the agent runs without a seccomp filter (Seccomp: {seccomp:?})");
    }
    let _ = writeln!(
        report,
        "  ok    own PID namespace; seccomp filter on (podman's default profile)"
    );
    Ok(())
}

fn exercise(
    deployment: &Deployment,
    scrape: &str,
    token: &str,
    topology: &Topology,
    report: &mut String,
) -> Result<()> {
    // Where the kubelet's probes and Prometheus go: the pod's IP, the node's address.
    let base = format!("http://{HOST_IP}:{}", deployment.port);
    cnitrace_tests::wait_until_ok(
        &format!("{base}{}", deployment.health_path),
        Duration::from_secs(30),
    )
    .context("the readiness probe never passed")?;
    let _ = writeln!(
        report,
        "  ok    readiness probe {} -> 200",
        deployment.health_path
    );
    let (status, _) = http("GET", &format!("{base}/api/v1/node"), None);
    if status != 401 {
        bail!("without the token /api/v1/node answered {status}, not 401");
    }
    let _ = writeln!(
        report,
        "  ok    the Secret's token is enforced (401 without it)"
    );
    // A session over real traffic: iperf3 through the bridged pair, and the rulesets of its
    // namespace read from inside the container through the /run/netns mount.
    let url = format!("{base}/api/v1/sessions");
    let (status, body) = cnitrace_tests::http(
        "POST",
        &url,
        Some(token),
        Some(&serde_json::json!({"netns": [topology.node]})),
    )?;
    if status != 201 {
        bail!("POST /api/v1/sessions: {status} {body}");
    }
    let id = serde_json::from_str::<serde_json::Value>(&body)?["id"]
        .as_u64()
        .context("session id")?;
    let gbps = topology.start_iperf3(3)?.finish()?;
    let (status, body) = http("POST", &format!("{url}/{id}/stop"), Some(token));
    if status != 200 {
        bail!("stop: {status} {body}");
    }
    let view: serde_json::Value = serde_json::from_str(&body)?;
    if view["breakdown"].is_null() {
        bail!("the session ended without a breakdown: {}", view["error"]);
    }
    let breakdown = &view["breakdown"];
    let component = |name: &str| {
        breakdown["components"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name))
            .and_then(|c| c["cpp"].as_f64())
            .unwrap_or(0.0)
    };
    if component("bridge") <= 0.0 {
        bail!("no bridge CPP in the session: {breakdown}");
    }
    if breakdown["node"] != NODE {
        bail!("the node is named {} (NODE_NAME)", breakdown["node"]);
    }
    let _ = writeln!(
        report,
        "  ok    session over iperf3 ({gbps:.1} Gbit/s): bridge {:.0} CPP, netfilter {:.0} CPP, node {NODE}",
        component("bridge"),
        component("netfilter")
    );
    let rules: u64 = breakdown["netfilter"]["chains"]
        .as_array()
        .map_or(0, |chains| {
            chains
                .iter()
                .filter(|c| c["netns"].as_str() == Some(topology.node.as_str()))
                .filter(|c| c["hook"] == "FORWARD")
                .filter_map(|c| c["rules"].as_u64())
                .sum()
        });
    if rules < 50 {
        bail!(
            "the namespace's ruleset was not read from inside the container: {}",
            breakdown["netfilter"]
        );
    }
    let _ = writeln!(
        report,
        "  ok    FORWARD rules of {} read inside the container through /run/netns: {rules}",
        topology.node
    );
    let (status, body) = http("GET", &format!("{base}{scrape}"), Some(token));
    if status != 200 || !body.contains("cnitrace_") {
        bail!("scrape {scrape}: {status}");
    }
    let _ = writeln!(
        report,
        "  ok    {scrape} scraped with the bearer token as the ServiceMonitor does: {} series",
        body.lines().filter(|l| !l.starts_with('#')).count()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_reads_the_manifest_with_host_ip_expanded() {
        let deployment = deployment().unwrap();
        let listen = deployment
            .args
            .iter()
            .position(|a| a == "--listen")
            .map(|i| deployment.args[i + 1].clone());
        assert_eq!(listen, Some(format!("{HOST_IP}:{}", deployment.port)));
        assert!(
            deployment
                .env
                .contains(&("HOST_IP".to_owned(), HOST_IP.to_owned()))
        );
    }

    #[test]
    fn args_are_expanded_as_the_kubelet_does() {
        let env = [("HOST_IP".to_owned(), "10.0.0.7".to_owned())];
        assert_eq!(expand("$(HOST_IP):9560", &env), "10.0.0.7:9560");
        assert_eq!(expand("[$(HOST_IP)]:9560", &env), "[10.0.0.7]:9560");
        assert_eq!(expand("$(NOPE):1", &env), "$(NOPE):1");
        assert_eq!(expand("$$(HOST_IP) $x $(", &env), "$(HOST_IP) $x $(");
    }

    #[test]
    fn the_runtime_base_is_pinned_by_digest() {
        let base = dockerfile_arg("RUNTIME_BASE").unwrap();
        let (_, digest) = base.split_once("@sha256:").expect("a digest");
        assert!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "{base}"
        );
        assert_ne!(base, LOCAL_RUNTIME_BASE);
    }
}
