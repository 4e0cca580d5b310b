//! Who is asking: extractors that verify the request's token for the project in its path before
//! anything else of the request is looked at.
//!
//! The token comes as `Authorization: Bearer ...` or `?token=...`. [`ProjectAccess`] admits any
//! member of the project, [`EditorAccess`] only editors. Handlers take them first and any body
//! extractor (`Bytes`, `Body`) last: axum runs the parts extractors in order and reads the body
//! only after them, so a request without valid credentials is refused before its body is read.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Query, RawPathParams};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use sync_core::DocName;

use super::AppState;
use super::error::AppError;
use crate::auth::{Grant, Identity};

/// A verified member of the project named by the path's `{project}`.
#[derive(Debug, Clone)]
pub struct ProjectAccess {
    /// The project's root document.
    pub root: DocName,
    pub identity: Identity,
    /// When the token expires (seconds since the Unix epoch; `None`: never, anonymous): what a
    /// socket opened with it is held to.
    pub expires: Option<u64>,
}

/// A verified editor of the project named by the path's `{project}`.
#[derive(Debug, Clone)]
pub struct EditorAccess(pub ProjectAccess);

/// The bearer token of a request's `Authorization` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

/// The request's token: the `token` query parameter first, then the bearer header; empty if
/// neither.
pub fn request_token(parts: &Parts) -> Result<String, AppError> {
    let Query(params) = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
        .map_err(|_| AppError::BadRequest("invalid query string".into()))?;
    let token = params.get("token").map(String::as_str).or_else(|| bearer(&parts.headers)).unwrap_or("");
    Ok(token.to_owned())
}

impl ProjectAccess {
    /// Verifies `token` for `project`'s root document.
    pub fn check(app: &AppState, project: &str, token: &str) -> Result<ProjectAccess, AppError> {
        let root = DocName::parse(project).map_err(|_| AppError::BadRequest("invalid project name".into()))?;
        let grant = app.auth.authorize_grant(token, &root).map_err(|e| {
            app.metrics.auth_failures.inc();
            AppError::Unauthorized(e)
        })?;
        Ok(ProjectAccess { root, identity: grant.identity, expires: grant.expires })
    }

    /// The verified token as a grant, for a socket held to its expiry.
    pub fn into_grant(self) -> Grant {
        Grant { identity: self.identity, expires: self.expires, service: false }
    }
}

impl FromRequestParts<Arc<AppState>> for ProjectAccess {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let params = RawPathParams::from_request_parts(parts, app)
            .await
            .map_err(|_| AppError::BadRequest("the path names no project".into()))?;
        let project = params
            .iter()
            .find_map(|(name, value)| (name == "project").then(|| value.to_owned()))
            .ok_or_else(|| AppError::BadRequest("the path names no project".into()))?;
        ProjectAccess::check(app, &project, &request_token(parts)?)
    }
}

impl FromRequestParts<Arc<AppState>> for EditorAccess {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let access = ProjectAccess::from_request_parts(parts, app).await?;
        if !access.identity.role.can_write() {
            return Err(AppError::Forbidden);
        }
        Ok(EditorAccess(access))
    }
}
