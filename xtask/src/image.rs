//! `cargo xtask image [--check]`: builds the agent's OCI image from deploy/Dockerfile with
//! podman, and checks it by running it exactly as deploy/daemonset.yaml says (host network
//! but its own PID namespace, the runtime's default seccomp profile, every capability dropped
//! but the manifest's, read-only root, the manifest's mounts, its arguments with `$(HOST_IP)`
//! expanded and its environment, the operator and read-only tokens and a generated TLS
//! certificate from mounted Secret files), talking HTTPS to it as the probes and the
//! ServiceMonitor do (the ServiceMonitor with the read-only token, as it is configured).
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
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
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
    /// Secret volumes: (Secret name, container path).
    secret_mounts: Vec<(String, String)>,
    /// The operator token's file (`--token-file`).
    token_path: String,
    /// The read-only token's file (`--read-only-token-file`), the scrapers'.
    read_only_token_path: String,
    tls_cert: String,
    tls_key: String,
}

impl Deployment {
    /// The Secret mounted where `path` is, and `path` inside it.
    fn in_secret(&self, path: &str) -> Result<(&str, PathBuf)> {
        self.secret_mounts
            .iter()
            .find_map(|(secret, mount)| {
                let inside = Path::new(path).strip_prefix(mount).ok()?;
                Some((secret.as_str(), inside.to_owned()))
            })
            .with_context(|| format!("{path} is in no Secret's mount"))
    }
}

const NODE: &str = "node-from-downward-api";
/// The node's address as the downward API's status.hostIP gives it: on the host network,
/// loopback stands for it (the probes and the scrape below go to it, as the kubelet's and
/// Prometheus's go to the pod's IP, which is the node's).
const HOST_IP: &str = "127.0.0.1";

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
    let args: Vec<String> = raw_args
        .iter()
        .map(|a| cnitrace_tests::expand_kubernetes_vars(a, &env))
        .collect();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .with_context(|| format!("the manifest's args have no {flag}"))
    };
    let token_path = value_of("--token-file")?;
    let Ok(read_only_token_path) = value_of("--read-only-token-file") else {
        bail!(
            "the check scrapes with the read-only token, as the ServiceMonitor does, and the \
             manifest has no --read-only-token-file: update the check"
        );
    };
    let listen = value_of("--listen")?;
    let (Ok(tls_cert), Ok(tls_key)) = (value_of("--tls-cert"), value_of("--tls-key")) else {
        bail!(
            "the check talks HTTPS to the agent, and the manifest has no --tls-cert and \
             --tls-key: update the check"
        );
    };
    let security = &container["securityContext"];
    let caps = strings(&security["capabilities"]["add"]);
    if strings(&security["capabilities"]["drop"]) != ["ALL"] {
        bail!("the manifest no longer drops ALL capabilities: update the check");
    }
    let volumes = spec["volumes"].as_vec().context("volumes")?;
    let mut host_mounts = Vec::new();
    let mut secret_mounts = Vec::new();
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
        } else if let Some(secret) = volume["secret"]["secretName"].as_str() {
            if !mount["subPath"].is_badvalue() {
                bail!("volume {name}: a subPath mount of a Secret is never updated");
            }
            secret_mounts.push((secret.to_owned(), target));
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
    for name in ["readinessProbe", "livenessProbe"] {
        if container[name]["httpGet"]["scheme"].as_str() != Some("HTTPS") {
            bail!("the {name} is not HTTPS, and the agent serves HTTPS only");
        }
    }
    if listen != format!("{HOST_IP}:{port}") {
        bail!("--listen {listen}: not the node's address (status.hostIP) and the probe's port");
    }
    let deployment = Deployment {
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
        secret_mounts,
        token_path,
        read_only_token_path,
        tls_cert,
        tls_key,
    };
    if deployment.in_secret(&deployment.token_path)?.0
        == deployment.in_secret(&deployment.read_only_token_path)?.0
    {
        bail!(
            "the operator and read-only tokens are in the same Secret: whoever is given the \
             scrapers' could read the operator's"
        );
    }
    if deployment.in_secret(&deployment.tls_cert)?.0 != deployment.in_secret(&deployment.tls_key)?.0
    {
        bail!("--tls-cert and --tls-key are not in the same Secret");
    }
    Ok(deployment)
}

