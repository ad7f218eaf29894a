//! The `Host` and `Origin` headers as the agent's cross-site check reads them
//! (`server::{same_origin, host_of, is_loopback_host}`): the input is split at its first newline
//! into an origin and a host. Never a panic (slicing at non-ASCII characters), and the
//! properties the check relies on hold.
#![no_main]

use cnitrace::server::{host_of, is_loopback_host, same_origin};
use libfuzzer_sys::fuzz_target;

/// Whether a `Host` value names no port, so that the scheme's default one is implied (and
/// appending `:PORT` gives the same authority with the port spelled out).
fn portless(host: &str) -> bool {
    if host.ends_with('/') {
        return false;
    }
    if host.starts_with('[') {
        host.ends_with(']') && !host.contains("]:")
    } else {
        !host.contains(':')
    }
}

fn check_loopback(host: &str) {
    if !is_loopback_host(host) {
        return;
    }
    // Only `localhost` or an address literal: never a DNS name that could be rebound.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    assert!(
        bare.eq_ignore_ascii_case("localhost")
            || bare
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.'),
        "{host:?} taken for loopback"
    );
}

fn check_pair(origin: &str, host: &str) {
    let same = same_origin(origin, host);
    // Only an http or https origin can be this server.
    if same {
        let scheme = origin
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase());
        assert!(
            matches!(scheme.as_deref(), Some("http" | "https")),
            "{origin:?} same as {host:?}"
        );
        // Then the hosts agree too (when `host` is a bare authority, as `Host` is).
        if !host.contains("://") {
            assert!(
                host_of(origin).eq_ignore_ascii_case(host_of(host)),
                "{origin:?} ~ {host:?} but hosts {:?} and {:?}",
                host_of(origin),
                host_of(host)
            );
        }
    }
    // ASCII case never matters; neither do trailing slashes.
    assert_eq!(
        same,
        same_origin(&origin.to_ascii_uppercase(), &host.to_ascii_lowercase())
    );
    assert_eq!(same, same_origin(origin, &format!("{host}/")));
    if origin.contains("://") {
        assert_eq!(same, same_origin(&format!("{origin}/"), host));
    }
}

fuzz_target!(|text: &str| {
    let (origin, host) = text.split_once('\n').unwrap_or((text, ""));
    check_pair(origin, host);
    check_pair(host, origin);
    check_pair(text, text);
    // Whether a host is an origin is symmetric, for either scheme.
    for scheme in ["http", "https"] {
        assert_eq!(
            same_origin(&format!("{scheme}://{origin}"), host),
            same_origin(&format!("{scheme}://{host}"), origin)
        );
    }
    for value in [text, origin, host] {
        let found = host_of(value);
        assert!(found.len() <= value.len());
        check_loopback(value);
        check_loopback(found);

        // A page served by this server is always its own origin, under either scheme.
        for scheme in ["http", "https", "HTTP", "hTTpS"] {
            assert!(
                same_origin(&format!("{scheme}://{value}"), value),
                "{scheme}://{value:?}"
            );
        }
        // The default port is implied on either side, and tells the schemes apart.
        if portless(value) {
            assert!(same_origin(
                &format!("http://{value}"),
                &format!("{value}:80")
            ));
            assert!(same_origin(
                &format!("https://{value}"),
                &format!("{value}:443")
            ));
            assert!(same_origin(&format!("https://{value}:443"), value));
            assert!(!same_origin(
                &format!("http://{value}"),
                &format!("{value}:443")
            ));
        }
        // A port is cut off the host, in a `Host` and in an `Origin`.
        if !value.contains("://") && !value.starts_with('[') {
            assert_eq!(host_of(&format!("{value}:9560")), value);
            assert_eq!(host_of(&format!("http://{value}:9560")), value);
        }
        if !value.contains("://") && !value.contains(']') {
            let literal = format!("[{value}]");
            assert_eq!(host_of(&format!("{literal}:9560")), literal);
            assert_eq!(host_of(&format!("https://{literal}:9560/")), literal);
            assert_eq!(host_of(&literal), literal);
        }
    }
    for loopback in ["localhost", "LocalHost", "127.0.0.1", "[::1]", "127.1.2.3"] {
        assert!(is_loopback_host(loopback));
        assert!(is_loopback_host(host_of(&format!("{loopback}:9560"))));
    }
});
