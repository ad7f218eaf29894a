//! Router tests with `oneshot`: every path and every error status, on a synthetic probe.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use axum::{
    body::Body,
    http::{Method, Request, StatusCode, header},
};
use cnitrace_common::{IfaceCounters, SampleKey, SampleValue, SoftirqStats};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::*;
use crate::{
    agent::Limits,
    breakdown::{CpuTicks, Faults, RawWindow, StackSample},
    contract::{Clock, ClockSource, Unavailable},
    probe::{Backend, bpf_stats::StatsGuard},
    snapshot::Snapshot,
    window::Probes,
};

/// Each snapshot adds 100 bridge samples of 1 ms and 1000 transmitted segments, and takes
/// `delay` (to make requests overlap).
#[derive(Default)]
struct SyntheticProbe {
    ticks: AtomicU64,
    delay: std::time::Duration,
    /// Snapshots being taken now, and the most ever at once.
    in_flight: AtomicU64,
    peak_in_flight: Arc<AtomicU64>,
    /// The sampling rate asked for last.
    rate: Arc<AtomicU64>,
}

impl Probes for SyntheticProbe {
    fn snapshot(&self) -> Result<Snapshot, crate::Error> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        let t = self.ticks.fetch_add(1, Ordering::SeqCst) + 1;
        std::thread::sleep(self.delay);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let key = SampleKey {
            stack_hash: 1,
            flags: 0,
            epoch: 0,
        };
        let mut dev = IfaceCounters {
            ifindex: 2,
            netns_inode: 1,
            tx_skbs: t * 50,
            tx_segments: t * 1000,
            tx_bytes: t * 1_500_000,
            ..Default::default()
        };
        dev.name[..4].copy_from_slice(b"eth0");
        Ok(Snapshot {
            wall: chrono::Utc::now(),
            mono: std::time::Instant::now(),
            samples: [(
                key,
                SampleValue {
                    count: t * 100,
                    period: t * 100_000_000,
                },
            )]
            .into(),
            ifaces: [(7, dev)].into(),
            softirq: vec![SoftirqStats::default(); 10],
            device_mtu: std::collections::BTreeMap::new(),
            cpu: CpuTicks::default(),
            bpf_programs: std::collections::BTreeMap::new(),
            faults: Faults::default(),
            trace: Vec::new(),
        })
    }

    fn window(
        &self,
        start: &Snapshot,
        end: &Snapshot,
        bpf_stats: Option<&str>,
    ) -> Result<RawWindow, crate::Error> {
        let delta = end.delta(start);
        Ok(RawWindow {
            start: start.wall,
            end: end.wall,
            duration_s: 1.0,
            clock: Clock {
                source: ClockSource::CpuClock,
                cycles_per_ns: 2.0,
                calibration: "synthetic".into(),
            },
            frequency_hz: 999.0,
            cpus: 2,
            samples: delta
                .samples
                .iter()
                .map(|(k, v)| StackSample {
                    frames: vec!["br_forward".into()],
                    flags: k.flags,
                    stack_lost: false,
                    count: v.count,
                    period: v.period,
                })
                .collect(),
            ifaces: delta.ifaces.into_values().collect(),
            softirq: delta.softirq,
            softirq_timed: true,
            packet_counter: "net_dev_start_xmit".to_owned(),
            cpu: delta.cpu,
            bpf_programs: Vec::new(),
            bpf_stats: bpf_stats.map(str::to_owned),
            faults: delta.faults,
            trace: None,
        })
    }

    fn unavailable(&self) -> Vec<Unavailable> {
        vec![Unavailable {
            name: "ipip".into(),
            reason: "synthetic".into(),
        }]
    }

    fn backend(&self) -> Backend {
        Backend::Sampling
    }

    fn bpf_stats(&self) -> Option<Arc<StatsGuard>> {
        None
    }

    fn set_rate(&self, hz: u64) -> Result<(), crate::Error> {
        self.rate.store(hz, Ordering::SeqCst);
        Ok(())
    }

    fn rate(&self) -> u64 {
        self.rate.load(Ordering::SeqCst)
    }
}

fn app(token: Option<&str>, limits: Limits) -> (Router, Arc<AppState>) {
    app_with(token, limits, false)
}

