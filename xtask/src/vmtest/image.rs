//! The VM image: a Debian cloud kernel fetched with apt, its modules, and an initramfs with
//! busybox, cnitrace, iperf3, iptables, nft, ovs-dpctl and an init script that runs every
//! case.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use std::os::unix::fs::PermissionsExt as _;

use anyhow::{Context as _, Result};

use crate::{run_command, workspace_root};

use super::{MODULES, cases};

pub(super) fn vm_dir() -> PathBuf {
    workspace_root().join("target/vmtest")
}

/// The newest Debian cloud kernel package of a series.
pub(super) fn kernel_package(series: &str) -> Result<String> {
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

/// Downloads a Debian package once (`apt-get download`, nothing installed on this machine) and
/// unpacks it into `dir`/root; returns that root.
fn fetch_package(package: &str, dir: &Path) -> Result<PathBuf> {
    let root = dir.join("root");
    let marker = dir.join(format!("{package}.unpacked"));
    if !marker.exists() {
        std::fs::create_dir_all(dir)?;
        eprintln!("vmtest: downloading {package}");
        // Not run_command: it runs in the workspace root, and the .deb belongs in `dir`.
        let status = Command::new("apt-get")
            .args(["download", package])
            .current_dir(dir)
            .status()
            .context("apt-get download")?;
        anyhow::ensure!(status.success(), "apt-get download {package} failed");
        let deb = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.extension().is_some_and(|e| e == "deb")
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .context("downloaded .deb")?;
        run_command(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        std::fs::write(&marker, "")?;
    }
    Ok(root)
}

/// Downloads and unpacks a kernel package once; returns (unpacked root, kernel release).
pub(super) fn fetch_kernel(package: &str) -> Result<(PathBuf, String)> {
    let dir = vm_dir().join("kernels").join(package);
    let root = if dir.join("root/boot").exists() {
        dir.join("root") // unpacked by an earlier run
    } else {
        fetch_package(package, &dir)?
    };
    let release = std::fs::read_dir(root.join("lib/modules"))?
        .flatten()
        .next()
        .context("no lib/modules in the kernel package")?
        .file_name()
        .to_string_lossy()
        .into_owned();
    Ok((root, release))
}

/// `ovs-dpctl` from Debian's openvswitch-switch, with the libxdp it links that this machine
/// need not have: unpacked under target/vmtest/ovs, never installed (the package would start
/// Open vSwitch's daemons here). Returns the binary and the directory of the extra library.
fn fetch_ovs_dpctl() -> Result<(PathBuf, PathBuf)> {
    let dir = vm_dir().join("ovs");
    // Both unpack into the same root.
    fetch_package("libxdp1", &dir)?;
    let root = fetch_package("openvswitch-switch", &dir)?;
    Ok((
        root.join("usr/bin/ovs-dpctl"),
        root.join("usr/lib/x86_64-linux-gnu"),
    ))
}

pub(super) fn module_index(modules_dir: &Path) -> BTreeMap<String, PathBuf> {
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
pub(super) fn module_bytes(path: &Path) -> Result<Vec<u8>> {
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
pub(super) fn depends(bytes: &[u8]) -> Vec<String> {
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
pub(super) fn copy_with_libraries(
    binary: &Path,
    root: &Path,
    copied: &mut BTreeSet<PathBuf>,
) -> Result<()> {
    copy_with_libraries_from(binary, None, root, copied)
}

/// [`copy_with_libraries`] for a binary unpacked from a package: it goes to /usr/bin, and
/// libraries found in `extra_libraries` go to /usr/lib/x86_64-linux-gnu.
fn copy_with_libraries_from(
    binary: &Path,
    extra_libraries: Option<&Path>,
    root: &Path,
    copied: &mut BTreeSet<PathBuf>,
) -> Result<()> {
    let mut files = vec![binary.to_path_buf()];
    let mut ldd = Command::new("ldd");
    if let Some(dir) = extra_libraries {
        ldd.env("LD_LIBRARY_PATH", dir);
    }
    let out = ldd.arg(binary).output().context("ldd")?;
    anyhow::ensure!(
        !String::from_utf8_lossy(&out.stdout).contains("not found"),
        "{}: a library is missing: {}",
        binary.display(),
        String::from_utf8_lossy(&out.stdout)
    );
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
        let name = file.file_name().context("a file name")?;
        let target = match extra_libraries {
            Some(dir) if file.starts_with(dir) => root.join("usr/lib/x86_64-linux-gnu").join(name),
            Some(_) if file == binary => root.join("usr/bin").join(name),
            _ => root.join(file.strip_prefix("/").unwrap_or(&file)),
        };
        std::fs::create_dir_all(target.parent().expect("parent"))?;
        std::fs::copy(std::fs::canonicalize(&file)?, &target)
            .with_context(|| format!("copy {}", file.display()))?;
    }
    Ok(())
}

pub(super) fn init_script(modules: &[String], cases: &[(&str, Vec<String>)]) -> String {
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
pub(super) fn build_initramfs(
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
    let (ovs_dpctl, ovs_libraries) = fetch_ovs_dpctl()?;
    copy_with_libraries_from(&ovs_dpctl, Some(&ovs_libraries), &root, &mut copied)?;
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
