//! iptables-save output: parse, difference against itself, walk. Never a panic, a hang or a
//! stack overflow.
#![no_main]

mod small_stack;

use cnitrace::netfilter::{
    hooks::Family,
    ruleset::{self, Backend, Ruleset},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    for backend in [Backend::IptablesLegacy, Backend::IptablesNft] {
        if let Ok(tables) = ruleset::parse_iptables_save(text, backend, Family::Ipv4) {
            let now = Ruleset { tables };
            let (diff, changed) = now.since(&Ruleset::default());
            small_stack::walk(&diff, || {
                let _ = ruleset::walk("host", &diff, changed, &|_, _| Some(1000));
                let _ = ruleset::walk("host", &diff, changed, &|_, _| None);
            });
        }
    }
});
