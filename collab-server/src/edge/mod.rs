//! HTTP routes: the two sync endpoints, `/healthz`, `/metrics` and the web front end.

pub mod listen;
pub mod preview;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use sync_core::DocName;
use tokio_util::sync::CancellationToken;
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_http::services::{ServeDir, ServeFile};
use tracing::info;

use crate::AppState;
use crate::archive::{self, ArchiveError, ArchiveLimits};
use crate::auth::{AuthError, Identity};
use crate::checkpoints::{self, CheckpointError};
use crate::project::{self, ProjectError};
use crate::sync::conn::{self, MuxHandler, YwsHandler};

/// Errors at the HTTP edge; each maps to a status and a message safe for clients.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(AuthError),
    #[error("this needs the editor role")]
    Forbidden,
    #[error("{0}")]
    Archive(#[from] ArchiveError),
    #[error("{0}")]
    Project(#[from] ProjectError),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    BadGateway(String),
    #[error("could not build the archive")]
    Export,
    #[error("{0}")]
    Checkpoint(#[from] CheckpointError),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = match &self {
            AppError::BadRequest(_) | AppError::Archive(_) => StatusCode::BAD_REQUEST,
            AppError::Project(ProjectError::Tree(_) | ProjectError::BadName) => StatusCode::BAD_REQUEST,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden => StatusCode::FORBIDDEN,
            AppError::Project(ProjectError::Unavailable) | AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Export => StatusCode::INTERNAL_SERVER_ERROR,
            AppError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            AppError::Checkpoint(CheckpointError::NotFound | CheckpointError::NoSuchFile(_)) => StatusCode::NOT_FOUND,
            AppError::Checkpoint(CheckpointError::Project(ProjectError::Tree(_) | ProjectError::BadName)) => {
                StatusCode::BAD_REQUEST
            }
            AppError::Checkpoint(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        (status, self.to_string()).into_response()
    }
}

pub fn router(app: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/projects/{project}/export", get(export))
        .route("/api/projects/{project}/import", post(import))
        .route("/api/projects/{project}/checkpoints", get(list_checkpoints).post(create_checkpoint))
        .route("/api/projects/{project}/checkpoints/{id}/restore", post(restore_checkpoint))
        .route("/api/projects/{project}/checkpoints/{id}/diff", get(diff_checkpoint))
        .layer(DefaultBodyLimit::max(IMPORT_BODY_LIMIT));
    // Everything that opens a socket or does work for a token shares one per-address rate;
    // `/healthz`, `/metrics` and the static front end do not.
    let mut limited = Router::new()
        .route("/sync", get(mux_upgrade))
        .route("/sync/{*doc}", get(yws_upgrade))
        .merge(api)
        .route("/exec/{project}", get(exec_upgrade))
        .route("/preview/{project}/{port}", get(crate::edge::preview::bare))
        .route("/preview/{project}/{port}/", axum::routing::any(crate::edge::preview::root))
        .route("/preview/{project}/{port}/{*path}", axum::routing::any(crate::edge::preview::path));
    let rate = app.config.limits.connect_rate;
    if rate > 0 {
        let period_ms = (1000 / u64::from(rate)).max(1);
        let governor = GovernorConfigBuilder::default()
            .per_millisecond(period_ms)
            .burst_size(rate.saturating_mul(10))
            .finish()
            .map(Arc::new);
        if let Some(config) = governor {
            let limiter = config.limiter().clone();
            let prune = move || {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            };
            app.tracker.spawn(prune_rate_limiter(prune, app.shutdown.clone()));
            limited = limited.layer(GovernorLayer { config });
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
        .merge(limited)
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .merge(web)
        .with_state(app)
}

/// Forgets the addresses whose rate is back to full now and then: the keyed limiter keeps an
/// entry for every address it ever saw otherwise.
async fn prune_rate_limiter(prune: impl Fn() + Send + 'static, stop: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => prune(),
        }
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], app.metrics.render())
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
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
    let upgrade = websocket_limits(ws, app.config.limits.max_message_size);
    let span = tracing::info_span!("conn", doc_id = %doc, user_id = %identity.user);
    Ok(upgrade.on_upgrade(move |socket| {
        let handler = YwsHandler::new(&app, &doc, identity);
        let task = app.tracker.track_future(conn::run(socket, app.clone(), handler));
        tracing::Instrument::instrument(task, span)
    }))
}

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

async fn mux_upgrade(State(app): State<Arc<AppState>>, ws: WebSocketUpgrade) -> Response {
    let upgrade = websocket_limits(ws, app.config.limits.max_message_size);
    let span = tracing::info_span!("conn", endpoint = "mux");
    upgrade.on_upgrade(move |socket| {
        let handler = MuxHandler::new(app.clone());
        let task = app.tracker.track_future(conn::run(socket, app.clone(), handler));
        tracing::Instrument::instrument(task, span)
    })
}

/// `GET /exec/{project}?token=...`: the project's runs and terminals (see [`crate::exec`]).
async fn exec_upgrade(
    State(app): State<Arc<AppState>>,
    Path(project): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, AppError> {
    let (_, identity) = project_identity(&app, &project, &params, &headers)?;
    if !app.exec.enabled() {
        return Err(AppError::Unavailable(crate::exec::ExecError::Disabled.to_string()));
    }
    let upgrade = websocket_limits(ws, crate::exec::MAX_MESSAGE);
    let span = tracing::info_span!("exec", project = %identity.project, user_id = %identity.user);
    Ok(upgrade.on_upgrade(move |socket| {
        let task =
            app.tracker.track_future(crate::exec::serve_peer(socket, app.exec.clone(), identity, app.shutdown.clone()));
        tracing::Instrument::instrument(task, span)
    }))
}

/// Largest accepted import upload (compressed), in bytes.
const IMPORT_BODY_LIMIT: usize = 32 << 20;

/// Verifies the request's token (`?token=` or `Authorization: Bearer`) for a project's root.
pub(crate) fn project_identity(
    app: &AppState,
    project: &str,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<(DocName, Identity), AppError> {
    let root = DocName::parse(project).map_err(|e| AppError::BadRequest(format!("invalid project: {e}")))?;
    let token = params.get("token").map(String::as_str).or_else(|| bearer(headers)).unwrap_or("");
    let identity = app.authorize(token, &root).map_err(|e| {
        app.metrics.auth_failures.inc();
        AppError::Unauthorized(e)
    })?;
    Ok((root, identity))
}

/// `GET /api/projects/{project}/export?format=tar.gz|zip[&checkpoint=ID]`: the project's files
/// as an archive, now or at a checkpoint.
async fn export(
    State(app): State<Arc<AppState>>,
    Path(project): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let (root, _) = project_identity(&app, &project, &params, &headers)?;
    let files = match params.get("checkpoint") {
        Some(id) => {
            let id = id.parse().map_err(|_| AppError::BadRequest("checkpoint must be a number".into()))?;
            checkpoints::files_at(&app.rooms, root.as_str(), id).await?
        }
        None => project::read_files(&app.rooms, root.as_str()).await?,
    };
    let format = params.get("format").map(String::as_str).unwrap_or("tar.gz");
    let (bytes, content_type) = match format {
        "tar.gz" => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            (archive::write_tar_gz(&files, now).map_err(|_| AppError::Export)?, "application/gzip")
        }
        "zip" => (archive::write_zip(&files).map_err(|_| AppError::Export)?, "application/zip"),
        other => return Err(AppError::BadRequest(format!("unknown format {other:?}: use tar.gz or zip"))),
    };
    let disposition = format!("attachment; filename=\"{project}.{format}\"");
    Ok(([(header::CONTENT_TYPE, content_type.to_owned()), (header::CONTENT_DISPOSITION, disposition)], bytes)
        .into_response())
}

/// `POST /api/projects/{project}/import`: adds or replaces files from a `.tar.gz` or `.zip` body,
/// as live edits every connected peer sees. All-or-nothing on bad archives: nothing is written
/// unless the whole archive passes the checks.
async fn import(
    State(app): State<Arc<AppState>>,
    Path(project): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<String, AppError> {
    let (root, identity) = project_identity(&app, &project, &params, &headers)?;
    if !identity.role.can_write() {
        return Err(AppError::Forbidden);
    }
    let files = archive::read(&body, ArchiveLimits::default())?;
    let count = project::write_files(&app.rooms, root.as_str(), &files).await?;
    info!(project = %root, user_id = %identity.user, files = count, "project imported");
    Ok(format!("imported {count} files\n"))
}

/// A checkpoint as the API lists it (wire type).
#[derive(Debug, serde::Serialize)]
struct CheckpointJson {
    id: i64,
    name: String,
    author: String,
    created_at: i64,
    documents: i64,
}

/// `GET /api/projects/{project}/checkpoints`: every checkpoint, oldest first.
async fn list_checkpoints(
    State(app): State<Arc<AppState>>,
    Path(project): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<axum::Json<Vec<CheckpointJson>>, AppError> {
    let (root, _) = project_identity(&app, &project, &params, &headers)?;
    let list = checkpoints::list(&app.rooms, root.as_str()).await?;
    Ok(axum::Json(
        list.into_iter()
            .map(|c| CheckpointJson {
                id: c.id,
                name: c.name,
                author: c.author,
                created_at: c.created_at,
                documents: c.docs,
            })
            .collect(),
    ))
}

fn editor(
    app: &AppState,
    project: &str,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<(DocName, Identity), AppError> {
    let (root, identity) = project_identity(app, project, params, headers)?;
    if !identity.role.can_write() {
        return Err(AppError::Forbidden);
    }
    Ok((root, identity))
}

/// `POST /api/projects/{project}/checkpoints?name=...`: saves a named checkpoint now;
/// `?auto=before-ai-turn` saves an automatic one instead (subject to retention).
async fn create_checkpoint(
    State(app): State<Arc<AppState>>,
    Path(project): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<axum::Json<serde_json::Value>, AppError> {
    let (root, identity) = editor(&app, &project, &params, &headers)?;
    if let Some(reason) = params.get("auto") {
        // Automatic checkpoints on request, e.g. by the AI peer before each turn; retention applies.
        let name = match reason.as_str() {
            "before-ai-turn" => format!("{}before AI turn", checkpoints::AUTO_PREFIX),
            other => return Err(AppError::BadRequest(format!("unknown automatic checkpoint {other:?}"))),
        };
        let id = checkpoints::create(&app.rooms, root.as_str(), &name, &identity.name).await?;
        checkpoints::prune_automatic(&app.rooms, root.as_str(), app.config.auto_checkpoints_kept).await?;
        return Ok(axum::Json(serde_json::json!({ "id": id })));
    }
    let name = params.get("name").map(|n| n.trim()).filter(|n| !n.is_empty()).unwrap_or("checkpoint");
    if name.len() > 200 || name.starts_with(checkpoints::AUTO_PREFIX.trim_end()) {
        return Err(AppError::BadRequest(
            "checkpoint names are at most 200 bytes and may not start with \"auto:\"".into(),
        ));
    }
    let id = checkpoints::create(&app.rooms, root.as_str(), name, &identity.name).await?;
    info!(project = %root, user_id = %identity.user, checkpoint = id, "checkpoint saved");
    Ok(axum::Json(serde_json::json!({ "id": id })))
}

/// `POST /api/projects/{project}/checkpoints/{id}/restore`: brings every file back to the
/// checkpoint, live, as a new change; answers with the id of the checkpoint saved just before.
async fn restore_checkpoint(
    State(app): State<Arc<AppState>>,
    Path((project, id)): Path<(String, i64)>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<axum::Json<serde_json::Value>, AppError> {
    let (root, identity) = editor(&app, &project, &params, &headers)?;
    let before = checkpoints::restore(&app.rooms, root.as_str(), id, &identity.name).await?;
    info!(project = %root, user_id = %identity.user, checkpoint = id, "checkpoint restored");
    Ok(axum::Json(serde_json::json!({ "restored": id, "saved_before": before })))
}

/// `GET /api/projects/{project}/checkpoints/{id}/diff?path=...`: unified diff, checkpoint to now.
async fn diff_checkpoint(
    State(app): State<Arc<AppState>>,
    Path((project, id)): Path<(String, i64)>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<String, AppError> {
    let (root, _) = project_identity(&app, &project, &params, &headers)?;
    let path = params.get("path").ok_or_else(|| AppError::BadRequest("the path parameter is required".into()))?;
    Ok(checkpoints::diff(&app.rooms, root.as_str(), id, path).await?)
}
