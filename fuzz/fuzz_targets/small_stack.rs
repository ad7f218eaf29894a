//! Where the ruleset targets walk: on a small stack, so that a walk recursing once per nested
//! chain overflows within inputs' 64 KiB cap (xtask's `-max_len`). On the main thread's 8 MiB
//! it takes some 20,000 nested chains, more than 64 KiB can declare, so it would pass unseen.

use cnitrace::netfilter::ruleset::Ruleset;

/// Plenty for a walk that keeps called chains on the heap; one recursing per nested chain
/// overflows it within a few hundred, which the deep seeds in fuzz/corpus exceed.
const STACK: usize = 64 * 1024;

/// Fewer chains cannot nest deep enough to overflow; they skip the thread, which would cost
/// more than most inputs' whole run.
const FEW_CHAINS: usize = 100;

pub fn walk(ruleset: &Ruleset, work: impl FnOnce() + Send) {
    let chains: usize = ruleset.tables.iter().map(|t| t.chains.len()).sum();
    if chains <= FEW_CHAINS {
        return work();
    }
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .stack_size(STACK)
            .spawn_scoped(scope, work)
            .expect("a thread for the walk");
    });
}
