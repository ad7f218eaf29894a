//! The agent's HTTP API (axum): sessions, live breakdowns, node facts, Prometheus metrics, the
//! OpenAPI document and a page that draws the breakdown. `router(state)` is all of it, so tests
//! drive it with `oneshot`, no socket needed.

mod auth;
mod listen;
mod metrics;
mod page;

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{
        DefaultBodyLimit, Path, Query, Request, State,
        rejection::{BytesRejection, JsonRejection},
    },
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{Html, IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::{
    agent::{Agent, AgentError},
    contract::{Breakdown, ErrorBody, SessionRequest, SessionView},
    doctor::NodeReport,
};

pub use auth::{Auth, AuthError, Scope};
pub use listen::{ServeLimits, serve, tls_acceptor};
pub use metrics::Metrics;

/// Largest request body accepted (session requests are a few hundred bytes).
pub const BODY_LIMIT: usize = 16 * 1024;

pub struct AppState {
    pub agent: Agent,
    /// What `doctor` found at start-up.
    pub node: NodeReport,
    /// Bearer credentials required on every path except /healthz and the page itself.
    pub auth: Option<Auth>,
    /// Without a token the agent only serves loopback, and then every request must name a
    /// loopback host: a web page whose name an attacker re-points at 127.0.0.1 (DNS
    /// rebinding) gets 403 instead of this node's data.
    pub loopback_only: bool,
    pub metrics: Metrics,
    /// Window computations (snapshots, symbolization, ruleset reads) running at once; the
    /// rest wait, so a burst of requests cannot take every CPU or pile up memory.
    work: Arc<tokio::sync::Semaphore>,
    /// When the last upkeep round (expiry, maintenance) completed, in ms since `born`.
    upkeep_done_ms: std::sync::atomic::AtomicU64,
    born: std::time::Instant,
}

/// Seconds without a completed upkeep round after which `/healthz` says degraded (503): long
/// enough for a round that reads rulesets with a slow tool, short enough that a hung one gets
/// the pod restarted.
pub const UPKEEP_STALL_S: u64 = 90;

/// Window computations that may run at once.
pub const MAX_CONCURRENT_WORK: usize = 4;
/// How long a request waits for a computation slot before it gets 503.
const WORK_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl AppState {
    pub fn new(agent: Agent, node: NodeReport, auth: Option<Auth>, loopback_only: bool) -> Self {
        Self {
            agent,
            node,
            auth,
            loopback_only,
            metrics: Metrics::new(),
            work: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_WORK)),
            upkeep_done_ms: std::sync::atomic::AtomicU64::new(0),
            born: std::time::Instant::now(),
        }
    }

    /// An upkeep round completed.
    pub fn upkeep_done(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.upkeep_done_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Seconds since the last completed upkeep round (or since start).
    pub fn upkeep_stalled_s(&self) -> u64 {
        let done = self
            .upkeep_done_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(done) / 1000
    }
}

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        let status = match &e {
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Conflict(_) => StatusCode::CONFLICT,
            AgentError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            AgentError::Probe(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        // 413 for an oversized body, 415 without a JSON content type, else 400.
        let status = match rejection.status() {
            s if s == StatusCode::PAYLOAD_TOO_LARGE || s == StatusCode::UNSUPPORTED_MEDIA_TYPE => s,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, rejection.body_text())
    }
}

/// Runs blocking measurement work (snapshots, symbolization) off the async workers.
async fn blocking<T: Send + 'static>(
    state: &Arc<AppState>,
    work: impl FnOnce(&AppState) -> Result<T, AgentError> + Send + 'static,
) -> Result<T, ApiError> {
    let permit = tokio::time::timeout(WORK_QUEUE_WAIT, Arc::clone(&state.work).acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "busy: {MAX_CONCURRENT_WORK} measurements are running and others are waiting; try again"
                ),
            )
        })?;
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || {
        // Held until the computation ends, even if the client has gone.
        let _permit = permit;
        work(&state)
    })
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("worker failed: {e}"),
        )
    })?
    .map_err(ApiError::from)
}

#[utoipa::path(get, path = "/healthz", responses(
    (status = 200, description = "alive"),
    (status = 503, description = "degraded: the once-a-second upkeep (session expiry, map maintenance) stalled"),
))]
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let stalled = state.upkeep_stalled_s();
    if stalled > UPKEEP_STALL_S {
        let body = serde_json::json!({
            "status": "degraded",
            "reason": format!("the once-a-second upkeep has not completed for {stalled} s"),
        });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(serde_json::json!({"status": "ok"})).into_response()
}

#[utoipa::path(get, path = "/api/v1/node", responses((status = 200, body = NodeReport)))]
async fn node(State(state): State<Arc<AppState>>) -> Json<NodeReport> {
    Json(state.node.clone())
}

