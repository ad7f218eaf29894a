//! One profiling window from the command line: validate, attach, wait, snapshot, detach.

use std::time::Duration;

use crate::{
    contract::Breakdown,
    error::Error,
    probe::{
        Backend, KernelProbes,
        sampling::{ProbeConfig, validate_frequency},
    },
    window::{OpenWindow, WindowSpec},
};

/// Longest window `profile` accepts (a day); longer runs belong to `cnitrace agent`.
pub const MAX_DURATION_S: f64 = 86_400.0;

#[derive(Debug, Clone)]
pub struct ProfileOptions {
    pub duration_s: f64,
    /// `None`: auto (see [`KernelProbes::start`]).
    pub backend: Option<Backend>,
    pub sampler: ProbeConfig,
    pub window: WindowSpec,
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
    options.window.validate()
}

/// Starts the backend the options ask for.
pub fn start_probes(options: &ProfileOptions) -> Result<KernelProbes, Error> {
    KernelProbes::start(options.backend, &options.sampler)
}

/// Runs one window. `stop` resolves early to end the window (Ctrl-C): the partial window is
/// still measured and reported. Probes are detached before this returns, on every path.
pub async fn run(
    options: &ProfileOptions,
    stop: impl std::future::Future<Output = ()>,
    progress: impl FnMut(f64, f64),
) -> Result<(Breakdown, Ending), Error> {
    validate(options)?;
    let probes = start_probes(options)?;
    run_started(options, probes, stop, progress).await
}

/// One window with probes already started (start-up can take seconds on slow machines, so
/// a benchmark starts its traffic after it). Detaches the probes before returning.
pub async fn run_started(
    options: &ProfileOptions,
    probes: KernelProbes,
    stop: impl std::future::Future<Output = ()>,
    mut progress: impl FnMut(f64, f64),
) -> Result<(Breakdown, Ending), Error> {
    let window = OpenWindow::open(&probes, &options.window)?;
    let started = window.start().mono;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(options.duration_s);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(stop);
    let ending = loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break Ending::Elapsed,
            () = &mut stop => break Ending::Interrupted,
            _ = ticker.tick() => progress(started.elapsed().as_secs_f64(), options.duration_s),
        }
    };
    let breakdown = window.close(&probes)?;
    drop(probes);
    Ok((breakdown, ending))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ProfileOptions {
        ProfileOptions {
            duration_s: 1.0,
            backend: None,
            sampler: ProbeConfig::default(),
            window: WindowSpec::default(),
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
    fn rejects_bad_frequency() {
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
        assert!(validate(&options()).is_ok());
    }
}
