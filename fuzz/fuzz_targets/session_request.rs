//! The body of `POST /api/v1/sessions`, as the agent reads it: deserialized, round-tripped, then
//! checked by the same validation the agent runs before anything is attached
//! (`WindowSpec::validate`: the namespace and interface lists, each namespace name, each
//! interface looked up). That only stats /run/netns/NAME and looks interfaces up; it changes
//! nothing. What the agent's own `validate` adds (the duration's range and the backend) is
//! private to `agent.rs`; the invariants below hold whatever it adds.
#![no_main]

use cnitrace::{
    contract::SessionRequest,
    netfilter,
    netns::{self, MAX_NAMED},
    window::WindowSpec,
};
use cnitrace_common::IFNAMSIZ;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok(request) = serde_json::from_slice::<SessionRequest>(body) else {
        return;
    };
    // What the agent answers with is built from the request: it serializes, and reads back
    // as the same request. The duration to within rounding: serde_json (without its
    // `float_roundtrip` feature, as the agent builds it) may read a number into a neighbour of
    // the nearest f64, e.g. 76 fives into 5.5555555555555555e75 that reads back as
    // 5.555555555555555e75.
    let text = serde_json::to_vec(&request).expect("a request serializes");
    let mut again: SessionRequest = serde_json::from_slice(&text).expect("a request reads back");
    match (request.duration_s, again.duration_s) {
        // At most a couple of units in the last place apart (the same sign: bits in order).
        (Some(a), Some(b)) => assert!(
            a.is_sign_negative() == b.is_sign_negative() && a.to_bits().abs_diff(b.to_bits()) <= 2,
            "duration_s {a} read back as {b}"
        ),
        (a, b) => assert_eq!(a, b),
    }
    again.duration_s = request.duration_s;
    assert_eq!(format!("{request:?}"), format!("{again:?}"));
    // JSON has no infinities or NaN: the agent's `is_finite` check is a second line.
    if let Some(d) = request.duration_s {
        assert!(d.is_finite(), "duration_s {d} from JSON");
    }

    // The window the agent would open, as `Agent::validate` builds it.
    let namespaces = request.netns.clone().unwrap_or_default();
    let ifaces = request.ifaces.clone().unwrap_or_default();
    let spec = WindowSpec {
        ifaces: ifaces.clone(),
        unit: request.packet_unit.unwrap_or_default(),
        view: request.view.unwrap_or_default(),
        netfilter: netfilter::Options {
            read_rules: true,
            count_entries: false,
            namespaces: namespaces.clone(),
        },
        netns: namespaces.clone(),
        bpf_stats: true,
        stacks: true,
    };
    let verdict = spec.validate();
    // The same checks, called directly, agree.
    assert_eq!(
        verdict.is_ok(),
        netns::validate_interfaces(&ifaces, &namespaces).is_ok()
    );

    if ifaces.len() > MAX_NAMED || namespaces.len() > MAX_NAMED {
        assert!(
            verdict.is_err(),
            "{} names accepted",
            ifaces.len().max(namespaces.len())
        );
    }
    let Ok(()) = verdict else {
        return;
    };
    for list in [&ifaces, &namespaces] {
        let unique: std::collections::BTreeSet<&String> = list.iter().collect();
        assert_eq!(unique.len(), list.len(), "a name twice accepted: {list:?}");
    }
    for name in &namespaces {
        // Only a file directly in /run/netns: never a directory, never a path elsewhere.
        assert!(
            !name.is_empty()
                && name.len() <= 255
                && !name.contains(['/', '\0'])
                && name != "."
                && name != "..",
            "namespace {name:?} accepted"
        );
        let path = netns::path(name);
        assert_eq!(path.parent(), Some(std::path::Path::new(netns::NETNS_DIR)));
        assert!(path.is_file(), "{} is not a namespace file", path.display());
        assert!(netns::validate(name).is_ok());
    }
    for iface in &ifaces {
        assert!(
            !iface.is_empty() && iface.len() < IFNAMSIZ && !iface.contains('\0'),
            "interface {iface:?} accepted"
        );
    }
});