#[utoipa::path(
    post, path = "/api/v1/sessions", request_body = SessionRequest,
    responses(
        (status = 201, body = SessionView),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)
    )
)]
async fn start_session(
    State(state): State<Arc<AppState>>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<SessionView>), ApiError> {
    // An empty body means all defaults; a body that is not a valid request is an error.
    // (The JSON content type was checked by `refuse_cross_site`.)
    let body = body.map_err(|rejection| {
        let status = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, rejection.body_text())
    })?;
    let request: SessionRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SessionRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("invalid session request: {e}"),
            )
        })?
    };
    let view = blocking(&state, move |s| s.agent.start_session(&request)).await?;
    if let Some(duration) = view.duration_s {
        // Its own timer, so a bounded window ends on time (the agent's 1 s ticker is a backstop).
        let (state, id) = (Arc::clone(&state), view.id);
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs_f64(duration)).await;
            let _ = blocking(&state, move |s| s.agent.stop_session(id)).await;
        });
    }
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(get, path = "/api/v1/sessions", responses((status = 200, body = Vec<SessionView>)))]
async fn list_sessions(State(state): State<Arc<AppState>>) -> Json<Vec<SessionView>> {
    Json(state.agent.sessions())
}

fn parse_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("`{raw}` is not a session id"),
        )
    })
}

#[utoipa::path(
    get, path = "/api/v1/sessions/{id}",
    params(("id" = u64, Path, description = "session id")),
    responses((status = 200, body = SessionView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn get_session(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(state.agent.session(id)?))
}

#[utoipa::path(
    post, path = "/api/v1/sessions/{id}/stop",
    params(("id" = u64, Path, description = "session id")),
    responses(
        (status = 200, body = SessionView), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 503, body = ErrorBody)
    )
)]
async fn stop_session(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(
        blocking(&state, move |s| s.agent.stop_session(id)).await?,
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct WindowQuery {
    /// Seconds back from now (1 to 300, default 10).
    window: Option<String>,
}

#[utoipa::path(
    get, path = "/api/v1/breakdown", params(WindowQuery),
    responses(
        (status = 200, body = Breakdown), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)
    )
)]
async fn rolling(
    State(state): State<Arc<AppState>>,
    Query(query): Query<WindowQuery>,
) -> Result<Json<Breakdown>, ApiError> {
    let seconds = query.seconds()?;
    Ok(Json(
        blocking(&state, move |s| s.agent.rolling(seconds, false)).await?,
    ))
}

impl WindowQuery {
    fn seconds(&self) -> Result<u64, ApiError> {
        match self.window.as_deref() {
            None => Ok(10),
            Some(raw) => raw.parse().map_err(|_| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("window=`{raw}` is not a number of seconds"),
                )
            }),
        }
    }
}

/// What a window's stacks are served as.
#[derive(Clone, Copy)]
enum Artefact {
    FlameGraph,
    Pprof,
    Folded,
}

impl From<crate::flame::FlameError> for ApiError {
    fn from(e: crate::flame::FlameError) -> Self {
        let status = match e {
            crate::flame::FlameError::NoStacks | crate::flame::FlameError::Empty => {
                StatusCode::CONFLICT
            }
            crate::flame::FlameError::Render(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// Renders a breakdown's stacks (off the async workers: a flame graph of thousands of
/// stacks takes tens of milliseconds).
async fn artefact(
    state: &Arc<AppState>,
    kind: Artefact,
    breakdown: impl FnOnce(&AppState) -> Result<Breakdown, AgentError> + Send + 'static,
) -> Result<Response, ApiError> {
    let rendered = blocking(state, move |s| {
        let b = breakdown(s)?;
        Ok(match kind {
            Artefact::FlameGraph => crate::flame::flamegraph_svg(&b),
            Artefact::Pprof => crate::flame::pprof_gz(&b),
            Artefact::Folded => crate::flame::folded(&b).map(String::into_bytes),
        })
    })
    .await??;
    let content_type = match kind {
        Artefact::FlameGraph => "image/svg+xml",
        Artefact::Pprof => "application/octet-stream",
        Artefact::Folded => "text/plain; charset=utf-8",
    };
    Ok(([(header::CONTENT_TYPE, content_type)], rendered).into_response())
}

async fn session_artefact(
    state: &Arc<AppState>,
    id: &str,
    kind: Artefact,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    artefact(state, kind, move |s| s.agent.session_with_stacks(id)).await
}

async fn rolling_artefact(
    state: &Arc<AppState>,
    query: &WindowQuery,
    kind: Artefact,
) -> Result<Response, ApiError> {
    let seconds = query.seconds()?;
    artefact(state, kind, move |s| s.agent.rolling(seconds, true)).await
}

#[utoipa::path(
    get, path = "/api/v1/sessions/{id}/flamegraph.svg",
    params(("id" = u64, Path, description = "session id")),
    responses(
        (status = 200, description = "interactive SVG flame graph, frames coloured by component", content_type = "image/svg+xml"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "running, failed, or no stacks (tracing backend)"),
        (status = 503, body = ErrorBody)
    )
)]
async fn session_flamegraph(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    session_artefact(&state, &id, Artefact::FlameGraph).await
}

#[utoipa::path(
    get, path = "/api/v1/sessions/{id}/profile.pb.gz",
    params(("id" = u64, Path, description = "session id")),
    responses(
        (status = 200, description = "gzipped pprof profile: samples, cycles, millicycles per packet", content_type = "application/octet-stream"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)
    )
)]
async fn session_pprof(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    session_artefact(&state, &id, Artefact::Pprof).await
}

