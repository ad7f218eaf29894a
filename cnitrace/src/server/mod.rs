//! The agent's HTTP API (axum): sessions, live breakdowns, node facts, Prometheus metrics, the
//! OpenAPI document and a page that draws the breakdown. `router(state)` is all of it, so tests
//! drive it with `oneshot`, no socket needed.

mod metrics;
mod page;

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Path, Query, Request, State, rejection::JsonRejection},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{Html, IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use subtle::ConstantTimeEq as _;
use utoipa::OpenApi;

use crate::{
    agent::{Agent, AgentError},
    contract::{Breakdown, ErrorBody, SessionRequest, SessionView},
    doctor::NodeReport,
};

pub use metrics::Metrics;

/// Largest request body accepted (session requests are a few hundred bytes).
pub const BODY_LIMIT: usize = 16 * 1024;

pub struct AppState {
    pub agent: Agent,
    /// What `doctor` found at start-up.
    pub node: NodeReport,
    /// Bearer token required on every path except /healthz and the page itself.
    pub token: Option<String>,
    pub metrics: Metrics,
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
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || work(&state))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("worker failed: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "alive")))]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/api/v1/node", responses((status = 200, body = NodeReport)))]
async fn node(State(state): State<Arc<AppState>>) -> Json<NodeReport> {
    Json(state.node.clone())
}

#[utoipa::path(
    post, path = "/api/v1/sessions", request_body = SessionRequest,
    responses(
        (status = 201, body = SessionView),
        (status = 400, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)
    )
)]
async fn start_session(
    State(state): State<Arc<AppState>>,
    body: Result<Option<Json<SessionRequest>>, JsonRejection>,
) -> Result<(StatusCode, Json<SessionView>), ApiError> {
    // No body (no Content-Type) means all defaults; a body that is not valid JSON is an error.
    let request = body?.map(|Json(request)| request).unwrap_or_default();
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
    responses((status = 200, body = SessionView), (status = 404, body = ErrorBody))
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
    responses((status = 200, body = SessionView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody))
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
    responses((status = 200, body = Breakdown), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody))
)]
async fn rolling(
    State(state): State<Arc<AppState>>,
    Query(query): Query<WindowQuery>,
) -> Result<Json<Breakdown>, ApiError> {
    let seconds = match query.window.as_deref() {
        None => 10,
        Some(raw) => raw.parse().map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("window=`{raw}` is not a number of seconds"),
            )
        })?,
    };
    Ok(Json(
        blocking(&state, move |s| s.agent.rolling(seconds)).await?,
    ))
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text exposition")))]
async fn metrics_handler(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let text = blocking(&state, |s| {
        s.metrics.scrape(&s.agent).map_err(AgentError::Probe)
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
        rolling,
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
    path == "/healthz" || path == "/"
}

fn token_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Constant time, so response timing does not reveal how much of a guess was right.
    presented.as_bytes().ct_eq(token.as_bytes()).into()
}

async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.token
        && !is_public(request.uri().path())
        && !token_matches(request.headers(), token)
    {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer ...)".to_owned(),
        )
        .into_response();
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
        .route("/api/v1/breakdown", get(rolling))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests;