/// The scrape the ServiceMonitor configures.
struct Scrape {
    path: String,
    /// The bearer token it sends: (Secret, key).
    credentials: (String, String),
    /// The name the certificate is checked for, whatever address is scraped (`serverName`).
    server_name: Option<String>,
    /// The CA the certificate is checked against: (Secret, key).
    ca: (String, String),
}

/// The ServiceMonitor's scrape: HTTPS with the certificate checked against a CA from a Secret,
/// and the bearer token from a Secret (which one, [`check`] compares with the manifest's
/// `--read-only-token-file`).
fn scrape() -> Result<Scrape> {
    let text = std::fs::read_to_string(workspace_root().join("deploy/servicemonitor.yaml"))?;
    let monitor = YamlLoader::load_from_str(&text)?.remove(0);
    let endpoint = &monitor["spec"]["endpoints"][0];
    let authorization = &endpoint["authorization"];
    let credentials = &authorization["credentials"];
    let (Some(token_secret), Some(token_key)) =
        (credentials["name"].as_str(), credentials["key"].as_str())
    else {
        bail!("the ServiceMonitor no longer sends a bearer token from a Secret: update the check");
    };
    if !matches!(authorization["type"].as_str(), None | Some("Bearer")) {
        bail!("the ServiceMonitor's authorization is not a bearer token: update the check");
    }
    let tls = &endpoint["tlsConfig"];
    if endpoint["scheme"].as_str() != Some("https")
        || tls["insecureSkipVerify"].as_bool() == Some(true)
    {
        bail!("the ServiceMonitor does not scrape over verified HTTPS: the token would be exposed");
    }
    let ca = &tls["ca"]["secret"];
    let (Some(secret), Some(key)) = (ca["name"].as_str(), ca["key"].as_str()) else {
        bail!("the check emulates tlsConfig.ca from a Secret only: update the check");
    };
    Ok(Scrape {
        path: endpoint["path"].as_str().unwrap_or("/metrics").to_owned(),
        credentials: (token_secret.to_owned(), token_key.to_owned()),
        server_name: tls["serverName"].as_str().map(str::to_owned),
        ca: (secret.to_owned(), key.to_owned()),
    })
}

/// HTTPS requests through curl (xtask's ureq is built without TLS), the agent's certificate
/// checked against `ca`; `resolve` (curl's `--resolve NAME:PORT:ADDRESS`) connects to a name
/// the certificate is checked for at the agent's address.
struct Https {
    ca: PathBuf,
    resolve: Option<String>,
}

