//! /proc/softirqs and /proc/net/dev text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = cnitrace::breakdown::parse_proc_softirqs(text);
    let _ = cnitrace::probe::devices::parse_proc_net_dev(text);
});
