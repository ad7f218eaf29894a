//! `cargo xtask vmtest`: the tracing backend proven on real distro kernels. Downloads (apt)
//! Debian's cloud kernels 6.1 and 6.12 into target/vmtest, builds an initramfs with busybox,
//! cnitrace, iperf3, iptables, nft and the kernel modules the lab needs, boots each under QEMU
//! (TCG) and runs cnitrace there: the lab's datapaths with the tracing backend in fentry mode,
//! kprobe mode forced, an IP-in-IP tunnel, VXLAN, netfilter under a policy, and the same
//! traffic profiled by sampling and by tracing for the cross-check. The serial console carries
//! each result as JSON between markers; the checks run here.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use std::os::unix::fs::PermissionsExt as _;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{bootstrap, cargo, run_command, workspace_root};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Kernel series to boot (Debian cloud kernels).
    #[arg(long, value_delimiter = ',', default_value = "6.1,6.12")]
    kernels: Vec<String>,
    /// Profiled seconds per run inside the VM.
    #[arg(long, default_value_t = 2)]
    duration: u32,
    /// Give up on a VM after this many seconds.
    #[arg(long, default_value_t = 1200)]
    timeout: u64,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            kernels: vec!["6.1".to_owned(), "6.12".to_owned()],
            duration: 2,
            timeout: 1200,
        }
    }
}

/// Modules the lab needs (their dependencies are added from modinfo).
const MODULES: &[&str] = &[
    "bridge",
    "br_netfilter",
    "veth",
    "vxlan",
    "ipip",
    "nf_tables",
    "nft_compat",
    "nf_conntrack",
    "xt_conntrack",
    "xt_mark",
    "xt_multiport",
    "xt_comment",
    "xt_tcpudp",
    // What the nodes' own rules use (kubelet, kube-proxy, the CNIs' chains).
    "nf_nat",
    "nft_nat",
    "nft_chain_nat",
    "nft_masq",
    "nft_ct",
    "nft_numgen",
    "xt_nat",
    "xt_MASQUERADE",
    "xt_statistic",
    "xt_addrtype",
    "xt_physdev",
    "xt_state",
    "xt_limit",
    "xt_NFLOG",
    "nfnetlink_log",
    "ipt_rpfilter",
    "ipt_REJECT",
    "sch_ingress",
    "cls_bpf",
];

/// One run inside the VM: a name and cnitrace's arguments.
fn cases(duration: u32) -> Vec<(&'static str, Vec<String>)> {
    let lab = |model: &str, scenario: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "lab",
            "bench",
            model,
            "--scenario",
            scenario,
            "--repeat",
            "1",
            "--format",
            "json",
            "--duration",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.push(duration.to_string());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    vec![
        (
            "doctor",
            vec!["doctor".into(), "--format".into(), "json".into()],
        ),
        (
            "vxlan-auto",
            lab("flannel", "inter", &["--backend", "tracing"]),
        ),
        (
            "ipip-kprobe",
            lab(
                "calico-ipip",
                "inter",
                &["--backend", "tracing", "--attach", "kprobe"],
            ),
        ),
        (
            "netfilter-policy",
            lab("calico-wp", "intra", &["--backend", "tracing"]),
        ),
        (
            "fentry-forced",
            lab(
                "calico-np",
                "intra",
                &["--backend", "tracing", "--attach", "fentry"],
            ),
        ),
        (
            "cross-sampling",
            lab("flannel", "intra", &["--backend", "sampling"]),
        ),
        (
            "cross-tracing",
            lab("flannel", "intra", &["--backend", "tracing"]),
        ),
    ]
}

fn vm_dir() -> PathBuf {
    workspace_root().join("target/vmtest")
}

/// The newest Debian cloud kernel package of a series.
fn kernel_package(series: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", "^linux-image-.*cloud-amd64$"])
        .output()
        .context("apt-cache")?;
    let prefix = if series == "6.1" {
        "linux-image-6.1.0-".to_owned()
    } else {
        format!("linux-image-{series}.")
    };
    let version_key = |name: &str| -> Vec<u64> {
        name.trim_start_matches("linux-image-")
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix) && !n.contains("-dbg") && !n.contains("unsigned"))
        .max_by_key(|n| version_key(n))
        .map(str::to_owned)
        .with_context(|| format!("no Debian cloud kernel {series} in apt (apt-get update?)"))
}

