//! The project HTTP API: export, import and checkpoints. Every handler takes its
//! [`ProjectAccess`] or [`EditorAccess`] first, so credentials are checked before anything else
//! (an import's body included) is read.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tracing::info;

use super::AppState;
use super::access::{EditorAccess, ProjectAccess};
use super::error::AppError;
use crate::archive::{self, ArchiveLimits};
use crate::checkpoints;
use crate::project;

/// Largest accepted import upload (compressed), in bytes.
pub const IMPORT_BODY_LIMIT: usize = 32 << 20;

/// `GET /api/projects/{project}/export?format=tar.gz|zip[&checkpoint=ID]`: the project's files
/// as an archive, now or at a checkpoint.
pub async fn export(
    State(app): State<Arc<AppState>>,
    access: ProjectAccess,
    Path(project): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, AppError> {
    let root = access.root;
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
            let bytes = app.tasks.blocking("export", move || archive::write_tar_gz(&files, now)).await;
            (bytes.map_err(|_| AppError::Export)?.map_err(|_| AppError::Export)?, "application/gzip")
        }
        "zip" => {
            let bytes = app.tasks.blocking("export", move || archive::write_zip(&files)).await;
            (bytes.map_err(|_| AppError::Export)?.map_err(|_| AppError::Export)?, "application/zip")
        }
        _ => return Err(AppError::BadRequest("unknown format: use tar.gz or zip".into())),
    };
    let disposition = format!("attachment; filename=\"{project}.{format}\"");
    Ok(([(header::CONTENT_TYPE, content_type.to_owned()), (header::CONTENT_DISPOSITION, disposition)], bytes)
        .into_response())
}

/// `POST /api/projects/{project}/import`: adds or replaces files from a `.tar.gz` or `.zip` body,
/// as live edits every connected peer sees. All-or-nothing on bad archives: nothing is written
/// unless the whole archive passes the checks. The body is read only once the editor's token
/// is verified.
pub async fn import(
    State(app): State<Arc<AppState>>,
    EditorAccess(access): EditorAccess,
    body: Bytes,
) -> Result<String, AppError> {
    let ProjectAccess { root, identity, .. } = access;
    let read = app.tasks.blocking("import", move || archive::read(&body, ArchiveLimits::default())).await;
    let files = read.map_err(|_| AppError::Internal)??;
    let count = project::write_files(&app.rooms, root.as_str(), &files).await?;
    info!(project = %root, user_id = %identity.user, files = count, "project imported");
    Ok(format!("imported {count} files\n"))
}

/// A checkpoint as the API lists it (wire type).
#[derive(Debug, serde::Serialize)]
pub struct CheckpointJson {
    id: i64,
    name: String,
    author: String,
    created_at: i64,
    documents: i64,
}

/// `GET /api/projects/{project}/checkpoints`: every checkpoint, oldest first.
pub async fn list_checkpoints(
    State(app): State<Arc<AppState>>,
    access: ProjectAccess,
) -> Result<axum::Json<Vec<CheckpointJson>>, AppError> {
    let list = checkpoints::list(&app.rooms, access.root.as_str()).await?;
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

/// `POST /api/projects/{project}/checkpoints?name=...`: saves a named checkpoint now;
/// `?auto=before-ai-turn` saves an automatic one instead (subject to retention).
pub async fn create_checkpoint(
    State(app): State<Arc<AppState>>,
    EditorAccess(access): EditorAccess,
    Query(params): Query<HashMap<String, String>>,
) -> Result<axum::Json<serde_json::Value>, AppError> {
    let ProjectAccess { root, identity, .. } = access;
    if let Some(reason) = params.get("auto") {
        // Automatic checkpoints on request, e.g. by the AI peer before each turn; retention applies.
        let name = match reason.as_str() {
            "before-ai-turn" => format!("{}before AI turn", checkpoints::AUTO_PREFIX),
            _ => return Err(AppError::BadRequest("unknown automatic checkpoint kind".into())),
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
pub async fn restore_checkpoint(
    State(app): State<Arc<AppState>>,
    EditorAccess(access): EditorAccess,
    Path((_, id)): Path<(String, i64)>,
) -> Result<axum::Json<serde_json::Value>, AppError> {
    let ProjectAccess { root, identity, .. } = access;
    let before = checkpoints::restore(&app.rooms, root.as_str(), id, &identity.name).await?;
    info!(project = %root, user_id = %identity.user, checkpoint = id, "checkpoint restored");
    Ok(axum::Json(serde_json::json!({ "restored": id, "saved_before": before })))
}

/// `GET /api/projects/{project}/checkpoints/{id}/diff?path=...`: unified diff, checkpoint to now.
pub async fn diff_checkpoint(
    State(app): State<Arc<AppState>>,
    access: ProjectAccess,
    Path((_, id)): Path<(String, i64)>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<String, AppError> {
    let path = params.get("path").ok_or_else(|| AppError::BadRequest("the path parameter is required".into()))?;
    Ok(checkpoints::diff(&app.rooms, access.root.as_str(), id, path).await?)
}
