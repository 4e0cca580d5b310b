//! HTTP routes: the two sync endpoints, `/healthz`, `/metrics` and the web front end.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use sync_core::DocName;
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_http::services::{ServeDir, ServeFile};
use tracing::info;

use crate::AppState;
use crate::auth::AuthError;
use crate::conn::{self, MuxHandler, YwsHandler};

/// Errors at the HTTP edge; each maps to a status and a message safe for clients.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(AuthError),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        };
        (status, self.to_string()).into_response()
    }
}

pub fn router(app: Arc<AppState>) -> Router {
    let mut sync = Router::new().route("/sync", get(mux_upgrade)).route("/sync/{*doc}", get(yws_upgrade));
    let rate = app.config.limits.connect_rate;
    if rate > 0 {
        let period_ms = (1000 / u64::from(rate)).max(1);
        let governor = GovernorConfigBuilder::default()
            .per_millisecond(period_ms)
            .burst_size(rate.saturating_mul(10))
            .finish()
            .map(Arc::new);
        if let Some(config) = governor {
            sync = sync.layer(GovernorLayer { config });
        }
    }
    let web_dir = app.config.web_dir.clone();
    let index = web_dir.join("index.html");
    let web: Router<Arc<AppState>> = if index.exists() {
        Router::new().fallback_service(ServeDir::new(&web_dir).fallback(ServeFile::new(index)))
    } else {
        info!(web_dir = %web_dir.display(), "web front end not built; serving a placeholder page");
        Router::new().fallback(|| async {
            Html("<h1>collab</h1><p>The web front end is not built. Run <code>cargo xtask run</code>.</p>")
        })
    };
    Router::new()
        .merge(sync)
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .merge(web)
        .with_state(app)
}

async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], app.metrics.render())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

async fn yws_upgrade(
    State(app): State<Arc<AppState>>,
    Path(doc): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, AppError> {
    let doc = DocName::parse(&doc).map_err(|e| AppError::BadRequest(format!("invalid document name: {e}")))?;
    let token = params.get("token").map(String::as_str).or_else(|| bearer(&headers)).unwrap_or("");
    let identity = app.authorize(token, &doc).map_err(|e| {
        app.metrics.auth_failures.inc();
        info!(doc_id = %doc, reason = %e, "token refused at upgrade");
        AppError::Unauthorized(e)
    })?;
    let limits = &app.config.limits;
    let upgrade = ws.max_message_size(limits.max_message_size).max_frame_size(limits.max_message_size);
    let span = tracing::info_span!("conn", doc_id = %doc, user_id = %identity.user);
    Ok(upgrade.on_upgrade(move |socket| {
        let handler = YwsHandler::new(app.clone(), &doc, identity);
        let task = app.tracker.track_future(conn::run(socket, app.clone(), handler));
        tracing::Instrument::instrument(task, span)
    }))
}

async fn mux_upgrade(State(app): State<Arc<AppState>>, ws: WebSocketUpgrade) -> Response {
    let limits = &app.config.limits;
    let upgrade = ws.max_message_size(limits.max_message_size).max_frame_size(limits.max_message_size);
    let span = tracing::info_span!("conn", endpoint = "mux");
    upgrade.on_upgrade(move |socket| {
        let handler = MuxHandler::new(app.clone());
        let task = app.tracker.track_future(conn::run(socket, app.clone(), handler));
        tracing::Instrument::instrument(task, span)
    })
}
