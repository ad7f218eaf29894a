//! /proc/kallsyms text: parse, then resolve addresses and classify the names found.
#![no_main]

use cnitrace::{components, kallsyms::Kallsyms};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let symbols = Kallsyms::parse(text);
    for address in [0, 1, 0xffff_ffff_8100_0000, u64::MAX] {
        if let Some(name) = symbols.resolve(address) {
            let _ = components::classify(name);
        }
    }
});
