//! One profiling window from the command line: validate, attach, wait, snapshot, detach.

use std::time::Duration;

use crate::{
    breakdown::{Breakdown, PacketSelection, PacketUnit},
    error::Error,
    kallsyms::Kallsyms,
    netfilter, netns,
    probe::{
        bpf_stats::StatsGuard,
        sampling::{Sampler, SamplerConfig, validate_frequency},
        trace::{self, AttachMode},
    },
    session,
};

/// Longest window `profile` accepts (a day); longer runs belong to `cnitrace agent`.
pub const MAX_DURATION_S: f64 = 86_400.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    #[default]
    Auto,
    Sampling,
    Tracing,
}

#[derive(Debug, Clone)]
pub struct ProfileOptions {
    pub duration_s: f64,
    pub backend: Backend,
    /// How the tracing backend attaches (ignored when sampling).
    pub attach: AttachMode,
    pub sampler: SamplerConfig,
    pub ifaces: Vec<String>,
    pub netns: Vec<String>,
    pub unit: PacketUnit,
    /// Rulesets to read and whether to count hook entries (the `netfilter` section).
    pub netfilter: netfilter::Options,
}

/// How the window ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Elapsed,
    Interrupted,
}

pub fn validate_duration(duration_s: f64) -> Result<(), Error> {
    if !duration_s.is_finite() || duration_s <= 0.0 || duration_s > MAX_DURATION_S {
        return Err(Error::InvalidArgument(format!(
            "--duration {duration_s} is out of range: give seconds in (0, {MAX_DURATION_S}]"
        )));
    }
    Ok(())
}

/// Checks everything that can be checked without privileges, before anything is attached.
pub fn validate(options: &ProfileOptions) -> Result<(), Error> {
    validate_duration(options.duration_s)?;
    validate_frequency(options.sampler.frequency_hz)?;
    if options.backend == Backend::Sampling && options.attach != AttachMode::Auto {
        return Err(Error::InvalidArgument(
            "--attach applies to the tracing backend: use it with --backend tracing or auto"
                .to_owned(),
        ));
    }
    netns::validate_interfaces(&options.ifaces, &options.netns)
}

/// Starts the backend the options ask for. Auto: tracing where the kernel has kprobes (the
/// fallback every traced function can use) or when an attach mode is forced, else sampling;
/// if tracing cannot start under auto, sampling.
pub fn start_probes(options: &ProfileOptions) -> Result<Sampler, Error> {
    start_backend(options.backend, options.attach, &options.sampler)
}

/// [`start_probes`] for callers without a window of their own (the agent).
pub fn start_backend(
    backend: Backend,
    attach: AttachMode,
    sampler: &SamplerConfig,
) -> Result<Sampler, Error> {
    let tracing = SamplerConfig {
        tracing: Some(attach),
        ..sampler.clone()
    };
    let sampling = SamplerConfig {
        tracing: None,
        ..sampler.clone()
    };
    match backend {
        Backend::Tracing => Sampler::start(&tracing),
        Backend::Auto if attach != AttachMode::Auto => Sampler::start(&tracing),
        Backend::Auto if trace::kprobes_available() => Sampler::start(&tracing).or_else(|e| {
            tracing::warn!("tracing backend unavailable ({e}); sampling instead");
            Sampler::start(&sampling)
        }),
        Backend::Sampling | Backend::Auto => Sampler::start(&sampling),
    }
}

/// Runs one window. `stop` resolves early to end the window (Ctrl-C): the partial window is
/// still measured and reported. Probes are detached before this returns, on every path.
pub async fn run(
    options: &ProfileOptions,
    stop: impl std::future::Future<Output = ()>,
    progress: impl FnMut(f64, f64),
) -> Result<(Breakdown, Ending), Error> {
    validate(options)?;
    let sampler = start_probes(options)?;
    run_started(options, sampler, stop, progress).await
}