/// Downloads and unpacks a kernel package once; returns (unpacked root, kernel release).
fn fetch_kernel(package: &str) -> Result<(PathBuf, String)> {
    let dir = vm_dir().join("kernels").join(package);
    let root = dir.join("root");
    if !root.join("boot").exists() {
        std::fs::create_dir_all(&dir)?;
        eprintln!("vmtest: downloading {package}");
        // Not run_command: it runs in the workspace root, and the .deb belongs in `dir`.
        let status = Command::new("apt-get")
            .args(["download", package])
            .current_dir(&dir)
            .status()
            .context("apt-get download")?;
        anyhow::ensure!(status.success(), "apt-get download {package} failed");
        let deb = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("downloaded .deb")?;
        run_command(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    }
    let release = std::fs::read_dir(root.join("lib/modules"))?
        .flatten()
        .next()
        .context("no lib/modules in the kernel package")?
        .file_name()
        .to_string_lossy()
        .into_owned();
    Ok((root, release))
}

fn module_index(modules_dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut index = BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
                && let Some(stem) = name
                    .strip_suffix(".ko")
                    .or_else(|| name.strip_suffix(".ko.xz"))
            {
                index.insert(stem.replace('-', "_"), path);
            }
        }
    }
    index
}

/// A module's contents, decompressed.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .args(["-dc"])
            .arg(path)
            .output()
            .context("xz")?;
        anyhow::ensure!(out.status.success(), "xz -d {}", path.display());
        Ok(out.stdout)
    } else {
        Ok(std::fs::read(path)?)
    }
}

