//! `nft -j list ruleset` output: parse and walk. Never a panic, a hang or a stack overflow.
#![no_main]

mod small_stack;

use cnitrace::netfilter::ruleset::{self, Ruleset};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(tables) = ruleset::parse_nft_json(text, &[]) {
        let now = Ruleset { tables };
        let (diff, changed) = now.since(&now.clone());
        small_stack::walk(&diff, || {
            let _ = ruleset::walk("host", &diff, changed, &|_, _| Some(1000));
        });
    }
});
