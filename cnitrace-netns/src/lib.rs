//! Named network namespaces (/run/netns/NAME, as `ip netns` makes them) for the lab and the
//! privileged tests: making and removing them, their devices, addresses and routes over
//! rtnetlink ([`link`]), programs run inside them, and iperf3 streams between them
//! ([`iperf3`]). One crate so that the lab and the tests' fixtures build topologies with the
//! same code; it has no eBPF in it, so the xtask that bootstraps the eBPF toolchain can use it.

pub mod iperf3;
pub mod link;

use std::{os::fd::AsFd as _, path::PathBuf};

pub use link::{LinkSettings, Ns, add_namespace, delete_namespace};

/// What went wrong, naming the namespace, device or program.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A request that cannot be carried out as asked (no such namespace or device, a program
    /// that printed nonsense).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Inode number of a network namespace file: what the kernel calls the namespace's `inum`.
pub fn inode_of(path: &std::path::Path) -> Result<u32, Error> {
    use std::os::unix::fs::MetadataExt as _;
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    u32::try_from(meta.ino())
        .map_err(|_| Error::Invalid(format!("{}: inode out of range", path.display())))
}

/// The inode of a named namespace.
pub fn inode(name: &str) -> Result<u32, Error> {
    validate(name)?;
    inode_of(&path(name))
}

/// Checks that a named namespace exists.
pub fn validate(name: &str) -> Result<(), Error> {
    // `.` and `..` name directories, not namespaces; a namespace is a bind-mounted file.
    if name.is_empty()
        || name.len() > 255
        || name.contains(['/', '\0'])
        || name == "."
        || name == ".."
        || !path(name).is_file()
    {
        return Err(Error::Invalid(format!(
            "unknown network namespace `{name}`: no {} (list them with `ip netns list`)",
            path(name).display()
        )));
    }
    Ok(())
}

/// The processes whose network namespace is the named one (as `ip netns pids`).
pub fn pids_in(name: &str) -> Result<Vec<i32>, Error> {
    let wanted = inode(name)?;
    Ok(std::fs::read_dir("/proc")
        .map_err(|e| Error::io("read /proc", e))?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            inode_of(std::path::Path::new(&format!("/proc/{pid}/ns/net"))).ok() == Some(wanted)
        })
        .collect())
}

/// Ends the processes still running in a namespace (servers of a run that was killed), then
/// deletes it: a namespace whose name is gone but whose processes live on would keep its
/// devices. Its devices, routes, rules and tc programs go with it.
pub async fn remove(name: &str) -> Result<(), Error> {
    for pid in pids_in(name).unwrap_or_default() {
        if pid != std::process::id().cast_signed() {
            // At worst the process is already gone.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    delete_namespace(name).await
}

/// Longest a program run by [`output_in`] may take: a hung tool (an `iptables-save` stuck on
/// a lock, a CNI plugin waiting for a daemon) is killed rather than stalling its caller.
pub const RUN_DEADLINE: std::time::Duration = std::time::Duration::from_mins(1);
/// Most output kept from each of its streams: a ruleset a tenant grew without bound cannot
/// grow the caller's memory without bound.
pub const MAX_OUTPUT: u64 = 64 << 20;
/// Most of a program's stderr kept: diagnostics, never data.
const MAX_STDERR: u64 = 1 << 20;

/// Reads a child's stream up to [`MAX_OUTPUT`] bytes, then drains the rest (so the child
/// never blocks on a full pipe); says whether there was more.
fn capped<R: std::io::Read + Send + 'static>(
    pipe: Option<R>,
    cap: u64,
) -> std::thread::JoinHandle<(Vec<u8>, bool)> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let Some(pipe) = pipe else {
            return (kept, false);
        };
        let mut pipe = std::io::Read::take(pipe, cap + 1);
        let _ = std::io::Read::read_to_end(&mut pipe, &mut kept);
        let over = kept.len() as u64 > cap;
        if over {
            kept.truncate(usize::try_from(cap).unwrap_or(usize::MAX));
            let _ = std::io::copy(&mut pipe.into_inner(), &mut std::io::sink());
        }
        (kept, over)
    })
}

