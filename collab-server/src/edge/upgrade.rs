//! The WebSocket upgrades: `/sync/{doc}` (y-websocket, token checked before the upgrade),
//! `/sync` (Hocuspocus, tokens per document inside the socket) and `/exec/{project}`.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, State, WebSocketUpgrade};
use axum::http::request::Parts;
use axum::response::Response;
use sync_core::DocName;
use tracing::info;

use super::AppState;
use super::access::{ProjectAccess, request_token};
use super::error::AppError;
use crate::exec::{self, ExecError};
use crate::sync::conn::{self, MuxHandler, YwsHandler};

/// Message limits, and buffers sized for many mostly idle connections: tungstenite's default
/// 128 KiB read buffer per socket would be most of a connection's memory. The write buffer
/// only fills between the frames the write loop batches and its flush.
fn websocket_limits(ws: WebSocketUpgrade, max_message_size: usize) -> WebSocketUpgrade {
    ws.max_message_size(max_message_size)
        .max_frame_size(max_message_size)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
}

/// Bytes read from a socket at a time.
const READ_BUFFER: usize = 4 * 1024;
/// Bytes of frames buffered before a write goes to the socket without waiting for a flush.
const WRITE_BUFFER: usize = 64 * 1024;

/// The request's token (`?token=` or a bearer header), taken before the upgrade.
pub struct Token(String);

impl FromRequestParts<Arc<AppState>> for Token {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        Ok(Token(request_token(parts)?))
    }
}

/// `GET /sync/{doc}`: one document per socket; the token is checked before the upgrade (401
/// and nothing loaded).
pub async fn yws_upgrade(
    State(app): State<Arc<AppState>>,
    Path(doc): Path<String>,
    Token(token): Token,
    ws: WebSocketUpgrade,
) -> Result<Response, AppError> {
    let doc = DocName::parse(&doc).map_err(|_| AppError::BadRequest("invalid document name".into()))?;
    let grant = app.auth.authorize_grant(&token, &doc).map_err(|e| {
        app.metrics.auth_failures.inc();
        info!(doc_id = %doc, reason = %e, "token refused at upgrade");
        AppError::Unauthorized(e)
    })?;
    let upgrade = websocket_limits(ws, app.config.limits.max_message_size);
    let span = tracing::info_span!("conn", doc_id = %doc, user_id = %grant.identity.user);
    Ok(upgrade.on_upgrade(move |socket| {
        let handler = YwsHandler::new(&app.sync, &doc, grant);
        let task = app.tasks.track("connection", conn::run(socket, app.sync.clone(), handler));
        tracing::Instrument::instrument(task, span)
    }))
}

/// `GET /sync`: the multiplexed endpoint; documents are authenticated one by one inside.
pub async fn mux_upgrade(State(app): State<Arc<AppState>>, ws: WebSocketUpgrade) -> Response {
    let upgrade = websocket_limits(ws, app.config.limits.max_message_size);
    let span = tracing::info_span!("conn", endpoint = "mux");
    upgrade.on_upgrade(move |socket| {
        let handler = MuxHandler::new(app.sync.clone());
        let task = app.tasks.track("connection", conn::run(socket, app.sync.clone(), handler));
        tracing::Instrument::instrument(task, span)
    })
}

/// `GET /exec/{project}?token=...`: the project's runs and terminals (see [`crate::exec`]).
pub async fn exec_upgrade(
    State(app): State<Arc<AppState>>,
    access: ProjectAccess,
    ws: WebSocketUpgrade,
) -> Result<Response, AppError> {
    let grant = access.into_grant();
    if !app.exec.enabled() {
        return Err(AppError::Unavailable(ExecError::Disabled.to_string()));
    }
    let upgrade = websocket_limits(ws, exec::MAX_MESSAGE);
    let span = tracing::info_span!("exec", project = %grant.identity.project, user_id = %grant.identity.user);
    Ok(upgrade.on_upgrade(move |socket| {
        let task =
            app.tasks.track("exec peer", exec::serve_peer(socket, app.exec.clone(), grant, app.shutdown.clone()));
        tracing::Instrument::instrument(task, span)
    }))
}