/// One window with probes already started (start-up can take seconds on slow machines, so
/// a benchmark starts its traffic after it). Detaches the probes before returning.
pub async fn run_started(
    options: &ProfileOptions,
    sampler: Sampler,
    stop: impl std::future::Future<Output = ()>,
    mut progress: impl FnMut(f64, f64),
) -> Result<(Breakdown, Ending), Error> {
    // Run-time statistics cost two clock reads per BPF program run: on only for the window.
    let stats = match StatsGuard::enable() {
        Ok(guard) => Some(guard),
        Err(e) => {
            tracing::warn!(
                "BPF run-time statistics unavailable ({e}); the bpf component stays sampled"
            );
            None
        }
    };
    let mut netfilter_notes = Vec::new();
    let rules = match netfilter::Window::begin(&options.netfilter) {
        Ok(window) => Some(window),
        // Counting was asked for explicitly; reading rules is a best-effort extra.
        Err(e) if !options.netfilter.count_entries => {
            netfilter_notes.push(format!("rulesets not read: {e}"));
            None
        }
        Err(e) => return Err(e),
    };
    let start = sampler.snapshot()?;
    let total = Duration::from_secs_f64(options.duration_s);
    let deadline = tokio::time::Instant::now() + total;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(stop);
    let ending = loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break Ending::Elapsed,
            () = &mut stop => break Ending::Interrupted,
            _ = ticker.tick() => progress(start.mono.elapsed().as_secs_f64(), options.duration_s),
        }
    };
    let end = sampler.snapshot()?;
    let walks = match rules.map(netfilter::Window::end).transpose() {
        Ok(walks) => walks,
        Err(e) if !options.netfilter.count_entries => {
            netfilter_notes.push(format!("rulesets not read: {e}"));
            None
        }
        Err(e) => return Err(e),
    };
    let mode = stats.as_ref().map(StatsGuard::mode);
    let kallsyms = Kallsyms::load()?;
    let raw = sampler.window(&start, &end, &kallsyms, mode)?;
    let backend = if sampler.tracer().is_some() {
        "tracing"
    } else {
        "sampling"
    };
    drop(stats);
    drop(sampler);
    // Named interfaces live in this namespace or in one of the --netns ones.
    let netns_inodes = netns::selection_inodes(&options.ifaces, &options.netns)?;
    let selection = PacketSelection {
        ifaces: options.ifaces.clone(),
        netns_inodes,
        unit: options.unit,
    };
    let mut breakdown = session::breakdown_of(&raw, &kallsyms, backend, &selection);
    let (chains, notes) = walks.unwrap_or_default();
    netfilter_notes.extend(notes);
    netfilter::apply(&mut breakdown.netfilter, chains, netfilter_notes);
    Ok((breakdown, ending))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ProfileOptions {
        ProfileOptions {
            duration_s: 1.0,
            backend: Backend::Auto,
            attach: AttachMode::Auto,
            sampler: SamplerConfig::default(),
            ifaces: Vec::new(),
            netns: Vec::new(),
            unit: PacketUnit::Segment,
            netfilter: netfilter::Options::default(),
        }
    }

    #[test]
    fn rejects_bad_durations() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e9] {
            let err = validate_duration(bad).unwrap_err().to_string();
            assert!(err.contains("--duration"), "{err}");
        }
        assert!(validate_duration(0.5).is_ok());
    }

    #[test]
    fn rejects_bad_frequency_and_tracing() {
        let mut o = options();
        o.sampler.frequency_hz = 0;
        assert!(
            validate(&o)
                .unwrap_err()
                .to_string()
                .contains("--frequency 0")
        );
        o.sampler.frequency_hz = 1_000_000;
        assert!(
            validate(&o)
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
        let mut o = options();
        o.backend = Backend::Sampling;
        o.attach = AttachMode::Kprobe;
        assert!(validate(&o).unwrap_err().to_string().contains("--attach"));
        assert!(validate(&options()).is_ok());
    }
}
