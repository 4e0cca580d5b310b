//! `AppError`: every error at the HTTP edge, mapped to a status and a message safe for clients.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::archive::ArchiveError;
use crate::auth::AuthError;
use crate::checkpoints::CheckpointError;
use crate::project::ProjectError;

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
    #[error("internal error")]
    Internal,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = match &self {
            AppError::BadRequest(_) | AppError::Archive(_) => StatusCode::BAD_REQUEST,
            AppError::Project(ProjectError::Tree(_) | ProjectError::BadName) => StatusCode::BAD_REQUEST,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden => StatusCode::FORBIDDEN,
            AppError::Project(ProjectError::Unavailable) | AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Export | AppError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
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
