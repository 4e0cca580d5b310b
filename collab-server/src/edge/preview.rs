//! Live previews: `/preview/{project}/{port}/...` proxies HTTP and WebSocket traffic to a program
//! listening on `port` in the project's sandbox.
//!
//! Only project members get through: the first request carries the token (`?token=` or a bearer
//! header); the answer sets it as a cookie scoped to the project's preview path, so the page's own
//! relative links and scripts work. The token never reaches the program: the query parameter,
//! the cookie and the authorization header are taken out of what is forwarded.
//!
//! A preview is a program the project's members wrote, served from the server's own origin. Every
//! response therefore carries `Content-Security-Policy: sandbox ...`: the browser runs the page as
//! a unique opaque origin, so its scripts cannot read the IDE's storage or call the API with
//! another user's credentials.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use super::AppState;
use super::access::{ProjectAccess, bearer};
use super::error::AppError;

const COOKIE: &str = "collab_preview";
/// The sandbox policy of every preview response: scripts, forms and popups run, but in an
/// opaque origin of their own.
const CSP: &str = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

/// `GET /preview/{project}/{port}`: the same with a trailing slash, so relative links resolve.
pub async fn bare(Path((project, port)): Path<(String, u16)>, uri: Uri) -> Redirect {
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    Redirect::temporary(&format!("/preview/{project}/{port}/{query}"))
}

/// `/preview/{project}/{port}/` (the root of the program's site).
pub async fn root(
    State(app): State<Arc<AppState>>,
    Path((project, port)): Path<(String, u16)>,
    Query(params): Query<HashMap<String, String>>,
    request: Request,
) -> Result<Response, AppError> {
    proxy(app, project, port, String::new(), params, request).await
}

/// `/preview/{project}/{port}/{*path}`.
pub async fn path(
    State(app): State<Arc<AppState>>,
    Path((project, port, path)): Path<(String, u16, String)>,
    Query(params): Query<HashMap<String, String>>,
    request: Request,
) -> Result<Response, AppError> {
    proxy(app, project, port, path, params, request).await
}

async fn proxy(
    app: Arc<AppState>,
    project: String,
    port: u16,
    path: String,
    params: HashMap<String, String>,
    mut request: Request,
) -> Result<Response, AppError> {
    let from_query = params.get("token").cloned();
    let token = from_query.clone().or_else(|| token_from(request.headers())).unwrap_or_default();
    let identity = ProjectAccess::check(&app, &project, &token)?.identity;
    if from_query.is_some() {
        // Move the token from the address to a cookie, and show the address without it.
        let cookie = format!("{COOKIE}={token}; Path=/preview/{project}/; HttpOnly; SameSite=Strict");
        let query = forwarded_query(request.uri());
        let location = format!("/preview/{project}/{port}/{path}{query}");
        let mut response = Redirect::temporary(&location).into_response();
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        return Ok(response);
    }
    let stream =
        app.exec.connect_port(&identity.project, port).await.map_err(|e| AppError::BadGateway(e.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| AppError::BadGateway(format!("the program on port {port} does not speak HTTP: {e}")))?;
    let shutdown = app.shutdown.clone();
    app.tasks.spawn("preview connection", async move {
        tokio::select! {
            ended = connection.with_upgrades() => if let Err(e) = ended {
                debug!(error = %e, "preview connection ended");
            },
            _ = shutdown.cancelled() => {}
        }
    });
    let upgrade = is_upgrade(request.headers()).then(|| hyper::upgrade::on(&mut request));
    let forward = forwarded_request(request, port, &path)?;
    let mut response = sender
        .send_request(forward)
        .await
        .map_err(|e| AppError::BadGateway(format!("the program on port {port} did not answer: {e}")))?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = upgrade
    {
        let program = hyper::upgrade::on(&mut response);
        let shutdown = app.shutdown.clone();
        app.tasks.spawn("preview upgrade", async move {
            let relay = async {
                match tokio::try_join!(client, program) {
                    Ok((client, program)) => {
                        let (mut client, mut program) = (TokioIo::new(client), TokioIo::new(program));
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut program).await;
                    }
                    Err(e) => warn!(error = %e, "preview upgrade failed"),
                }
            };
            tokio::select! {
                _ = relay => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
    let (mut parts, body) = response.into_parts();
    parts.headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// The token from the preview cookie or a bearer header.
fn token_from(headers: &HeaderMap) -> Option<String> {
    if let Some(bearer) = bearer(headers) {
        return Some(bearer.to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('=').map(str::to_owned))
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
}

/// The query string without the token, with its `?`; empty when nothing is left.
fn forwarded_query(uri: &Uri) -> String {
    let kept: Vec<&str> =
        uri.query().unwrap_or("").split('&').filter(|p| !p.is_empty() && !p.starts_with("token=")).collect();
    if kept.is_empty() { String::new() } else { format!("?{}", kept.join("&")) }
}

/// The request as the program gets it: its own path, no credentials of ours.
fn forwarded_request(request: Request, port: u16, path: &str) -> Result<Request, AppError> {
    let (mut parts, body) = request.into_parts();
    let target = format!("/{path}{}", forwarded_query(&parts.uri));
    parts.uri = target.parse().map_err(|_| AppError::BadRequest("invalid preview path".into()))?;
    parts.version = axum::http::Version::HTTP_11;
    let headers = &mut parts.headers;
    headers.remove(header::AUTHORIZATION);
    let cookies: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.starts_with(&format!("{COOKIE}=")))
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !cookies.is_empty()
        && let Ok(value) = HeaderValue::from_str(&cookies.join("; "))
    {
        headers.insert(header::COOKIE, value);
    }
    if let Ok(host) = HeaderValue::from_str(&format!("localhost:{port}")) {
        headers.insert(header::HOST, host);
    }
    Ok(Request::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_never_forwarded() {
        let request = Request::builder()
            .uri("/preview/p/8000/a/b?x=1&token=secret&y=2")
            .header(header::AUTHORIZATION, "Bearer secret")
            .header(header::COOKIE, "theme=dark; collab_preview=secret; lang=en")
            .body(Body::empty())
            .unwrap();
        let forwarded = forwarded_request(request, 8000, "a/b").unwrap();
        assert_eq!(forwarded.uri(), "/a/b?x=1&y=2");
        assert!(forwarded.headers().get(header::AUTHORIZATION).is_none());
        assert_eq!(forwarded.headers()[header::COOKIE], "theme=dark; lang=en");
        assert_eq!(forwarded.headers()[header::HOST], "localhost:8000");
    }

    #[test]
    fn the_cookie_carries_the_token() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; collab_preview=tok; b=2"));
        assert_eq!(token_from(&headers).as_deref(), Some("tok"));
    }
}