#[utoipa::path(
    get, path = "/api/v1/sessions/{id}/folded",
    params(("id" = u64, Path, description = "session id")),
    responses(
        (status = 200, description = "folded stacks, `outer;...;inner cycles` per line", content_type = "text/plain"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)
    )
)]
async fn session_folded(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    session_artefact(&state, &id, Artefact::Folded).await
}

#[utoipa::path(
    get, path = "/api/v1/flamegraph.svg", params(WindowQuery),
    responses(
        (status = 200, description = "flame graph of the rolling window", content_type = "image/svg+xml"),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)
    )
)]
async fn rolling_flamegraph(
    State(state): State<Arc<AppState>>,
    Query(query): Query<WindowQuery>,
) -> Result<Response, ApiError> {
    rolling_artefact(&state, &query, Artefact::FlameGraph).await
}

#[utoipa::path(
    get, path = "/api/v1/profile.pb.gz", params(WindowQuery),
    responses(
        (status = 200, description = "gzipped pprof profile of the rolling window", content_type = "application/octet-stream"),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)
    )
)]
async fn rolling_pprof(
    State(state): State<Arc<AppState>>,
    Query(query): Query<WindowQuery>,
) -> Result<Response, ApiError> {
    rolling_artefact(&state, &query, Artefact::Pprof).await
}

#[utoipa::path(
    get, path = "/api/v1/folded", params(WindowQuery),
    responses(
        (status = 200, description = "folded stacks of the rolling window", content_type = "text/plain"),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)
    )
)]
async fn rolling_folded(
    State(state): State<Arc<AppState>>,
    Query(query): Query<WindowQuery>,
) -> Result<Response, ApiError> {
    rolling_artefact(&state, &query, Artefact::Folded).await
}

#[utoipa::path(
    get, path = "/metrics",
    responses(
        (status = 200, description = "Prometheus text exposition", content_type = "application/openmetrics-text"),
        (status = 503, body = ErrorBody)
    )
)]
async fn metrics_handler(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let text = blocking(&state, |s| {
        let failures = s.auth.as_ref().map_or(0, Auth::failures);
        s.metrics
            .scrape(&s.agent, failures)
            .map_err(AgentError::Probe)
    })
    .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "cnitrace agent",
        description = "CPU cycles per packet per datapath component, per node"
    ),
    paths(
        healthz,
        node,
        start_session,
        list_sessions,
        get_session,
        stop_session,
        session_flamegraph,
        session_pprof,
        session_folded,
        rolling,
        rolling_flamegraph,
        rolling_pprof,
        rolling_folded,
        metrics_handler
    ),
    components(schemas(ErrorBody, SessionRequest, SessionView, Breakdown, NodeReport))
)]
pub struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn index() -> Html<String> {
    Html(page::index())
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this path".to_owned(),
    )
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such path; see /api/v1/openapi.json".to_owned(),
    )
}

/// Paths anyone may read: liveness, and the page (static HTML that holds no data; its API
/// calls carry the token).
fn is_public(path: &str) -> bool {
    // A browser asks for /favicon.ico with every page load: a 404, not a slowed 401.
    path == "/healthz" || path == "/" || path == "/favicon.ico"
}

async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(auth) = &state.auth else {
        return next.run(request).await;
    };
    if is_public(request.uri().path()) {
        return next.run(request).await;
    }
    match auth.scope_of(request.headers()) {
        Some(granted) if granted >= Scope::needed_for(request.method()) => next.run(request).await,
        Some(_) => ApiError(
            StatusCode::FORBIDDEN,
            "this token is read-only: opening and stopping sessions needs the operator token"
                .to_owned(),
        )
        .into_response(),
        None => {
            tokio::time::sleep(auth::FAILURE_DELAY).await;
            ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer ...)".to_owned(),
            )
            .into_response()
        }
    }
}

