//! `cargo xtask image [--check]`: builds the agent's OCI image from deploy/Dockerfile with
//! podman, and checks it by running it exactly as deploy/daemonset.yaml says (host network
//! and PID, every capability dropped but the manifest's, read-only root, the manifest's
//! mounts, its arguments and environment, the token from a mounted Secret file).
//!
//! No registry is reachable from the build machines, so the binary is built on the host and
//! handed to the Dockerfile as its `builder` stage (`--build-context builder=DIR`, which
//! `docker buildx build` understands too), and the Debian base the runtime files come from
//! is made from Debian's packages with mmdebstrap when it is not already present.
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

/// The Dockerfile's bases; the builder's is replaced by the binary built here.
const RUNTIME_BASE: &str = "docker.io/library/debian:bookworm-slim";

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
    ensure_base(&work)?;
    run_command(
        podman()
            .args(["build", "--network", "host", "--pull=never"])
            .args(ulimits())
            .arg("--build-context")
            .arg(format!("builder={}", builder.display()))
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

/// The Debian base, from the local store, a registry, or else Debian's packages.
fn ensure_base(work: &Path) -> Result<()> {
    let exists = |name: &str| {
        podman()
            .args(["image", "exists", name])
            .status()
            .is_ok_and(|s| s.success())
    };
    if exists(RUNTIME_BASE) {
        return Ok(());
    }
    let pulled = podman()
        .args(["pull", "--quiet", RUNTIME_BASE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if pulled {
        return Ok(());
    }
    eprintln!("xtask: {RUNTIME_BASE} cannot be pulled here: making it from Debian's packages");
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
            .arg(RUNTIME_BASE),
    )?;
    std::fs::remove_file(&tarball)?;
    Ok(())
}

/// The container as deploy/daemonset.yaml runs it, read from the manifest.
struct Deployment {
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

fn deployment() -> Result<Deployment> {
    let path = workspace_root().join("deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path)?;
    let ds = YamlLoader::load_from_str(&text)?.remove(0);
    let spec = &ds["spec"]["template"]["spec"];
    if spec["hostNetwork"].as_bool() != Some(true) || spec["hostPID"].as_bool() != Some(true) {
        bail!("the check runs the container with host network and PID, as the manifest did");
    }
    let container = &spec["containers"][0];
    let strings = |y: &Yaml| -> Vec<String> {
        y.as_vec()
            .map(|v| {
                v.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let args = strings(&container["args"]);
    let token_path = args
        .iter()
        .position(|a| a == "--token-file")
        .and_then(|i| args.get(i + 1))
        .context("the manifest's args have no --token-file")?
        .clone();
    let mut env = Vec::new();
    for var in container["env"].as_vec().into_iter().flatten() {
        let name = var["name"].as_str().context("env name")?.to_owned();
        let value = match var["value"].as_str() {
            Some(v) => v.to_owned(),
            None if var["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("spec.nodeName") => {
                NODE.to_owned()
            }
            None => bail!("env {name}: only values and spec.nodeName are emulated"),
        };
        env.push((name, value));
    }
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
    Ok(Deployment {
        args,
        env,
        caps,
        read_only: security["readOnlyRootFilesystem"].as_bool() == Some(true),
        port: probe["port"].as_i64().context("readinessProbe port")?,
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
        .args(["--network", "host", "--pid", "host", "--user", "0"])
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
    let result = exercise(&deployment, &scrape, &token, &topology, &mut report);
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

fn exercise(
    deployment: &Deployment,
    scrape: &str,
    token: &str,
    topology: &Topology,
    report: &mut String,
) -> Result<()> {
    let base = format!("http://127.0.0.1:{}", deployment.port);
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