fn app_with(token: Option<&str>, limits: Limits, loopback_only: bool) -> (Router, Arc<AppState>) {
    app_on(SyntheticProbe::default(), token, limits, loopback_only)
}

fn app_on(
    probe: SyntheticProbe,
    token: Option<&str>,
    limits: Limits,
    loopback_only: bool,
) -> (Router, Arc<AppState>) {
    let node = crate::doctor::NodeReport {
        node: "test".into(),
        kernel: "k".into(),
        checks: Vec::new(),
        backends: Vec::new(),
        components: Vec::new(),
        traced_functions: Vec::new(),
        cni: Vec::new(),
    };
    let agent = Agent::new(
        Box::new(probe),
        Limits {
            // Unit tests never run iptables-save on the machine they run on.
            read_rulesets: false,
            ..limits
        },
    );
    let state = Arc::new(AppState::new(
        agent,
        node,
        token.map(|t| Auth::fixed(t.to_owned())),
        loopback_only,
    ));
    (router(Arc::clone(&state)), state)
}

async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (StatusCode, Value, String) {
    let is_post = method == Method::POST;
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    // As every client of the API: JSON on every POST, even without a body.
    if is_post {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

fn is_json_error(body: &Value) -> bool {
    body["error"].as_str().is_some_and(|e| !e.is_empty())
}

#[tokio::test]
async fn health_node_page_and_openapi() {
    let (app, _) = app(None, Limits::default());
    let (status, body, _) = call(&app, Method::GET, "/healthz", None, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, body, _) = call(&app, Method::GET, "/api/v1/node", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["node"], "test");
    let (status, _, html) = call(&app, Method::GET, "/", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains("id=\"live-bar\"") && !html.contains("http://") && !html.contains("https://")
    );
    let (status, doc, _) = call(&app, Method::GET, "/api/v1/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/api/v1/sessions",
        "/api/v1/sessions/{id}",
        "/api/v1/sessions/{id}/stop",
        "/api/v1/breakdown",
        "/metrics",
        "/healthz",
        "/api/v1/node",
    ] {
        assert!(doc["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    assert!(doc["components"]["schemas"].get("Breakdown").is_some());
}

#[tokio::test]
async fn unknown_paths_and_methods() {
    let (app, _) = app(None, Limits::default());
    let (status, body, _) = call(&app, Method::GET, "/nope", None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(is_json_error(&body));
    let (status, _, _) = call(&app, Method::DELETE, "/api/v1/sessions", None, None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn token_is_required_except_for_health_and_page() {
    let (app, _) = app(Some("s3cret"), Limits::default());
    assert_eq!(
        call(&app, Method::GET, "/healthz", None, None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, Method::GET, "/", None, None).await.0,
        StatusCode::OK
    );
    for uri in [
        "/api/v1/node",
        "/api/v1/sessions",
        "/metrics",
        "/api/v1/openapi.json",
        "/api/v1/breakdown",
    ] {
        let (status, body, _) = call(&app, Method::GET, uri, None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}");
        assert!(is_json_error(&body));
        assert_eq!(
            call(&app, Method::GET, uri, None, Some("wrong")).await.0,
            StatusCode::UNAUTHORIZED,
            "{uri}"
        );
        assert_eq!(
            call(&app, Method::GET, uri, None, Some("s3cre")).await.0,
            StatusCode::UNAUTHORIZED,
            "{uri}"
        );
    }
    assert_eq!(
        call(&app, Method::GET, "/api/v1/node", None, Some("s3cret"))
            .await
            .0,
        StatusCode::OK
    );
}

/// Status of a request with exactly these headers.
async fn status_with(
    app: &Router,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
) -> StatusCode {
    let mut request = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() {
        assert!(is_json_error(&body), "{uri}: {status} without a JSON error");
    }
    status
}

#[tokio::test]
async fn cross_site_requests_are_refused() {
    let (app, state) = app(None, Limits::default());
    let json = ("content-type", "application/json");
    // A form or no-cors fetch from another site can only send text/plain or form types.
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let headers: Vec<(&str, &str)> = content_type
            .map(|c| ("content-type", c))
            .into_iter()
            .collect();
        assert_eq!(
            status_with(&app, Method::POST, "/api/v1/sessions", &headers).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
    }
    assert_eq!(
        status_with(
            &app,
            Method::POST,
            "/api/v1/sessions",
            &[
                json,
                ("origin", "https://evil.example"),
                ("host", "127.0.0.1:9560")
            ]
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status_with(
            &app,
            Method::POST,
            "/api/v1/sessions",
            &[json, ("origin", "null"), ("host", "127.0.0.1:9560")]
        )
        .await,
        StatusCode::FORBIDDEN
    );
    // The same host on another port (another local service's page) is another origin.
    assert_eq!(
        status_with(
            &app,
            Method::POST,
            "/api/v1/sessions",
            &[
                json,
                ("origin", "http://127.0.0.1:8080"),
                ("host", "127.0.0.1:9560")
            ]
        )
        .await,
        StatusCode::FORBIDDEN
    );
    // The agent's own page posts from its own origin.
    assert_eq!(
        status_with(
            &app,
            Method::POST,
            "/api/v1/sessions",
            &[
                json,
                ("origin", "http://127.0.0.1:9560"),
                ("host", "127.0.0.1:9560")
            ]
        )
        .await,
        StatusCode::CREATED
    );
    assert!(
        state.agent.sessions().len() == 1,
        "only the same-origin request opened a session"
    );

    // Serving loopback without a token: a rebound name is refused, loopback names are not.
    let (app, _) = app_with(None, Limits::default(), true);
    assert_eq!(
        status_with(
            &app,
            Method::GET,
            "/api/v1/node",
            &[("host", "rebind.evil.example:9560")]
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status_with(&app, Method::GET, "/api/v1/node", &[]).await,
        StatusCode::FORBIDDEN
    );
    for host in [
        "localhost:9560",
        "127.0.0.1:9560",
        "[::1]:9560",
        "127.0.0.2",
    ] {
        assert_eq!(
            status_with(&app, Method::GET, "/api/v1/node", &[("host", host)]).await,
            StatusCode::OK,
            "{host}"
        );
    }
    // The kubelet's probe names the pod's address: liveness is answered whatever the host.
    assert_eq!(
        status_with(&app, Method::GET, "/healthz", &[("host", "10.0.0.7:9560")]).await,
        StatusCode::OK
    );
}

#[test]
fn hosts_are_split_from_ports() {
    assert_eq!(host_of("127.0.0.1:9560"), "127.0.0.1");
    assert_eq!(host_of("[::1]:9560"), "[::1]");
    assert_eq!(host_of("[::1]"), "[::1]");
    assert_eq!(host_of("http://localhost:9560/"), "localhost");
    assert_eq!(host_of("https://evil.example"), "evil.example");
    assert!(
        is_loopback_host("[::1]") && is_loopback_host("LOCALHOST") && !is_loopback_host("10.1.1.1")
    );
}

#[tokio::test]
async fn session_round_trip() {
    let (app, _) = app(None, Limits::default());
    let (status, started, _) = call(&app, Method::POST, "/api/v1/sessions", Some("{}"), None).await;
    assert_eq!(status, StatusCode::CREATED, "{started}");
    assert_eq!(started["state"], "running");
    let id = started["id"].as_u64().unwrap();
    // No body at all is also a valid request: all defaults.
    assert_eq!(
        call(&app, Method::POST, "/api/v1/sessions", None, None)
            .await
            .0,
        StatusCode::CREATED
    );
    let (status, list, _) = call(&app, Method::GET, "/api/v1/sessions", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let (status, view, _) = call(
        &app,
        Method::GET,
        &format!("/api/v1/sessions/{id}"),
        None,
        None,
    )
    .await;
    assert_eq!(
        (status, view["breakdown"].clone()),
        (StatusCode::OK, Value::Null)
    );
    let (status, stopped, _) = call(
        &app,
        Method::POST,
        &format!("/api/v1/sessions/{id}/stop"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stopped["state"], "stopped");
    let b = &stopped["breakdown"];
    let bridge = b["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "bridge")
        .unwrap();
    assert!(bridge["cycles"].as_u64().unwrap() > 0);
    // Start at snapshot 1, the second session's start is snapshot 2, the stop is snapshot 3:
    // two synthetic ticks of 1000 segments.
    assert_eq!(b["packets"]["count"], 2000);
    let (status, again, _) = call(
        &app,
        Method::POST,
        &format!("/api/v1/sessions/{id}/stop"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(is_json_error(&again));
    let (status, view, _) = call(
        &app,
        Method::GET,
        &format!("/api/v1/sessions/{id}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["breakdown"]["packets"]["count"], 2000);
}

#[tokio::test]
async fn session_errors() {
    let limits = Limits {
        max_sessions: 2,
        max_duration_s: 60.0,
        keep_stopped: 4,
        read_rulesets: false,
        ..Limits::default()
    };
    let (app, _) = app(None, limits);
    let cases: &[(&str, StatusCode)] = &[
        ("{not json", StatusCode::BAD_REQUEST),
        (r#"{"duration_s": -1}"#, StatusCode::BAD_REQUEST),
        (r#"{"duration_s": 61}"#, StatusCode::BAD_REQUEST),
        (r#"{"duration_s": "ten"}"#, StatusCode::BAD_REQUEST),
        (r#"{"backend": "tracing"}"#, StatusCode::BAD_REQUEST),
        (r#"{"backend": "magic"}"#, StatusCode::BAD_REQUEST),
        (r#"{"ifaces": ["cnt-nosuch0"]}"#, StatusCode::BAD_REQUEST),
        (r#"{"netns": ["cnt-nosuch-ns"]}"#, StatusCode::BAD_REQUEST),
        (r#"{"unknown_field": 1}"#, StatusCode::BAD_REQUEST),
    ];
    for (body, expected) in cases {
        let (status, response, _) =
            call(&app, Method::POST, "/api/v1/sessions", Some(body), None).await;
        assert_eq!(status, *expected, "{body}: {response}");
        assert!(is_json_error(&response), "{body}");
    }
    let huge = format!(r#"{{"ifaces": ["{}"]}}"#, "x".repeat(BODY_LIMIT));
    let (status, response, _) =
        call(&app, Method::POST, "/api/v1/sessions", Some(&huge), None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(is_json_error(&response));
    for _ in 0..2 {
        assert_eq!(
            call(&app, Method::POST, "/api/v1/sessions", Some("{}"), None)
                .await
                .0,
            StatusCode::CREATED
        );
    }
    let (status, response, _) =
        call(&app, Method::POST, "/api/v1/sessions", Some("{}"), None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(is_json_error(&response));
    let (status, response, _) = call(&app, Method::GET, "/api/v1/sessions/999", None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(is_json_error(&response));
    assert_eq!(
        call(&app, Method::POST, "/api/v1/sessions/999/stop", None, None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&app, Method::GET, "/api/v1/sessions/abc", None, None)
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn open_ended_sessions_end_at_the_longest_duration() {
    let limits = Limits {
        max_duration_s: 0.2,
        ..Limits::default()
    };
    let (app, state) = app(None, limits);
    let (status, open_ended, _) = call(&app, Method::POST, "/api/v1/sessions", None, None).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(state.agent.due_sessions().is_empty());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        state.agent.due_sessions(),
        vec![open_ended["id"].as_u64().unwrap()],
        "a session without duration_s is due after max_duration_s"
    );
}

#[test]
fn an_agent_nobody_reads_takes_no_snapshots() {
    let (_, state) = app(None, Limits::default());
    for _ in 0..3 {
        assert!(!state.agent.tick().unwrap());
    }
    // Only the metrics baseline would read the maps; ticks did not.
    assert_eq!(
        state
            .agent
            .probes()
            .snapshot()
            .unwrap()
            .samples
            .values()
            .next()
            .unwrap()
            .count,
        100,
        "the first snapshot the probe took is this one"
    );
}

#[tokio::test]
async fn rolling_breakdown() {
    let (app, state) = app(None, Limits::default());
    let (status, body, _) = call(&app, Method::GET, "/api/v1/breakdown?window=5", None, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "no history yet: {body}");
    // The ring records only once someone has read it: the read above started it.
    assert!(state.agent.tick().unwrap(), "a read starts the ring");
    let (status, body, _) = call(&app, Method::GET, "/api/v1/breakdown?window=5", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["packets"]["count"], 1000);
    for bad in ["0", "301", "abc", "-1"] {
        let (status, body, _) = call(
            &app,
            Method::GET,
            &format!("/api/v1/breakdown?window={bad}"),
            None,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "window={bad}");
        assert!(is_json_error(&body));
    }
}

#[tokio::test]
async fn the_ring_holds_what_readers_ask_for_and_stays_small() {
    let (app, state) = app(None, Limits::default());
    let _ = call(&app, Method::GET, "/api/v1/breakdown?window=5", None, None).await;
    // A rolling read keeps the ring going; 900 ticks are fifteen minutes of one a second.
    let mut largest = 0;
    for _ in 0..900 {
        assert!(state.agent.tick().unwrap());
        largest = largest.max(state.agent.ring_len());
    }
    // Only 5 s were asked for: the dense second-by-second part and one sparse step.
    assert!(largest <= 12, "{largest} snapshots kept for 5 s windows");
    let (status, body, _) = call(
        &app,
        Method::GET,
        "/api/v1/breakdown?window=300",
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Asked for 300 s, the ring widens: 10 dense + one per 10 s back to 300 s, against 301
    // at one a second.
    for _ in 0..900 {
        assert!(state.agent.tick().unwrap());
        largest = largest.max(state.agent.ring_len());
    }
    assert!(largest > 30 && largest <= 42, "{largest} snapshots kept");
}

#[tokio::test]
async fn metrics_are_monotonic_prometheus_counters() {
    let (app, state) = app(None, Limits::default());
    state.metrics.prime(&state.agent).unwrap();
    let scrape = || async {
        let (status, _, text) = call(&app, Method::GET, "/metrics", None, None).await;
        assert_eq!(status, StatusCode::OK);
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        prometheus_parse::Scrape::parse(lines).expect("valid exposition")
    };
    let value = |scrape: &prometheus_parse::Scrape, name: &str, component: Option<&str>| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == name && component.is_none_or(|c| s.labels.get("component") == Some(c))
            })
            .map_or_else(
                || panic!("{name} missing"),
                |s| match s.value {
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                    _ => panic!("{name} is not a counter"),
                },
            )
    };
    let first = scrape().await;
    let second = scrape().await;
    let bridge1 = value(&first, "cnitrace_component_cycles_total", Some("bridge"));
    let bridge2 = value(&second, "cnitrace_component_cycles_total", Some("bridge"));
    assert!(
        bridge1 > 0.0 && bridge2 > bridge1,
        "monotonic: {bridge1} then {bridge2}"
    );
    let packets2 = value(&second, "cnitrace_packets_total", None);
    assert!((packets2 - 2000.0).abs() < f64::EPSILON, "{packets2}");
}

/// Counter value of a metric without labels beyond `node`.
fn counter(text: &str, name: &str) -> f64 {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition");
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .map_or_else(
            || panic!("{name} missing"),
            |s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => panic!("{name} is not a counter"),
            },
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_scrapes_count_each_interval_once() {
    let probe = SyntheticProbe {
        delay: std::time::Duration::from_millis(20),
        ..SyntheticProbe::default()
    };
    let (app, state) = app_on(probe, None, Limits::default(), false);
    state.metrics.prime(&state.agent).unwrap();
    let scrapes = 12;
    let handles: Vec<_> = (0..scrapes)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { call(&app, Method::GET, "/metrics", None, None).await })
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.await.unwrap().0, StatusCode::OK);
    }
    // One more scrape sees everything: every snapshot after the first is 1000 segments.
    let (_, _, text) = call(&app, Method::GET, "/metrics", None, None).await;
    let packets = counter(&text, "cnitrace_packets_total");
    assert!(
        (packets - f64::from(scrapes + 1) * 1000.0).abs() < f64::EPSILON,
        "{packets} packets counted for {} intervals of 1000",
        scrapes + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn window_work_is_bounded_and_health_stays_answered() {
    let peak = Arc::new(AtomicU64::new(0));
    let probe = SyntheticProbe {
        delay: std::time::Duration::from_millis(100),
        peak_in_flight: Arc::clone(&peak),
        ..SyntheticProbe::default()
    };
    let limits = Limits {
        max_sessions: 64,
        ..Limits::default()
    };
    let (app, _) = app_on(probe, None, limits, false);
    let requests: Vec<_> = (0..16)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                call(&app, Method::POST, "/api/v1/sessions", None, None)
                    .await
                    .0
            })
        })
        .collect();
    // While they queue, liveness answers at once.
    let started = std::time::Instant::now();
    assert_eq!(
        call(&app, Method::GET, "/healthz", None, None).await.0,
        StatusCode::OK
    );
    assert!(started.elapsed() < std::time::Duration::from_millis(100));
    for request in requests {
        assert_eq!(request.await.unwrap(), StatusCode::CREATED);
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        (1..=MAX_CONCURRENT_WORK as u64).contains(&peak),
        "{peak} snapshots at once"
    );
}

#[tokio::test]
async fn flame_graphs_of_sessions_and_of_the_rolling_window() {
    let (app, _) = app(Some("t"), Limits::default());
    let token = Some("t");
    let (_, started, _) = call(&app, Method::POST, "/api/v1/sessions", None, token).await;
    let id = started["id"].as_u64().unwrap();
    let svg_path = format!("/api/v1/sessions/{id}/flamegraph.svg");
    // Running: no stacks yet.
    let (status, body, _) = call(&app, Method::GET, &svg_path, None, token).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].as_str().unwrap().contains("running"));
    let (status, stopped, _) = call(
        &app,
        Method::POST,
        &format!("/api/v1/sessions/{id}/stop"),
        None,
        token,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The stacks are served apart from the session view, which stays small.
    assert!(stopped["breakdown"].get("stacks").is_none());
    let (status, _, svg) = call(&app, Method::GET, &svg_path, None, token).await;
    assert_eq!(status, StatusCode::OK);
    assert!(svg.contains("<svg") && svg.contains("br_forward"));
    let (status, _, folded) = call(
        &app,
        Method::GET,
        &format!("/api/v1/sessions/{id}/folded"),
        None,
        token,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // One synthetic tick of 100 samples of 1 ms at 2 cycles per ns.
    assert_eq!(folded.trim(), "br_forward 200000000");
    let (status, _, _) = call(
        &app,
        Method::GET,
        &format!("/api/v1/sessions/{id}/profile.pb.gz"),
        None,
        token,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for (path, expected) in [
        ("/api/v1/sessions/99/folded", StatusCode::NOT_FOUND),
        ("/api/v1/sessions/x/folded", StatusCode::BAD_REQUEST),
        ("/api/v1/folded?window=0", StatusCode::BAD_REQUEST),
    ] {
        let (status, body, _) = call(&app, Method::GET, path, None, token).await;
        assert_eq!(status, expected, "{path}");
        assert!(is_json_error(&body), "{path}");
    }
    let (status, _, _) = call(&app, Method::GET, &svg_path, None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The rolling window: no history on the first read, then a graph.
    let (status, _, _) = call(
        &app,
        Method::GET,
        "/api/v1/flamegraph.svg?window=5",
        None,
        token,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
}

/// Nobody reading: nothing sampled. A scraper: the continuous rate. A session: the session
/// rate while it runs, then the continuous rate again.
#[tokio::test]
async fn the_sampling_rate_follows_its_readers() {
    let rate = Arc::new(AtomicU64::new(999));
    let probe = SyntheticProbe {
        rate: Arc::clone(&rate),
        ..SyntheticProbe::default()
    };
    let limits = Limits {
        session_hz: 999,
        continuous_hz: 19,
        ..Limits::default()
    };
    let (app, state) = app_on(probe, None, limits, false);
    state.agent.apply_rate();
    assert_eq!(rate.load(Ordering::SeqCst), 0, "no reader: detached");
    let (status, _, _) = call(&app, Method::GET, "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rate.load(Ordering::SeqCst), 19, "a scraper: continuous");
    let (status, view, _) = call(&app, Method::POST, "/api/v1/sessions", Some("{}"), None).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    assert_eq!(
        rate.load(Ordering::SeqCst),
        999,
        "a session: the session rate"
    );
    state.agent.apply_rate();
    assert_eq!(rate.load(Ordering::SeqCst), 999, "still running");
    let id = view["id"].as_u64().unwrap();
    let uri = format!("/api/v1/sessions/{id}/stop");
    let (status, _, _) = call(&app, Method::POST, &uri, None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        rate.load(Ordering::SeqCst),
        19,
        "after it: continuous again"
    );
}

/// Without a scraper the metrics baseline is not kept (it would pin retired epochs), and the
/// first scrape after a gap only takes a new baseline.
#[tokio::test]
async fn an_absent_scraper_holds_no_baseline() {
    let (app, state) = app(None, Limits::default());
    assert_eq!(
        state.metrics.baseline_taken(),
        None,
        "nothing before a scrape"
    );
    let (_, _, text) = call(&app, Method::GET, "/metrics", None, None).await;
    assert!(
        !text.contains("cnitrace_busy_cycles_total{"),
        "first scrape: baseline only\n{text}"
    );
    assert!(state.metrics.baseline_taken().is_some());
    let (_, _, text) = call(&app, Method::GET, "/metrics", None, None).await;
    assert!(text.contains("cnitrace_busy_cycles_total{"), "{text}");
    state.metrics.forget_if_unscraped(&state.agent);
    assert!(
        state.metrics.baseline_taken().is_some(),
        "the scraper is still here"
    );
}

/// A budget too small for the session rate: the sampler runs at what fits, and the
/// session's Breakdown says why.
#[tokio::test]
async fn the_budget_lowers_the_rate_and_says_so() {
    let rate = Arc::new(AtomicU64::new(0));
    let probe = SyntheticProbe {
        rate: Arc::clone(&rate),
        ..SyntheticProbe::default()
    };
    // 1% of each CPU at 100 us a sample: 100 samples a second.
    let limits = Limits {
        session_hz: 999,
        continuous_hz: 19,
        max_overhead_pct: 1.0,
        sample_cost_ns: 100_000.0,
        ..Limits::default()
    };
    let (app, _) = app_on(probe, None, limits, false);
    let (status, view, _) = call(&app, Method::POST, "/api/v1/sessions", Some("{}"), None).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    assert_eq!(rate.load(Ordering::SeqCst), 100);
    let uri = format!("/api/v1/sessions/{}/stop", view["id"]);
    let (status, view, _) = call(&app, Method::POST, &uri, None, None).await;
    assert_eq!(status, StatusCode::OK);
    let cost = &view["breakdown"]["quality"]["agent_cost"];
    assert_eq!(cost["rate_hz"], 100, "{cost}");
    assert!(
        cost["limited"]
            .as_str()
            .is_some_and(|why| why.contains("100 Hz instead of 999 Hz")),
        "{cost}"
    );
    assert!(
        (cost["estimated_percent"].as_f64().unwrap() - 1.0).abs() < 0.01,
        "{cost}"
    );
    let (_, _, text) = call(&app, Method::GET, "/metrics", None, None).await;
    assert!(text.contains("cnitrace_sampler_hz"), "{text}");
    assert!(
        text.contains("cnitrace_self_estimated_overhead_ratio"),
        "{text}"
    );
}

#[test]
fn origins_match_on_host_and_port_with_default_ports_implied() {
    use super::same_origin;
    assert!(same_origin("http://node:9560", "node:9560"));
    assert!(same_origin("https://Node", "node:443"));
    assert!(same_origin("http://[::1]:9560", "[::1]:9560"));
    assert!(!same_origin("http://node:8080", "node:9560"));
    assert!(!same_origin("http://node", "node:443"));
    assert!(!same_origin("ftp://node:9560", "node:9560"));
    assert!(!same_origin("node:9560", "node:9560"));
    // Nothing but a port after an IPv6 literal; one pair of brackets.
    assert_eq!(
        super::host_of("[::1].evil.example:9560"),
        "[::1].evil.example:9560"
    );
    assert_eq!(super::host_of("[::1]:9560"), "[::1]");
    assert!(!super::is_loopback_host(super::host_of(
        "[::1].evil.example:9560"
    )));
    assert!(!super::is_loopback_host("[[::1]]"));
    assert!(super::is_loopback_host("[::1]"));
}

/// The page keeps no token in persistent storage, frames the flame graph in a sandbox, and
/// every answer carries the usual protective headers.
#[tokio::test]
async fn the_page_and_the_svgs_carry_their_security_policies() {
    let (app, _) = app(None, Limits::default());
    let page = page::index();
    assert!(
        !page.contains("localStorage"),
        "the token is kept per tab only"
    );
    assert!(page.contains(r#"sandbox="allow-scripts""#));
    let response = app
        .clone()
        .oneshot(Request::builder().uri("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let headers = response.headers();
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    let response = app
        .oneshot(
            Request::builder()
                .uri("/healthz")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    assert_eq!(response.status(), StatusCode::OK);
}
