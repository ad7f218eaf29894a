//! Reads `perf script` output (from `perf record -a -g`, the usual method) and turns it into a
//! window for the same attribution and breakdown code as cnitrace's own samples, so both can be
//! compared component by component.

use crate::{
    breakdown::{Faults, RawWindow, StackSample},
    contract::{Clock, ClockSource},
};
use cnitrace_common::{SAMPLE_FLAG_IDLE_TASK, SAMPLE_FLAG_USER};

/// The `perf script -F` fields this parser expects.
pub const PERF_SCRIPT_FIELDS: &str = "comm,pid,tid,cpu,period,event,ip,sym,dso";

/// x86-64 kernel addresses live in the upper half.
const KERNEL_SPACE: u64 = 0xffff_8000_0000_0000;

/// One sample per record: kernel frames innermost first, pid 0 flagged as the idle task, no
/// kernel frame flagged as user mode.
pub fn parse(text: &str) -> Result<Vec<StackSample>, crate::Error> {
    let mut samples = Vec::new();
    let mut current: Option<(bool, u64, Vec<String>)> = None;
    let finish = |record: Option<(bool, u64, Vec<String>)>, samples: &mut Vec<StackSample>| {
        if let Some((idle_task, period, frames)) = record {
            let mut flags = if idle_task { SAMPLE_FLAG_IDLE_TASK } else { 0 };
            if frames.is_empty() {
                flags |= SAMPLE_FLAG_USER;
            }
            samples.push(StackSample {
                frames,
                flags,
                stack_lost: false,
                count: 1,
                period,
            });
        }
    };
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            finish(current.take(), &mut samples);
        } else if line.starts_with(char::is_whitespace) {
            let Some((_, _, frames)) = current.as_mut() else {
                continue;
            };
            let mut parts = line.split_whitespace();
            let address = parts.next().and_then(|a| u64::from_str_radix(a, 16).ok());
            let symbol = parts.next().unwrap_or("[unknown]");
            if address.is_some_and(|a| a >= KERNEL_SPACE) {
                frames.push(
                    symbol
                        .split_once("+0x")
                        .map_or(symbol, |(s, _)| s)
                        .to_owned(),
                );
            }
        } else {
            finish(current.take(), &mut samples);
            // comm may contain spaces: the fields after it are pid/tid, [cpu], period, event.
            let fields: Vec<&str> = line.split_whitespace().collect();
            let pid_index = fields
                .iter()
                .position(|f| f.contains('/') && f.split('/').all(|p| p.parse::<u32>().is_ok()));
            let parsed = pid_index.and_then(|i| {
                let pid: u32 = fields[i].split('/').next()?.parse().ok()?;
                let period: u64 = fields.get(i + 2)?.parse().ok()?;
                Some((pid == 0, period))
            });
            let Some((idle_task, period)) = parsed else {
                return Err(crate::Error::InvalidArgument(format!(
                    "line {}: not a `perf script -F {PERF_SCRIPT_FIELDS}` record header: {line}",
                    number + 1
                )));
            };
            current = Some((idle_task, period, Vec::new()));
        }
    }
    finish(current.take(), &mut samples);
    Ok(samples)
}

/// A window over imported samples. cpu-clock periods are nanoseconds, converted with the
/// calibrated cycles per ns, exactly as cnitrace's own cpu-clock samples are.
pub fn window(
    samples: Vec<StackSample>,
    duration_s: f64,
    frequency_hz: u64,
    cpus: u32,
    cycles_per_ns: f64,
) -> RawWindow {
    let now = chrono::Utc::now();
    RawWindow {
        start: now - chrono::Duration::milliseconds((duration_s * 1000.0) as i64),
        end: now,
        duration_s,
        clock: Clock {
            source: ClockSource::CpuClock,
            cycles_per_ns,
            calibration: "imported perf cpu-clock samples; TSC against CLOCK_MONOTONIC".to_owned(),
        },
        frequency_hz: frequency_hz as f64,
        cpus,
        samples,
        ifaces: Vec::new(),
        softirq: Vec::new(),
        softirq_timed: true,
        packet_counter: "the --packets count given to import-perf".to_owned(),
        cpu: crate::breakdown::CpuTicks::default(),
        bpf_programs: Vec::new(),
        bpf_stats: None,
        faults: Faults::default(),
        trace: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breakdown::attribute;

    const SCRIPT: &str = "\
swapper     0/0     [000]    1001001 cpu-clock: 
\tffffffff8225f42b pv_native_safe_halt ([kernel.kallsyms])
\tffffffff82260f35 default_idle ([kernel.kallsyms])

iperf3 worker   973/975   [001]    1001001 cpu-clock: 
\tffffffff81234567 nft_do_chain ([kernel.kallsyms])
\tffffffff81234000 nf_hook_slow ([kernel.kallsyms])
\tffffffff81233000 br_nf_forward_ip ([kernel.kallsyms])
\t           18c84 send (/usr/lib/x86_64-linux-gnu/libc.so.6)

iperf3   973/973   [001]    1001001 cpu-clock: 
\t           18c84 memcpy (/usr/lib/x86_64-linux-gnu/libc.so.6)
";

    #[test]
    fn parses_records_and_classifies_them_like_our_samples() {
        let samples = parse(SCRIPT).unwrap();
        assert_eq!(samples.len(), 3);
        assert_eq!(attribute(&samples[0]), None, "idle");
        assert_eq!(
            samples[1].frames,
            vec!["nft_do_chain", "nf_hook_slow", "br_nf_forward_ip"]
        );
        assert_eq!(attribute(&samples[1]), Some("netfilter.rules"));
        assert_eq!(attribute(&samples[2]), Some(crate::components::OTHER_USER));
        assert_eq!(samples[1].period, 1_001_001);
    }

    #[test]
    fn rejects_other_formats() {
        let err = parse("this is not perf script output\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1") && err.contains(PERF_SCRIPT_FIELDS),
            "{err}"
        );
    }
}