/// `depends=` of a module's .modinfo.
fn depends(bytes: &[u8]) -> Vec<String> {
    let needle = b"depends=";
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|start| {
            let rest = &bytes[start + needle.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(0);
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

/// Copies `binary` and the shared libraries it loads (per ldd) into `root`.
fn copy_with_libraries(binary: &Path, root: &Path, copied: &mut BTreeSet<PathBuf>) -> Result<()> {
    let mut files = vec![binary.to_path_buf()];
    let out = Command::new("ldd").arg(binary).output().context("ldd")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line
            .split("=>")
            .nth(1)
            .unwrap_or(line)
            .split_whitespace()
            .next()
            .unwrap_or("");
        if path.starts_with('/') {
            files.push(PathBuf::from(path));
        }
    }
    for file in files {
        if !copied.insert(file.clone()) {
            continue;
        }
        let target = root.join(file.strip_prefix("/").unwrap_or(&file));
        std::fs::create_dir_all(target.parent().expect("parent"))?;
        std::fs::copy(std::fs::canonicalize(&file)?, &target)
            .with_context(|| format!("copy {}", file.display()))?;
    }
    Ok(())
}

fn init_script(modules: &[String], cases: &[(&str, Vec<String>)]) -> String {
    let mut script = String::from(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin:/usr/bin:/usr/sbin:/sbin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         mount -t tmpfs run /run\nmount -t tmpfs tmp /tmp\nmount -t bpf bpf /sys/fs/bpf 2>/dev/null\n\
         mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null\n\
         mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null\n\
         ip link set lo up\necho \"@@KERNEL $(uname -r)\"\n",
    );
    for module in modules {
        let _ = writeln!(
            script,
            "modprobe {module} || echo \"@@MODULE-FAILED {module}\""
        );
    }
    for (name, args) in cases {
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let _ = writeln!(
            script,
            "echo '@@CASE {name}'\n/usr/bin/cnitrace {} > /tmp/out 2> /tmp/err\necho \"@@EXIT $?\"\n\
             cat /tmp/out\necho '@@STDERR'\ntail -n 15 /tmp/err\necho '@@END'",
            quoted.join(" ")
        );
    }
    script.push_str("echo '@@DONE'\npoweroff -f\n");
    script
}

/// Builds the initramfs for one kernel; returns its path.
fn build_initramfs(
    kernel_root: &Path,
    release: &str,
    cnitrace: &Path,
    duration: u32,
) -> Result<PathBuf> {
    let work = vm_dir().join(release);
    let root = work.join("root");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc",
    ] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("busybox-static")?;
    let mut copied = BTreeSet::new();
    // cnitrace without debug info (the VM holds the initramfs in RAM).
    let stripped = work.join("cnitrace");
    run_command(Command::new("strip").arg("-o").arg(&stripped).arg(cnitrace))?;
    std::fs::copy(&stripped, root.join("usr/bin/cnitrace"))?;
    copy_with_libraries(&stripped, &root, &mut copied)?;
    std::fs::remove_file(root.join(stripped.strip_prefix("/").expect("absolute")))
        .or_else(|_| std::fs::remove_dir_all(root.join("work")))
        .ok();
    for tool in [
        "/usr/bin/iperf3",
        "/usr/sbin/xtables-nft-multi",
        "/usr/sbin/nft",
    ] {
        copy_with_libraries(Path::new(tool), &root, &mut copied)?;
    }
    for link in [
        "iptables",
        "iptables-restore",
        "iptables-save",
        "iptables-nft-save",
        "iptables-nft-restore",
    ] {
        std::os::unix::fs::symlink("xtables-nft-multi", root.join("usr/sbin").join(link))?;
    }
    let extensions = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
    for entry in std::fs::read_dir(extensions)?.flatten() {
        copy_with_libraries(&entry.path(), &root, &mut copied)?;
    }
    for file in ["/etc/protocols", "/etc/services"] {
        std::fs::copy(file, root.join(&file[1..]))?;
    }
    // Kernel modules, decompressed, with their dependencies; busybox depmod indexes them.
    let modules_dir = kernel_root.join("lib/modules").join(release);
    let index = module_index(&modules_dir);
    let mut wanted: Vec<String> = MODULES.iter().map(|m| (*m).to_owned()).collect();
    let mut done = BTreeSet::new();
    while let Some(module) = wanted.pop() {
        if !done.insert(module.clone()) {
            continue;
        }
        let Some(path) = index.get(&module) else {
            continue; // built in
        };
        let bytes = module_bytes(path)?;
        wanted.extend(depends(&bytes));
        let relative = path.strip_prefix(kernel_root)?;
        let target = root.join(relative.to_string_lossy().trim_end_matches(".xz"));
        std::fs::create_dir_all(target.parent().expect("parent"))?;
        std::fs::write(&target, bytes)?;
    }
    for file in ["modules.order", "modules.builtin"] {
        let _ = std::fs::copy(
            modules_dir.join(file),
            root.join("lib/modules").join(release).join(file),
        );
    }
    run_command(
        Command::new("/bin/busybox")
            .args(["depmod", "-b"])
            .arg(&root)
            .arg(release),
    )?;
    let present: Vec<String> = MODULES
        .iter()
        .filter(|m| index.contains_key(**m))
        .map(|m| (*m).to_owned())
        .collect();
    let init = root.join("init");
    std::fs::write(&init, init_script(&present, &cases(duration)))?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    let cpio = work.join("initrd.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet > {}",
            root.display(),
            cpio.display()
        ))
        .status()?;
    anyhow::ensure!(status.success(), "cpio failed");
    Ok(cpio)
}