impl Https {
    /// One request: GET, or POST with a JSON body (empty without one), with the bearer token
    /// when given (through curl's standard input, not its command line). Returns the status
    /// and body, or (0, curl's error) when nobody answers or the certificate does not pass.
    fn request(
        &self,
        method: &str,
        url: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> (u16, String) {
        let mut command = Command::new("curl");
        command
            .args([
                "--silent",
                "--show-error",
                "--noproxy",
                "*",
                "--max-time",
                "60",
            ])
            .args(["--config", "-", "--cacert"])
            .arg(&self.ca)
            .args(["--request", method, "--write-out", "\n%{http_code}"]);
        if let Some(resolve) = &self.resolve {
            command.args(["--resolve", resolve]);
        }
        if method == "POST" {
            let body = body.map(ToString::to_string).unwrap_or_default();
            command
                .args([
                    "--header",
                    "Content-Type: application/json",
                    "--data-binary",
                ])
                .arg(body);
        }
        let config = token.map_or_else(String::new, |token| {
            format!("header = \"Authorization: Bearer {token}\"\n")
        });
        command
            .arg(url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let run = |mut command: Command| -> Result<std::process::Output> {
            let mut child = command.spawn().context("curl")?;
            child
                .stdin
                .take()
                .context("curl's stdin")?
                .write_all(config.as_bytes())?;
            Ok(child.wait_with_output()?)
        };
        let out = match run(command) {
            Ok(out) => out,
            Err(e) => return (0, format!("{e:#}")),
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        match status.trim().parse() {
            Ok(status) if status != 0 => (status, body.to_owned()),
            _ => (0, String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        }
    }

    /// Polls `url` until it answers 200, for at most `timeout`.
    fn wait_until_ok(&self, url: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.request("GET", url, None, None);
            if status == 200 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{url} did not answer 200 within {} s: {status} {body}",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A self-signed P-256 certificate (a leaf, so that it can be its own CA) for `names` (`IP:...`
/// or `DNS:...`), valid a day: written to `cert` and its key to `key`.
fn self_signed(cert: &Path, key: &Path, names: &[String]) -> Result<()> {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=cnitrace-image-check"])
        .arg("-addext")
        .arg(format!("subjectAltName={}", names.join(",")))
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .context("cannot run openssl")?;
    if !out.status.success() {
        bail!(
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A Secret volume's files as the kubelet lays them out in `dir`: each a symlink into `..data`,
/// itself a symlink to the current version's directory, which an update replaces at once (so
/// the agent sees a renewed certificate and key together). `files`: (name in the Secret, file
/// to publish as it).
fn publish_secret(dir: &Path, version: u32, files: &[(&Path, &Path)]) -> Result<()> {
    let versioned = format!("..v{version}");
    std::fs::create_dir(dir.join(&versioned))?;
    for (name, source) in files {
        std::fs::copy(source, dir.join(&versioned).join(name))
            .with_context(|| format!("{}", source.display()))?;
        let link = dir.join(name);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), link)?;
        }
    }
    std::os::unix::fs::symlink(&versioned, dir.join("..data_tmp"))?;
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
    Ok(())
}

/// The agent's TLS Secret on the host, laid out as the kubelet does ([`publish_secret`]).
struct TlsSecret {
    /// The Secret's directory, mounted into the container.
    dir: PathBuf,
    /// Where the certificates are made, outside the mount.
    generated: PathBuf,
    /// The certificate's, the key's and the CA's names in the Secret.
    files: [PathBuf; 3],
    /// The certificate's subject alternative names.
    names: Vec<String>,
    version: u32,
}

impl TlsSecret {
    /// Issues a new self-signed certificate and key and swaps them into the Secret, the
    /// certificate as its CA too, as a renewal does; returns the certificate.
    fn renew(&mut self) -> Result<PathBuf> {
        self.version += 1;
        let cert = self.generated.join(format!("v{}.crt", self.version));
        let key = self.generated.join(format!("v{}.key", self.version));
        self_signed(&cert, &key, &self.names)?;
        let [cert_name, key_name, ca_name] = &self.files;
        publish_secret(
            &self.dir,
            self.version,
            &[
                (cert_name.as_path(), cert.as_path()),
                (key_name.as_path(), key.as_path()),
                (ca_name.as_path(), cert.as_path()),
            ],
        )?;
        Ok(cert)
    }
}

/// The check's Secrets on the host: a directory only root can enter, removed whatever happens.
struct SecretDir(PathBuf);

impl SecretDir {
    fn create() -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        let work = workspace_root().join("target/image");
        std::fs::create_dir_all(&work)?;
        let path = work.join(format!("secret-{}", std::process::id()));
        if path.symlink_metadata().is_ok() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self(path))
    }
}

impl Drop for SecretDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The tokens the check writes into the Secrets.
struct Tokens {
    /// `--token-file`'s: everything, sessions included.
    operator: String,
    /// `--read-only-token-file`'s, which the ServiceMonitor sends: GET only.
    read_only: String,
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
    let scrape = scrape()?;
    let mut report = String::new();
    // The Secrets, one directory each, mounted as the manifest mounts them.
    let secret_dir = SecretDir::create()?;
    let secret_path = |secret: &str| secret_dir.0.join(secret);
    for (secret, _) in &deployment.secret_mounts {
        std::fs::create_dir(secret_path(secret))?;
    }
    // Two tokens, each in its Secret: the operator's (sessions) and the read-only one, which
    // the ServiceMonitor must be the one to send.
    let tokens = Tokens {
        operator: cnitrace_tests::random_token(),
        read_only: cnitrace_tests::random_token(),
    };
    if tokens.operator == tokens.read_only {
        bail!("two random tokens are the same: /dev/urandom could not be read");
    }
    for (path, token) in [
        (&deployment.token_path, &tokens.operator),
        (&deployment.read_only_token_path, &tokens.read_only),
    ] {
        let (secret, inside) = deployment.in_secret(path)?;
        let token_file = secret_path(secret).join(inside);
        std::fs::create_dir_all(token_file.parent().context("token file")?)?;
        std::fs::write(&token_file, token)?;
    }
    let (read_only_secret, read_only_key) =
        deployment.in_secret(&deployment.read_only_token_path)?;
    if scrape.credentials.0 != read_only_secret || Path::new(&scrape.credentials.1) != read_only_key
    {
        bail!(
            "the ServiceMonitor sends {}/{}, not the read-only token ({read_only_secret}/{}): \
             update the check",
            scrape.credentials.0,
            scrape.credentials.1,
            read_only_key.display()
        );
    }
    // The TLS Secret: a certificate for the node's address (where the probes and the CLI
    // connect) and for the name the ServiceMonitor checks, with itself as ca.crt.
    let (tls_secret, cert_name) = deployment.in_secret(&deployment.tls_cert)?;
    let (_, key_name) = deployment.in_secret(&deployment.tls_key)?;
    if scrape.ca.0 != tls_secret {
        bail!(
            "the ServiceMonitor's CA is in the Secret {}, not the agent's ({tls_secret}): update the check",
            scrape.ca.0
        );
    }
    let mut names = vec![format!("IP:{HOST_IP}")];
    names.extend(scrape.server_name.iter().map(|name| format!("DNS:{name}")));
    // Outside every mount (a Secret's name cannot start with a dot).
    let generated = secret_dir.0.join(".generated");
    std::fs::create_dir(&generated)?;
    let mut tls = TlsSecret {
        dir: secret_path(tls_secret),
        generated,
        files: [cert_name, key_name, PathBuf::from(&scrape.ca.1)],
        names,
        version: 0,
    };
    let cert = tls.renew()?;
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
    for (secret, mount) in &deployment.secret_mounts {
        run.arg("--volume")
            .arg(format!("{}:{mount}:ro", secret_path(secret).display()));
    }
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
    let https = Https {
        ca: cert,
        resolve: None,
    };
    let result = isolation(&name, &mut report)
        .and_then(|()| {
            exercise(
                &deployment,
                &scrape,
                &https,
                &tokens,
                &topology,
                &mut report,
            )
        })
        .and_then(|()| renewal(&deployment, &mut tls, &mut report));
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
    drop(secret_dir);
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

/// cert-manager renews the Secret and the kubelet swaps its files: the running agent presents
/// the new certificate, without a restart.
fn renewal(deployment: &Deployment, tls: &mut TlsSecret, report: &mut String) -> Result<()> {
    let renewed = Https {
        ca: tls.renew()?,
        resolve: None,
    };
    // The agent looks at the files at most once a second, on a handshake.
    std::thread::sleep(Duration::from_millis(1500));
    let health = format!(
        "https://{HOST_IP}:{}{}",
        deployment.port, deployment.health_path
    );
    let (status, body) = renewed.request("GET", &health, None, None);
    if status != 200 {
        bail!("the renewed certificate is not presented: {status} {body}");
    }
    let _ = writeln!(
        report,
        "  ok    a renewed certificate swapped into the Secret's mount is presented without a restart"
    );
    Ok(())
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
    scrape: &Scrape,
    https: &Https,
    tokens: &Tokens,
    topology: &Topology,
    report: &mut String,
) -> Result<()> {
    // Where the kubelet's probes and Prometheus go: the pod's IP, the node's address.
    let base = format!("https://{HOST_IP}:{}", deployment.port);
    https
        .wait_until_ok(
            &format!("{base}{}", deployment.health_path),
            Duration::from_secs(30),
        )
        .context("the readiness probe never passed")?;
    let _ = writeln!(
        report,
        "  ok    readiness probe {} over HTTPS -> 200",
        deployment.health_path
    );
    let plain = format!(
        "http://{HOST_IP}:{}{}",
        deployment.port, deployment.health_path
    );
    if let Ok((status, _)) = cnitrace_tests::http("GET", &plain, None, None) {
        bail!("plain HTTP answered {status}: the token could cross the network in clear");
    }
    let _ = writeln!(report, "  ok    no answer over plain HTTP");
    let (status, body) = https.request("GET", &format!("{base}/api/v1/node"), None, None);
    if status != 401 {
        bail!("without the token /api/v1/node answered {status}, not 401: {body}");
    }
    let _ = writeln!(
        report,
        "  ok    the Secret's token is enforced (401 without it)"
    );
    // The scrapers' token reads, but opens no session.
    let url = format!("{base}/api/v1/sessions");
    let (status, body) = https.request(
        "POST",
        &url,
        Some(&tokens.read_only),
        Some(&serde_json::json!({})),
    );
    if status != 403 || !body.contains("read-only") {
        bail!("the read-only token's POST /api/v1/sessions answered {status}, not 403: {body}");
    }
    let _ = writeln!(
        report,
        "  ok    the read-only token (the ServiceMonitor's) opens no session (403)"
    );
    // A session over real traffic: iperf3 through the bridged pair, and the rulesets of its
    // namespace read from inside the container through the /run/netns mount.
    let (status, body) = https.request(
        "POST",
        &url,
        Some(&tokens.operator),
        Some(&serde_json::json!({"netns": [topology.node]})),
    );
    if status != 201 {
        bail!("POST /api/v1/sessions: {status} {body}");
    }
    let id = serde_json::from_str::<serde_json::Value>(&body)?["id"]
        .as_u64()
        .context("session id")?;
    let gbps = topology.start_iperf3(3)?.finish()?;
    let (status, body) = https.request(
        "POST",
        &format!("{url}/{id}/stop"),
        Some(&tokens.operator),
        None,
    );
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
    // As Prometheus does: to the node's address, the certificate checked for serverName
    // against the Secret's CA, with the read-only token it is given.
    let (prometheus, checked_for) = match &scrape.server_name {
        Some(name) => (
            Https {
                ca: https.ca.clone(),
                resolve: Some(format!("{name}:{}:{HOST_IP}", deployment.port)),
            },
            name.clone(),
        ),
        None => (
            Https {
                ca: https.ca.clone(),
                resolve: None,
            },
            HOST_IP.to_owned(),
        ),
    };
    let path = &scrape.path;
    let url = format!("https://{checked_for}:{}{path}", deployment.port);
    let (status, body) = prometheus.request("GET", &url, Some(&tokens.read_only), None);
    if status != 200 || !body.contains("cnitrace_") {
        bail!("scrape {path}: {status} {body}");
    }
    let _ = writeln!(
        report,
        "  ok    {path} scraped as the ServiceMonitor does (HTTPS, certificate checked for {checked_for} against the Secret's {}, the read-only token of {}): {} series",
        scrape.ca.1,
        scrape.credentials.0,
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
    fn the_check_finds_the_tls_secret_and_the_scrapes_ca() {
        let deployment = deployment().unwrap();
        let (secret, cert) = deployment.in_secret(&deployment.tls_cert).unwrap();
        assert_eq!(
            (secret, cert.as_path()),
            ("cnitrace-tls", Path::new("tls.crt"))
        );
        let (secret, key) = deployment.in_secret(&deployment.tls_key).unwrap();
        assert_eq!(
            (secret, key.as_path()),
            ("cnitrace-tls", Path::new("tls.key"))
        );
        let scrape = scrape().unwrap();
        assert_eq!(scrape.ca, ("cnitrace-tls".to_owned(), "ca.crt".to_owned()));
        assert_eq!(scrape.server_name.as_deref(), Some("cnitrace.cnitrace.svc"));
    }

    #[test]
    fn the_check_scrapes_with_the_read_only_token_as_the_servicemonitor_does() {
        let deployment = deployment().unwrap();
        let (secret, key) = deployment
            .in_secret(&deployment.read_only_token_path)
            .unwrap();
        assert_eq!(
            (secret, key.as_path()),
            ("cnitrace-read-token", Path::new("token"))
        );
        assert_eq!(
            scrape().unwrap().credentials,
            ("cnitrace-read-token".to_owned(), "token".to_owned())
        );
        let (secret, _) = deployment.in_secret(&deployment.token_path).unwrap();
        assert_eq!(secret, "cnitrace-token");
    }

    /// Kills the TLS server of a test.
    struct Server(std::process::Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_published_secret_is_checked_as_prometheus_checks_it() {
        let dir = SecretDir::create().unwrap();
        let secret = dir.0.join("cnitrace-tls");
        std::fs::create_dir(&secret).unwrap();
        std::fs::create_dir(dir.0.join(".generated")).unwrap();
        let name = "cnitrace.cnitrace.svc";
        let mut tls = TlsSecret {
            dir: secret.clone(),
            generated: dir.0.join(".generated"),
            files: ["tls.crt", "tls.key", "ca.crt"].map(PathBuf::from),
            names: vec![format!("IP:{HOST_IP}"), format!("DNS:{name}")],
            version: 0,
        };
        let first = tls.renew().unwrap();
        let port = std::net::TcpListener::bind((HOST_IP, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // A TLS server on the files as the Secret's mount shows them.
        let _server = Server(
            Command::new("openssl")
                .args(["s_server", "-quiet", "-www", "-accept"])
                .arg(format!("{HOST_IP}:{port}"))
                .arg("-cert")
                .arg(secret.join("tls.crt"))
                .arg("-key")
                .arg(secret.join("tls.key"))
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let prometheus = |ca: PathBuf| Https {
            ca,
            resolve: Some(format!("{name}:{port}:{HOST_IP}")),
        };
        let url = format!("https://{name}:{port}/");
        prometheus(secret.join("ca.crt"))
            .wait_until_ok(&url, Duration::from_secs(10))
            .unwrap();
        let direct = Https {
            ca: first.clone(),
            resolve: None,
        };
        let (status, body) =
            direct.request("GET", &format!("https://{HOST_IP}:{port}/"), None, None);
        assert_eq!(status, 200, "{body}");
        // A renewal swaps all three files at once; the server still has the first certificate,
        // which the new CA does not vouch for.
        let renewed = tls.renew().unwrap();
        for file in ["tls.crt", "ca.crt"] {
            assert_eq!(
                std::fs::read(secret.join(file)).unwrap(),
                std::fs::read(&renewed).unwrap()
            );
        }
        let (status, error) = prometheus(renewed).request("GET", &url, None, None);
        assert_eq!(status, 0, "{error}");
        assert!(prometheus(first).request("GET", &url, Some("t"), None).0 == 200);
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
