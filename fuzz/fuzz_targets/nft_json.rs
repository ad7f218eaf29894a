//! `nft -j list ruleset` output: parse and walk.
#![no_main]

use cnitrace::netfilter::ruleset::{self, Ruleset};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(tables) = ruleset::parse_nft_json(text, &[]) {
        let now = Ruleset { tables };
        let (diff, changed) = now.since(&now.clone());
        let _ = ruleset::walk("host", &diff, changed, &|_, _| Some(1000));
    }
});
