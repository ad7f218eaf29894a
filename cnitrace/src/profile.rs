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
    if options.backend == Backend::Tracing {
        return Err(Error::InvalidArgument(
            "--backend tracing is not available in this build (exact entry/exit tracing is \
             planned); use --backend sampling or auto"
                .to_owned(),
        ));
    }
    netns::validate_interfaces(&options.ifaces, &options.netns)
}

/// Runs one window. `stop` resolves early to end the window (Ctrl-C): the partial window is
/// still measured and reported. Probes are detached before this returns, on every path.
pub async fn run(
    options: &ProfileOptions,
    stop: impl std::future::Future<Output = ()>,
    mut progress: impl FnMut(f64, f64),
) -> Result<(Breakdown, Ending), Error> {
    validate(options)?;
    let sampler = Sampler::start(&options.sampler)?;
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
    drop(stats);
    drop(sampler);
    // Named interfaces live in this namespace or in one of the --netns ones.
    let netns_inodes = netns::selection_inodes(&options.ifaces, &options.netns)?;
    let selection = PacketSelection {
        ifaces: options.ifaces.clone(),
        netns_inodes,
        unit: options.unit,
    };
    let mut breakdown = session::breakdown_of(&raw, &kallsyms, "sampling", &selection);
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
        o.backend = Backend::Tracing;
        assert!(
            validate(&o)
                .unwrap_err()
                .to_string()
                .contains("--backend tracing")
        );
        assert!(validate(&options()).is_ok());
    }
}
