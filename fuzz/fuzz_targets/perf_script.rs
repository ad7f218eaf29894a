//! `perf script` output for `cnitrace import-perf`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(samples) = cnitrace::perf_import::parse(text) {
        for sample in &samples {
            let _ = cnitrace::breakdown::attribute(sample);
        }
    }
});