/// Boots the kernel with the initramfs under QEMU TCG; returns the serial console output.
fn boot(kernel: &Path, initrd: &Path, log: &Path, timeout: Duration) -> Result<String> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            // One host thread runs both vCPUs: under multi-threaded TCG, code the kernel
            // patches with int3 (static keys, fentry and kprobe sites) was seen executing
            // stale on the other vCPU after the patch ended ("Oops: int3" in
            // sched_clock_cpu and handle_softirqs, once in a few boots of 6.12).
            "-accel",
            "tcg,thread=single",
            "-cpu",
            "max",
            "-m",
            "2048",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log)?)
        .stderr(Stdio::inherit())
        .spawn()
        .context("qemu-system-x86_64 (apt install qemu-system-x86)")?;
    loop {
        if let Some(status) = child.try_wait()? {
            eprintln!(
                "vmtest: VM exited ({status}) after {:.0} s",
                started.elapsed().as_secs_f64()
            );
            break;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the VM did not finish within {} s; console in {}",
                timeout.as_secs(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(String::from_utf8_lossy(&std::fs::read(log)?).replace('\r', ""))
}

/// How many times a kernel is booted when it dies before running its first case.
const BOOT_ATTEMPTS: usize = 3;

/// The console line that shows the kernel died, if it did so before the first case started.
///
/// Such a death is the emulator's, not a test result: the Debian 6.12 kernel has been seen to
/// oops on an int3 in `sched_clock_cpu` while booting under multi-threaded TCG (static keys
/// are patched with int3 while the other vCPU runs), once in several boots.
fn died_before_cases(console: &str) -> Option<&str> {
    if console.contains("@@CASE ") {
        return None;
    }
    console.lines().find(|line| {
        ["Kernel panic", "Oops:", "Fatal exception", "BUG:"]
            .iter()
            .any(|marker| line.contains(marker))
    })
}

/// Boots until the VM gets as far as its cases, retrying a kernel that dies while booting.
fn boot_until_cases_run(
    release: &str,
    vmlinuz: &Path,
    initrd: &Path,
    log: &Path,
    timeout_s: u64,
) -> Result<String> {
    let mut attempt = 1;
    loop {
        let console = boot(vmlinuz, initrd, log, Duration::from_secs(timeout_s))?;
        match died_before_cases(&console) {
            Some(line) if attempt < BOOT_ATTEMPTS => {
                attempt += 1;
                eprintln!(
                    "vmtest: {release}: the kernel died while booting, before any case ({}); \
                     booting again (attempt {attempt} of {BOOT_ATTEMPTS})",
                    line.trim()
                );
            }
            _ => return Ok(console),
        }
    }
}

/// A case's output: exit status, stdout (JSON) and stderr tail.
struct CaseOutput {
    exit: i32,
    stdout: String,
    stderr: String,
}

fn parse_console(console: &str) -> BTreeMap<String, CaseOutput> {
    let mut out = BTreeMap::new();
    let mut lines = console.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("@@CASE ") else {
            continue;
        };
        let mut exit = -1;
        let (mut stdout, mut stderr) = (String::new(), String::new());
        let mut in_stderr = false;
        for line in lines.by_ref() {
            if let Some(code) = line.strip_prefix("@@EXIT ") {
                exit = code.trim().parse().unwrap_or(-1);
            } else if line == "@@STDERR" {
                in_stderr = true;
            } else if line == "@@END" {
                break;
            } else if in_stderr {
                stderr.push_str(line);
                stderr.push('\n');
            } else {
                stdout.push_str(line);
                stdout.push('\n');
            }
        }
        out.insert(
            name.trim().to_owned(),
            CaseOutput {
                exit,
                stdout,
                stderr,
            },
        );
    }
    out
}

fn entry(outputs: &BTreeMap<String, CaseOutput>, case: &str) -> Result<Value> {
    let output = outputs
        .get(case)
        .with_context(|| format!("case {case} did not run"))?;
    if output.exit != 0 {
        bail!(
            "case {case} failed (exit {}): {}",
            output.exit,
            output.stderr.trim()
        );
    }
    let json: Value = serde_json::from_str(&output.stdout)
        .with_context(|| format!("case {case}: no JSON: {}", output.stdout))?;
    Ok(json.get(0).cloned().unwrap_or(json))
}

fn cpp(entry: &Value, component: &str) -> f64 {
    entry["components"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == component))
        .and_then(|c| c["cpp"]["mean"].as_f64())
        .unwrap_or(0.0)
}

fn share(entry: &Value, component: &str) -> f64 {
    let b = &entry["breakdown"];
    let total = b["total"]["cycles"].as_f64().unwrap_or(0.0);
    b["components"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == component))
        .and_then(|c| c["cycles"].as_f64())
        .map_or(0.0, |c| if total > 0.0 { c / total } else { 0.0 })
}