/// Waits for a child at most `deadline` (then kills it), its output capped.
fn finish_within(
    mut child: std::process::Child,
    program: &str,
    deadline: std::time::Duration,
) -> Result<std::process::Output, Error> {
    let (stdout, stderr) = (
        capped(child.stdout.take(), MAX_OUTPUT),
        capped(child.stderr.take(), MAX_STDERR),
    );
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Error::io(format!("wait for {program}"), e))?
        {
            break status;
        }
        if started.elapsed() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Invalid(format!(
                "{program} did not finish within {} s: killed",
                deadline.as_secs()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let join = |reader: std::thread::JoinHandle<(Vec<u8>, bool)>| reader.join().unwrap_or_default();
    let ((stdout, stdout_over), (stderr, _)) = (join(stdout), join(stderr));
    if stdout_over {
        return Err(Error::Invalid(format!(
            "{program} wrote more than {} MiB: not read",
            MAX_OUTPUT >> 20
        )));
    }
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs a program in the named network namespace (`None`: this process's) and returns its
/// output. `Ok(None)` when the program is not installed. It is killed after
/// [`RUN_DEADLINE`], and more than [`MAX_OUTPUT`] on stdout is an error.
pub fn output_in(
    netns: Option<&str>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Option<std::process::Output>, Error> {
    let file = netns
        .map(|name| {
            validate(name)?;
            std::fs::File::open(path(name))
                .map_err(|e| Error::io(format!("open {}", path(name).display()), e))
        })
        .transpose()?;
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|&a| a.to_owned()).collect();
    let stdin = stdin.map(str::to_owned);
    // The child inherits the namespaces of the thread that forks it: enter on a thread of its
    // own so this process's other threads stay where they are.
    std::thread::spawn(move || -> Result<Option<std::process::Output>, Error> {
        use std::io::Write as _;
        if let Some(file) = &file {
            enter(file)?;
        }
        let mut command = std::process::Command::new(&program);
        command
            .args(&args)
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("run {program}"), e)),
        };
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .map_err(|e| Error::io(format!("write to {program}"), e))?;
        }
        finish_within(child, &program, RUN_DEADLINE).map(Some)
    })
    .join()
    .unwrap_or_else(|_| {
        Err(Error::Invalid(
            "namespace command thread panicked".to_owned(),
        ))
    })
}

/// Starts a program in the named network namespace; it keeps running there.
pub fn spawn_in(netns: &str, command: std::process::Command) -> Result<std::process::Child, Error> {
    validate(netns)?;
    let file = std::fs::File::open(path(netns))
        .map_err(|e| Error::io(format!("open {}", path(netns).display()), e))?;
    let mut command = command;
    // Forked from a thread that entered the namespace; the child stays there.
    std::thread::spawn(move || -> Result<std::process::Child, Error> {
        enter(&file)?;
        let program = command.get_program().to_string_lossy().into_owned();
        command
            .spawn()
            .map_err(|e| Error::io(format!("run {program}"), e))
    })
    .join()
    .unwrap_or_else(|_| Err(Error::Invalid("namespace spawn thread panicked".to_owned())))
}

/// Runs `f` on a thread inside the named network namespace (sockets it opens live there).
pub fn run_in<T: Send + 'static, E: From<Error> + Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> std::thread::JoinHandle<Result<T, E>> {
    let file = std::fs::File::open(path(netns));
    std::thread::spawn(move || {
        let file = file.map_err(|e| Error::io("open netns", e))?;
        enter(&file)?;
        f()
    })
}

/// Moves the calling thread into the namespace of `file` (setns affects only this thread).
pub fn enter(file: &std::fs::File) -> Result<(), Error> {
    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| Error::io("setns", e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_namespace_is_named() {
        let err = validate("cnitrace-no-such-ns").unwrap_err().to_string();
        assert!(
            err.contains("cnitrace-no-such-ns") && err.contains("ip netns list"),
            "{err}"
        );
        assert!(validate("../etc").is_err());
        assert!(inode("cnitrace-no-such-ns").is_err());
    }

    #[test]
    fn a_program_that_is_not_installed_is_none() {
        let out = output_in(None, "cnitrace-no-such-program", &[], None).unwrap();
        assert!(out.is_none());
        let out = output_in(None, "true", &[], Some("input"))
            .unwrap()
            .unwrap();
        assert!(out.status.success());
    }
}

#[cfg(test)]
mod run_tests {
    use std::time::{Duration, Instant};

    use super::finish_within;

    fn spawn(script: &str) -> std::process::Child {
        std::process::Command::new("sh")
            .args(["-c", script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    #[test]
    fn a_hung_program_is_killed_at_its_deadline() {
        let started = Instant::now();
        let err =
            finish_within(spawn("sleep 30"), "sleep", Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("did not finish within"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn output_is_kept_and_an_endless_stream_is_refused() {
        let out = finish_within(
            spawn("echo hello; echo oops >&2"),
            "sh",
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(out.stdout, b"hello\n");
        assert_eq!(out.stderr, b"oops\n");
        assert!(out.status.success());
        let err = finish_within(
            spawn("head -c 80000000 /dev/zero"),
            "head",
            Duration::from_mins(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("more than 64 MiB"), "{err}");
    }
}
