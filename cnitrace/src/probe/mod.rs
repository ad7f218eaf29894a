//! Kernel-facing mechanisms. Each reports what it could attach and why not; nothing above this
//! module needs privileges. [`KernelProbes`] is the one object that holds them attached.

pub mod bpf_stats;
pub mod btf;
pub mod clock;
pub mod devices;
mod kernel;
pub mod memory;
pub mod privileges;
pub mod sampling;
pub mod trace;
pub mod tracefs;

use std::sync::Arc;

use aya::Ebpf;

pub use kernel::KernelProbes;
pub use trace::AttachMode;

use crate::{breakdown::RawWindow, contract::Unavailable, error::Error, snapshot::Snapshot};

/// What a window needs from the kernel side. [`KernelProbes`] implements it;
/// router tests use a synthetic one, so everything above the probes runs without privileges.
pub trait Probes: Send + Sync + 'static {
    /// The cumulative counters now.
    fn snapshot(&self) -> Result<Snapshot, Error>;
    /// The window between two snapshots, symbolized. `bpf_stats` says how BPF run-time
    /// statistics were enabled over the window, if they were.
    fn window(
        &self,
        start: &Snapshot,
        end: &Snapshot,
        bpf_stats: Option<&str>,
    ) -> Result<RawWindow, Error>;
    /// Components this node lacks, with the reason.
    fn unavailable(&self) -> Vec<Unavailable>;
    /// The backend these probes implement (fixed once attached).
    fn backend(&self) -> Backend;
    /// Keeps the kernel maps from filling: retires the sample keys and stacks of the current
    /// epoch once more than `advance_at` keys or stacks exist, and on the next call moves the
    /// retired keys out of the kernel map, keeping their final values (and stacks) in user
    /// space while `oldest_baseline` (the oldest snapshot any open window or the ring still
    /// measures from) was taken before the retirement. Called once a second by the agent.
    fn maintain(
        &self,
        _oldest_baseline: Option<std::time::Instant>,
        _advance_at: usize,
    ) -> Result<Maintenance, Error> {
        Ok(Maintenance::default())
    }
    /// Samples at `hz` per CPU from now on, 0 detaching the sampler; a no-op where nothing
    /// samples (the tracing backend, synthetic probes).
    fn set_rate(&self, _hz: u64) -> Result<(), Error> {
        Ok(())
    }
    /// The sampling rate now (0 when detached or not sampling).
    fn rate(&self) -> u64 {
        0
    }
    /// Whether the sampler ran for all of `[start, end]` (a window with a detached part has
    /// packets without their cycles).
    fn sampled_throughout(&self, _start: std::time::Instant, _end: std::time::Instant) -> bool {
        true
    }
    /// Distinct sample keys the kernel aggregate holds (sized from the CPU count).
    fn sample_capacity(&self) -> usize {
        cnitrace_common::MAX_SAMPLE_KEYS as usize
    }
    /// Switches BPF run-time statistics on while the returned guard (shared by every window
    /// that asked) lives; `None` if the kernel refuses.
    fn bpf_stats(&self) -> Option<Arc<bpf_stats::StatsGuard>> {
        bpf_stats::shared()
            .inspect_err(|e| tracing::warn!("BPF run-time statistics unavailable: {e}"))
            .ok()
    }
}

/// What one [`Probes::maintain`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// The epoch samples are now keyed with.
    pub epoch: u32,
    /// An epoch was retired by this call.
    pub advanced: bool,
    /// Keys and stacks deleted from the kernel maps by this call.
    pub keys_deleted: usize,
    pub stacks_deleted: usize,
    /// Final values of deleted keys still kept in user space for open windows, and the
    /// memory they (and their stacks) take.
    pub keys_held: usize,
    pub bytes_held: usize,
    /// Samples of retired epochs dropped by the memory budget since start.
    pub samples_dropped: u64,
}

/// How cycles are attributed to components: stack sampling, or entry/exit probes on each
/// component's functions attached as the mode says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sampling,
    Tracing(AttachMode),
}

/// `--backend` on the command line; `auto` leaves the choice to [`KernelProbes::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendKind {
    #[default]
    Auto,
    Sampling,
    Tracing,
}

impl Backend {
    /// The name in the Breakdown's `backend` field.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sampling => "sampling",
            Self::Tracing(_) => "tracing",
        }
    }

    /// The backend `--backend` and `--attach` ask for; `None` means auto. An attach mode is
    /// only meaningful for tracing, so forcing one selects tracing under auto and is an error
    /// with sampling.
    pub fn requested(kind: BackendKind, attach: AttachMode) -> Result<Option<Self>, Error> {
        match (kind, attach) {
            (BackendKind::Sampling, AttachMode::Auto) => Ok(Some(Self::Sampling)),
            (BackendKind::Sampling, _) => Err(Error::InvalidArgument(
                "--attach applies to the tracing backend: use it with --backend tracing or auto"
                    .to_owned(),
            )),
            (BackendKind::Auto, AttachMode::Auto) => Ok(None),
            (BackendKind::Tracing | BackendKind::Auto, mode) => Ok(Some(Self::Tracing(mode))),
        }
    }
}

/// The eBPF object built by build.rs from cnitrace-ebpf, embedded in the binary.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cnitrace"));

pub(crate) fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Object(format!("program {name} missing from the eBPF object")))?;
    prog.try_into()
        .map_err(|e| Error::program(format!("program {name}"), e))
}

pub(crate) fn map_ref<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .map(name)
        .ok_or_else(|| Error::Object(format!("map {name} missing from the eBPF object")))?;
    T::try_from(map).map_err(|e| Error::map(name, e))
}

#[cfg(test)]
mod tests {
    use super::{AttachMode, Backend, BackendKind};
    use object::{
        Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SectionKind,
    };

    #[test]
    fn attach_mode_selects_tracing_and_conflicts_with_sampling() {
        assert_eq!(
            Backend::requested(BackendKind::Auto, AttachMode::Auto).unwrap(),
            None
        );
        assert_eq!(
            Backend::requested(BackendKind::Auto, AttachMode::Kprobe).unwrap(),
            Some(Backend::Tracing(AttachMode::Kprobe))
        );
        let err = Backend::requested(BackendKind::Sampling, AttachMode::Fentry).unwrap_err();
        assert!(err.to_string().contains("--attach"), "{err}");
    }

    /// A call to a compiler builtin becomes a BPF subprogram that kallsyms lists as a program of
    /// its own (`bpf_prog_<tag>_memset`), outside cnitrace's names, and would be counted as
    /// datapath BPF. No program section may call one.
    #[test]
    fn programs_call_no_compiler_builtins() {
        let file = object::File::parse(super::EBPF_OBJECT).expect("the embedded eBPF object");
        let mut programs = 0;
        for section in file.sections() {
            let name = section.name().unwrap_or("");
            if section.kind() != SectionKind::Text || name == ".text" {
                continue;
            }
            programs += 1;
            for (_, relocation) in section.relocations() {
                if let RelocationTarget::Symbol(index) = relocation.target() {
                    let target = file
                        .symbol_by_index(index)
                        .and_then(|s| s.name())
                        .unwrap_or("");
                    assert!(
                        !["memset", "memcpy", "memmove", "memcmp", "bcmp"].contains(&target),
                        "{name} calls the builtin {target}"
                    );
                }
            }
        }
        assert!(
            programs >= 5,
            "expected every program section, found {programs}"
        );
    }
}