/// A traced component's share with the probes' own cost (calls x calibrated pair cost) taken
/// out of it and of the total: what the datapath cost without the instrument.
fn net_share(entry: &Value, component: &str) -> Option<f64> {
    let b = &entry["breakdown"];
    let tracing = &b["quality"]["tracing"];
    let cycles_per_ns = b["clock"]["cycles_per_ns"].as_f64()?;
    let packets = b["packets"]["count"].as_f64()?;
    let components = tracing["components"].as_array()?;
    let probes: f64 = components
        .iter()
        .map(|c| {
            c["hits"].as_f64().unwrap_or(0.0)
                * c["probe_pair_ns"].as_f64().unwrap_or(0.0)
                * cycles_per_ns
        })
        .sum();
    let total = b["total"]["cycles"].as_f64()? - probes;
    let net = components
        .iter()
        .find(|c| c["name"] == component)
        .and_then(|c| c["cpp_net_of_probes"].as_f64())
        .map_or(0.0, |cpp| cpp * packets);
    (total > 0.0).then(|| net / total)
}

fn modes(entry: &Value) -> BTreeMap<String, String> {
    entry["breakdown"]["quality"]["tracing"]["functions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            (
                f["function"].as_str().unwrap_or("").to_owned(),
                f["mode"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// The calibrated pair cost of a mode, from a traced component attached only that way.
fn pair_ns(entry: &Value, component: &str) -> Option<f64> {
    entry["breakdown"]["quality"]["tracing"]["components"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == component)?["probe_pair_ns"]
        .as_f64()
}

/// Percentage points by which a major component's part of the datapath (its share of
/// bridge + netfilter + veth) may differ between sampling and tracing (net of the calibrated
/// probe cost); both must also find the same cheapest component.
///
/// The two runs are consecutive streams of the same lab model. Sampling at 999 Hz over 2 s of
/// 2 CPUs takes ~4000 samples: a 3% share has a binomial standard error of ~0.3 pp. The larger
/// term is the instrument: under TCG a probe pair costs 1.1-3.5 us (about 100x a real
/// machine), as much as a traced function's own work, and more of it lands inside the traced
/// function than the calibration's half-and-half model takes out. So absolute shares are not
/// comparable under TCG: over six runs on 6.1 and 6.12, tracing net of probes read 1.4-4.3 pp
/// (1.5-3x) above sampling for every component (shares of 1-4% by sampling). That inflation
/// is roughly common to all traced functions, so the mix among them is what the two
/// instruments must agree on: over four recorded runs the parts differed by at most 12.4 pp,
/// with the kprobe-traced components (bridge, veth) reading higher under tracing and the
/// fentry-traced one (netfilter) lower, as kprobes cost more than fentry. 20 pp keeps a margin
/// over that and still fails if one backend puts a major component's work elsewhere. The
/// absolute shares are printed for the record. Bridge and netfilter can be within a point of
/// each other (their order flipped once), so only the cheapest component (veth, clearly
/// apart) is compared by rank.
const CROSS_CHECK_PP: f64 = 20.0;

/// Checks one kernel's results; returns the summary lines and the failures.
fn check(release: &str, outputs: &BTreeMap<String, CaseOutput>) -> (Vec<String>, Vec<String>) {
    let mut summary = Vec::new();
    let mut failures = Vec::new();
    let mut notes = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if ok {
            summary.push(format!("  ok    {what}"));
        } else {
            summary.push(format!("  FAIL  {what}"));
            failures.push(format!("{release}: {what}"));
        }
    };
    match entry(outputs, "vxlan-auto") {
        Ok(e) => {
            let m = modes(&e);
            expect(
                cpp(&e, "vxlan") > 0.0,
                format!(
                    "flannel inter, tracing auto: vxlan {:.0} CPP > 0",
                    cpp(&e, "vxlan")
                ),
            );
            expect(
                cpp(&e, "bridge") > 0.0,
                format!(
                    "flannel inter, tracing auto: bridge {:.0} CPP > 0",
                    cpp(&e, "bridge")
                ),
            );
            expect(
                m.get("ip_forward").is_some_and(|x| x == "fentry")
                    && m.get("br_forward").is_some_and(|x| x == "kprobe"),
                format!(
                    "auto attach: vmlinux functions by fentry, module functions by kprobe ({m:?})"
                ),
            );
        }
        Err(e) => expect(false, format!("vxlan-auto: {e:#}")),
    }
    match entry(outputs, "ipip-kprobe") {
        Ok(e) => {
            let m = modes(&e);
            expect(
                cpp(&e, "ipip") > 0.0,
                format!(
                    "calico-ipip inter, kprobe forced: ipip {:.0} CPP > 0",
                    cpp(&e, "ipip")
                ),
            );
            expect(
                m.values().all(|x| x == "kprobe" || x == "not attached")
                    && m.values().any(|x| x == "kprobe"),
                "kprobe forced: every attached function is a kprobe".to_owned(),
            );
        }
        Err(e) => expect(false, format!("ipip-kprobe: {e:#}")),
    }
    match entry(outputs, "netfilter-policy") {
        Ok(e) => expect(
            cpp(&e, "netfilter") > 0.0,
            format!(
                "calico-wp intra, tracing: netfilter {:.0} CPP > 0",
                cpp(&e, "netfilter")
            ),
        ),
        Err(e) => expect(false, format!("netfilter-policy: {e:#}")),
    }
    match entry(outputs, "fentry-forced") {
        Ok(e) => {
            let m = modes(&e);
            expect(
                m.get("ip_forward").is_some_and(|x| x == "fentry")
                    && m.values().all(|x| x == "fentry" || x == "not attached"),
                format!("fentry forced: vmlinux functions by fentry, no kprobe ({m:?})"),
            );
            expect(
                cpp(&e, "ip_forward") > 0.0,
                format!(
                    "calico-np intra, fentry: ip_forward {:.0} CPP > 0",
                    cpp(&e, "ip_forward")
                ),
            );
        }
        Err(e) => expect(false, format!("fentry-forced: {e:#}")),
    }
    match (
        entry(outputs, "cross-sampling"),
        entry(outputs, "cross-tracing"),
    ) {
        (Ok(s), Ok(t)) => {
            fn rank(shares: &[(&'static str, f64)]) -> Vec<&'static str> {
                let mut order = shares.to_vec();
                order.sort_by(|a, b| b.1.total_cmp(&a.1));
                order.into_iter().map(|(name, _)| name).collect()
            }
            let majors = ["bridge", "netfilter", "veth"];
            let sampled: Vec<(&'static str, f64)> =
                majors.iter().map(|&c| (c, share(&s, c))).collect();
            let traced: Vec<(&'static str, f64)> = majors
                .iter()
                .map(|&c| (c, net_share(&t, c).unwrap_or(0.0)))
                .collect();
            // Bridge and netfilter can be within a point of each other, so their order is
            // reported, not asserted; the cheapest component must be the same.
            notes.push(format!(
                "  info  flannel intra ranking: sampling {:?}, tracing {:?}",
                rank(&sampled),
                rank(&traced)
            ));
            expect(
                rank(&sampled).last() == rank(&traced).last(),
                format!(
                    "flannel intra: the cheapest component is the same for both backends ({:?} / {:?})",
                    rank(&sampled).last(),
                    rank(&traced).last()
                ),
            );
            let part = |shares: &[(&'static str, f64)], component: &str| {
                let sum: f64 = shares.iter().map(|(_, v)| v).sum();
                shares
                    .iter()
                    .find(|(name, _)| *name == component)
                    .map_or(0.0, |(_, v)| if sum > 0.0 { v / sum * 100.0 } else { 0.0 })
            };
            for component in majors {
                let sampled_share = share(&s, component) * 100.0;
                let traced_share = share(&t, component) * 100.0;
                let net_share = net_share(&t, component).map_or(f64::NAN, |v| v * 100.0);
                notes.push(format!(
                    "  info  flannel intra {component} share: sampling {sampled_share:.1}%, tracing {net_share:.1}% net of probe cost ({traced_share:.1}% as measured)"
                ));
                let (sampled, net) = (part(&sampled, component), part(&traced, component));
                expect(
                    (sampled - net).abs() <= CROSS_CHECK_PP,
                    format!(
                        "flannel intra {component}: {sampled:.1}% of bridge+netfilter+veth by sampling vs {net:.1}% by tracing net of probe cost (within {CROSS_CHECK_PP} pp)"
                    ),
                );
            }
        }
        (s, t) => expect(false, format!("cross-check: {:?} / {:?}", s.err(), t.err())),
    }
    // netfilter (nf_hook_slow, vmlinux) is traced by fentry in auto mode, by kprobe when forced.
    summary.append(&mut notes);
    let fentry = entry(outputs, "netfilter-policy")
        .ok()
        .and_then(|e| pair_ns(&e, "netfilter"));
    let kprobe = entry(outputs, "ipip-kprobe")
        .ok()
        .and_then(|e| pair_ns(&e, "ipip"));
    summary.push(format!(
        "  probe pair cost: fentry {} ns, kprobe {} ns{}",
        fentry.map_or("-".to_owned(), |v| format!("{v:.0}")),
        kprobe.map_or("-".to_owned(), |v| format!("{v:.0}")),
        match (fentry, kprobe) {
            (Some(f), Some(k)) if f > 0.0 =>
                format!(", kprobe/fentry = {:.2} (TCG inflates absolutes)", k / f),
            _ => String::new(),
        }
    ));
    (summary, failures)
}

/// Runs every kernel's cases; returns the summary (`cargo xtask vmtest` keeps it in
/// BENCHMARKS.md for the probe-pair costs; the test command prints it).
pub fn run(args: &Args) -> Result<String> {
    if !crate::is_root() {
        bail!("vmtest needs root (apt, dpkg-deb)");
    }
    bootstrap::ensure()?;
    run_command(cargo().args(["build", "--package", "cnitrace"]))?;
    let cnitrace = workspace_root().join("target/debug/cnitrace");
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for series in &args.kernels {
        let package = kernel_package(series)?;
        let (kernel_root, release) = fetch_kernel(&package)?;
        eprintln!("vmtest: {release}: building the initramfs");
        let initrd = build_initramfs(&kernel_root, &release, &cnitrace, args.duration)?;
        let vmlinuz = kernel_root.join("boot").join(format!("vmlinuz-{release}"));
        let log = vm_dir().join(&release).join("console.log");
        eprintln!(
            "vmtest: {release}: booting under QEMU TCG (console: {})",
            log.display()
        );
        let console = boot_until_cases_run(&release, &vmlinuz, &initrd, &log, args.timeout)?;
        for line in console.lines().filter(|l| l.starts_with("@@MODULE-FAILED")) {
            eprintln!("vmtest: {release}: {line}");
        }
        if !console.contains("@@DONE") {
            failures.push(format!(
                "{release}: the VM did not finish its cases (see {})",
                log.display()
            ));
        }
        let outputs = parse_console(&console);
        let (summary, failed) = check(&release, &outputs);
        report.push(format!("{release} ({package}):"));
        report.extend(summary);
        failures.extend(failed);
    }
    let summary = format!("vmtest summary:\n{}\n", report.join("\n"));
    if !failures.is_empty() {
        print!("{summary}");
        bail!("vmtest failed:\n  {}", failures.join("\n  "));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_death_is_told_from_a_failed_case() {
        let oops = "[ 1.2] Oops: int3: 0000 [#1] PREEMPT SMP\n[ 1.3] Kernel panic - not syncing: Fatal exception in interrupt\n";
        assert!(died_before_cases(oops).is_some_and(|l| l.contains("Oops")));
        let after_a_case = format!("@@CASE a\n@@EXIT 1\n{oops}");
        assert_eq!(died_before_cases(&after_a_case), None);
        assert_eq!(died_before_cases("booted\n@@CASE a\n@@DONE\n"), None);
    }

    #[test]
    fn console_cases_are_parsed() {
        let console = "noise\n@@CASE a\n@@EXIT 0\n[1]\n@@STDERR\nwarn\n@@END\n@@CASE b\n@@EXIT 3\n@@STDERR\n@@END\n";
        let out = parse_console(console);
        assert_eq!(out["a"].exit, 0);
        assert_eq!(out["a"].stdout.trim(), "[1]");
        assert_eq!(out["a"].stderr.trim(), "warn");
        assert_eq!(out["b"].exit, 3);
    }

    #[test]
    fn modinfo_depends() {
        let bytes = b"\0license=GPL\0depends=stp,llc\0vermagic=6.1\0";
        assert_eq!(depends(bytes), vec!["stp", "llc"]);
        assert!(depends(b"\0depends=\0").is_empty());
    }
}