/// The page's policy: its own inline script and style, API calls to itself, the flame graph
/// from a blob in a frame, nothing else; no site may frame it.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src \
    'unsafe-inline'; connect-src 'self'; frame-src blob:; img-src 'self' data:; base-uri \
    'none'; form-action 'none'; frame-ancestors 'none'";
/// A flame graph opened directly: its zoom and search scripts run, in an opaque origin that
/// cannot reach the agent's API or the page's token.
const SVG_POLICY: &str = "sandbox allow-scripts; default-src 'none'; script-src \
    'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'self'";

/// The usual headers on every answer: no type sniffing, no framing by other sites, no
/// referrer, and a content security policy for the page and the SVGs.
async fn security_headers(mut response: Response) -> Response {
    use axum::http::HeaderValue;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let policy = if content_type.starts_with("text/html") {
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        Some(PAGE_POLICY)
    } else if content_type.starts_with("image/svg+xml") {
        Some(SVG_POLICY)
    } else {
        None
    };
    if let Some(policy) = policy {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(policy),
        );
    }
    response
}

/// Whether a browser's `Origin` is this server as the request addressed it (`Host`): the same
/// host and port, a default port implied on either side. One port serves one scheme, so the
/// port also tells an `http://` page from this `https://` server on another port.
pub fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => "80",
        "https" => "443",
        _ => return false,
    };
    let with_port = |authority: &str| {
        let authority = authority.trim_end_matches('/').to_ascii_lowercase();
        let has_port = if authority.starts_with('[') {
            authority.contains("]:")
        } else {
            authority.contains(':')
        };
        if has_port {
            authority
        } else {
            format!("{authority}:{default_port}")
        }
    };
    with_port(authority) == with_port(host)
}

/// The host part of a `Host` header or an `Origin` URL (`[::1]:9560` -> `[::1]`).
pub fn host_of(authority: &str) -> &str {
    let authority = authority
        .split_once("://")
        .map_or(authority, |(_, rest)| rest)
        .trim_end_matches('/');
    if authority.starts_with('[') {
        // After the bracket only a port may follow: `[::1].evil.example` is not `[::1]`.
        return match authority.split_once(']') {
            Some((host, rest))
                if rest.is_empty()
                    || rest
                        .strip_prefix(':')
                        .is_some_and(|port| port.bytes().all(|b| b.is_ascii_digit())) =>
            {
                &authority[..=host.len()]
            }
            _ => authority,
        };
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

pub fn is_loopback_host(host: &str) -> bool {
    // One pair of brackets at most: `[[::1]]` is no host.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses cross-site use: a request must name a loopback host when the agent serves loopback
/// without a token (DNS rebinding); a state-changing request must carry a JSON content type
/// (which a cross-site form or `no-cors` fetch cannot send) and, if the browser says where it
/// comes from, come from the agent's own origin.
async fn refuse_cross_site(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(host_of);
    if state.loopback_only
        && request.uri().path() != "/healthz"
        && !host.is_some_and(is_loopback_host)
    {
        return ApiError(
            StatusCode::FORBIDDEN,
            "this agent serves loopback without a token: address it as localhost or 127.0.0.1"
                .to_owned(),
        )
        .into_response();
    }
    if request.method() == axum::http::Method::POST {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json {
            return ApiError(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "POST requests need Content-Type: application/json (the body may be empty)"
                    .to_owned(),
            )
            .into_response();
        }
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        let authority = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        if let Some(origin) = origin
            && origin != "null"
            && authority.is_some_and(|authority| !same_origin(origin, authority))
        {
            return ApiError(
                StatusCode::FORBIDDEN,
                format!("cross-origin request from {origin} refused"),
            )
            .into_response();
        }
        if origin == Some("null") {
            return ApiError(
                StatusCode::FORBIDDEN,
                "request from an opaque origin refused".to_owned(),
            )
            .into_response();
        }
    }
    next.run(request).await
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_handler))
        .route("/api/v1/node", get(node))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/sessions", post(start_session).get(list_sessions))
        .route("/api/v1/sessions/{id}", get(get_session))
        .route("/api/v1/sessions/{id}/stop", post(stop_session))
        .route(
            "/api/v1/sessions/{id}/flamegraph.svg",
            get(session_flamegraph),
        )
        .route("/api/v1/sessions/{id}/profile.pb.gz", get(session_pprof))
        .route("/api/v1/sessions/{id}/folded", get(session_folded))
        .route("/api/v1/breakdown", get(rolling))
        .route("/api/v1/flamegraph.svg", get(rolling_flamegraph))
        .route("/api/v1/profile.pb.gz", get(rolling_pprof))
        .route("/api/v1/folded", get(rolling_folded))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::map_response(security_headers))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ))
        // Outermost: a cross-site request is refused before it can probe the token.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            refuse_cross_site,
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests;
