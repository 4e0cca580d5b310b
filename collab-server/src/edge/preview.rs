//! Live previews: `/preview/{project}/{port}/...` proxies HTTP and WebSocket traffic to a program
//! listening on `port` in the project's sandbox, on a listener of its own (`--preview-listen`).
//!
//! A preview is a program the project's members wrote. It is served from its own origin, never
//! the IDE's: its scripts cannot read the IDE's storage or call the IDE's API with the user's
//! credentials, and its cookies cannot land on the IDE's pages (the preview URL names another
//! host, since cookies ignore ports). The IDE's listener only redirects `/preview/...` there.
//!
//! Only project members get through: the IDE links to the preview origin with `?token=`; that
//! first request moves the token into an HttpOnly, SameSite=Lax cookie for `/preview/{project}/`
//! on the preview origin and redirects to the address without it, so the page's own relative
//! links, scripts, fetches and sockets carry it. The token never reaches the program, and the
//! program's response cannot reach past its own path ([`crate::edge::preview_rules`]).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use hyper_util::rt::TokioIo;
use sync_core::DocName;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::auth::Identity;
use crate::config::Config;
use crate::edge::AppState;
use crate::edge::preview_rules::{self as rules, COOKIE};

/// Where previews are served: the preview listener's address and the URL the IDE links to.
#[derive(Debug, Clone)]
pub struct Origin {
    pub addr: SocketAddr,
    /// `http://host:port`, without a trailing slash; a `{project}` in it gives every project a
    /// host name (and so an origin) of its own.
    pub url: String,
}

impl Origin {
    /// The public URL of `project`'s previews.
    pub fn url_for(&self, project: &str) -> String {
        self.url.replace("{project}", project)
    }

    /// The `Host` a request for `project`'s previews must carry, when projects have host names
    /// of their own (lowercase `host[:port]`).
    fn host_for(&self, project: &str) -> Option<String> {
        if !self.url.contains("{project}") {
            return None;
        }
        let url = self.url_for(project);
        let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
        Some(after_scheme.split('/').next().unwrap_or("").to_ascii_lowercase())
    }
}

/// Binds `--preview-listen`, when it is given.
pub async fn bind(config: &Config) -> anyhow::Result<Option<(TcpListener, Origin)>> {
    let Some(listen) = config.preview_listen else { return Ok(None) };
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding the preview listener {listen}"))?;
    let addr = listener.local_addr()?;
    // A loopback default is named `localhost`: another host than the IDE's `127.0.0.1`.
    let default = || {
        if addr.ip().is_loopback() { format!("http://localhost:{}", addr.port()) } else { format!("http://{addr}") }
    };
    let url = config.preview_url.clone().unwrap_or_else(default);
    let url = url.trim_end_matches('/').to_owned();
    if !url.contains("{project}") && url.contains(&format!("//{}:", config.listen.ip())) {
        warn!(%url, "the preview URL names the IDE's host: a preview's cookies reach the IDE (cookies ignore ports)");
    }
    Ok(Some((listener, Origin { addr, url })))
}

/// Serves the preview origin until shutdown, with the same connection bounds and deadlines as
/// the IDE's listener.
pub async fn serve(listener: TcpListener, app: Arc<AppState>) {
    let l = &app.config.limits;
    let limits = super::listen::ConnLimits::new(l.max_connections_per_ip, l.max_connections, l.header_timeout);
    let stop = app.shutdown.clone();
    if let Err(e) = super::listen::serve(listener, router(app), limits, stop).await {
        warn!(error = %e, "the preview listener stopped");
    }
}

/// The preview origin's routes: previews, and nothing else.
pub fn router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/preview/{project}/{port}", axum::routing::get(bare))
        .route("/preview/{project}/{port}/", axum::routing::any(proxy))
        .route("/preview/{project}/{port}/{*path}", axum::routing::any(proxy))
        .fallback(|| async { refusal(StatusCode::NOT_FOUND, NOT_FOUND) })
        .with_state(app)
}

/// The IDE listener's `/preview/...`: the same address on the preview origin.
pub async fn elsewhere(State(app): State<Arc<AppState>>, request: Request) -> Response {
    match &app.preview {
        Some(origin) => {
            let Some((project, _, _)) = split_path(request.uri().path()) else {
                return refusal(StatusCode::NOT_FOUND, NOT_FOUND);
            };
            let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
            Redirect::temporary(&format!("{}{target}", origin.url_for(project.as_str()))).into_response()
        }
        None => refusal(StatusCode::NOT_FOUND, "previews are off on this server\n"),
    }
}

/// What the IDE's page needs to know about this server: `GET /api/config` (wire type; the
/// page reads it as `web/src/generated/client-config.ts`).
#[derive(Debug, serde::Serialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub struct ClientConfig {
    /// Where previews are served (`http://host:port`, no trailing slash; a `{project}` in it
    /// stands for the project's name); `null` when they are off. A preview's address is
    /// `{preview_url}/preview/{project}/{port}/?token=...`.
    pub preview_url: Option<String>,
}

/// `GET /api/config` (no token needed: nothing in it is secret).
pub async fn client_config(State(app): State<Arc<AppState>>) -> axum::Json<ClientConfig> {
    axum::Json(ClientConfig { preview_url: app.preview.as_ref().map(|o| o.url.clone()) })
}

const UNAUTHORIZED: &str = "this preview is for the project's members: open it from the project's page\n";
const NOT_FOUND: &str = "no such preview\n";

/// A refusal with a fixed text; nothing internal reaches the browser.
fn refusal(status: StatusCode, text: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

/// `/preview/{project}/{port}/{rest}` split from a raw path (`rest` still percent-encoded);
/// `rest` is `None` for the bare `/preview/{project}/{port}`.
fn split_path(raw: &str) -> Option<(DocName, u16, Option<&str>)> {
    let (project, after) = raw.strip_prefix("/preview/")?.split_once('/')?;
    let (port, rest) = match after.split_once('/') {
        Some((port, rest)) => (port, Some(rest)),
        None => (after, None),
    };
    let project = DocName::parse(project).ok().filter(|p| p.as_str() == p.project())?;
    Some((project, port.parse().ok()?, rest))
}

/// `GET /preview/{project}/{port}`: the same with a trailing slash, so relative links resolve.
async fn bare(request: Request) -> Response {
    let Some((project, port, None)) = split_path(request.uri().path()) else {
        return refusal(StatusCode::NOT_FOUND, NOT_FOUND);
    };
    let query = request.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    Redirect::temporary(&format!("/preview/{project}/{port}/{query}")).into_response()
}

/// The first of `candidates` that admits its bearer to `project`, with who that is.
fn admit(app: &AppState, project: &DocName, candidates: &[String]) -> Option<(String, Identity)> {
    let found = candidates.iter().find_map(|t| app.auth.authorize(t, project).ok().map(|i| (t.clone(), i)));
    if found.is_none() {
        app.metrics.auth_failures.inc();
    }
    found
}

async fn proxy(State(app): State<Arc<AppState>>, mut request: Request) -> Response {
    let Some((project, port, Some(rest))) = split_path(request.uri().path()) else {
        return refusal(StatusCode::NOT_FOUND, NOT_FOUND);
    };
    let wanted = app.preview.as_ref().and_then(|origin| origin.host_for(project.as_str()));
    if let Some(wanted) = wanted {
        // Each project has a host of its own: another project's host is not its origin.
        let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_ascii_lowercase);
        if host.as_deref() != Some(wanted.as_str()) {
            return refusal(StatusCode::NOT_FOUND, NOT_FOUND);
        }
    }
    let rest = rest.to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let from_query = rules::query_tokens(&query);
    if !from_query.is_empty() {
        let Some((token, _)) = admit(&app, &project, &from_query) else {
            return refusal(StatusCode::UNAUTHORIZED, UNAUTHORIZED);
        };
        // Move the token from the address to a cookie, and show the address without it.
        let cookie = format!("{COOKIE}={token}; Path=/preview/{project}/; HttpOnly; SameSite=Lax");
        let location = format!("/preview/{project}/{port}/{rest}{}", rules::forwarded_query(&query, &[&token]));
        let mut response = Redirect::temporary(&location).into_response();
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        return response;
    }
    let mut candidates: Vec<String> =
        crate::edge::access::bearer(request.headers()).map(str::to_owned).into_iter().collect();
    candidates.extend(rules::cookie_tokens(request.headers()));
    if candidates.is_empty() {
        // No credentials at all: only a server that admits anonymous users lets this through.
        candidates.push(String::new());
    }
    let Some((token, identity)) = admit(&app, &project, &candidates) else {
        return refusal(StatusCode::UNAUTHORIZED, UNAUTHORIZED);
    };
    let unreachable = || {
        let text = format!("nothing answers HTTP on port {port} in the project's sandbox\n");
        (StatusCode::BAD_GATEWAY, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
    };
    let stream = match app.exec.connect_port(&identity.project, port).await {
        Ok(stream) => stream,
        Err(e) => {
            debug!(project = %project, port, error = %e, "preview port unreachable");
            return unreachable();
        }
    };
    let (mut sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(e) => {
            debug!(project = %project, port, error = %e, "preview handshake failed");
            return unreachable();
        }
    };
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
    let Some(forward) = forwarded_request(request, port, &rest, &query, &token) else {
        return refusal(StatusCode::NOT_FOUND, NOT_FOUND);
    };
    let mut response = match sender.send_request(forward).await {
        Ok(response) => response,
        Err(e) => {
            debug!(project = %project, port, error = %e, "preview request failed");
            return unreachable();
        }
    };
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
                    Err(e) => info!(error = %e, "preview upgrade failed"),
                }
            };
            tokio::select! {
                _ = relay => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
    let (mut parts, body) = response.into_parts();
    rules::filter_response(&mut parts.headers, &format!("/preview/{project}/{port}/"));
    Response::from_parts(parts, Body::new(body))
}

fn is_upgrade(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
}

/// The request as the program gets it: its own path, no credentials of ours, no `Referer`.
fn forwarded_request(request: Request, port: u16, rest: &str, query: &str, token: &str) -> Option<Request> {
    let (mut parts, body) = request.into_parts();
    let target = format!("/{rest}{}", rules::forwarded_query(query, &[token]));
    parts.uri = target.parse().ok()?;
    parts.version = axum::http::Version::HTTP_11;
    let cookie = rules::forwarded_cookie(&parts.headers, &[token]);
    let headers = &mut parts.headers;
    for name in rules::REQUEST_DROPPED {
        headers.remove(name);
    }
    headers.remove(header::COOKIE);
    if let Some(cookie) = cookie {
        headers.insert(header::COOKIE, cookie);
    }
    if let Ok(host) = HeaderValue::from_str(&format!("localhost:{port}")) {
        headers.insert(header::HOST, host);
    }
    Some(Request::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TypeScript the web page reads `/api/config` with is rendered from [`ClientConfig`]; a
    /// difference means the committed file is stale (`UPDATE_GENERATED=1` rewrites it).
    #[test]
    fn generated_typescript_is_current() {
        use ts_rs::TS;
        let cfg = ts_rs::Config::new();
        let mut text = String::from(
            "// What GET /api/config answers, generated from collab-server/src/edge/preview.rs; do not edit.\n\
             // Regenerate with: UPDATE_GENERATED=1 cargo test -p collab-server --lib generated_typescript\n\n",
        );
        text.push_str(&ClientConfig::docs().unwrap_or_default());
        text.push_str("export ");
        text.push_str(&ClientConfig::decl(&cfg));
        text.push('\n');
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/src/generated/client-config.ts");
        if std::env::var_os("UPDATE_GENERATED").is_some() {
            std::fs::write(&path, &text).expect("written");
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(committed == text, "{} is stale; regenerate it with UPDATE_GENERATED=1\n{text}", path.display());
    }

    #[test]
    fn the_token_is_never_forwarded() {
        let request = Request::builder()
            .uri("/preview/p/8000/a/b?x=1&%74oken=secret&y=2")
            .header(header::AUTHORIZATION, "Bearer secret")
            .header(header::REFERER, "http://localhost:8081/preview/p/8000/?token=secret")
            .header(header::COOKIE, "theme=dark; collab_preview=secret; lang=en")
            .body(Body::empty())
            .unwrap();
        let query = request.uri().query().unwrap_or("").to_owned();
        let forwarded = forwarded_request(request, 8000, "a/b", &query, "secret").unwrap();
        assert_eq!(forwarded.uri(), "/a/b?x=1&y=2");
        assert!(forwarded.headers().get(header::AUTHORIZATION).is_none());
        assert!(forwarded.headers().get(header::REFERER).is_none());
        assert_eq!(forwarded.headers()[header::COOKIE], "theme=dark; lang=en");
        assert_eq!(forwarded.headers()[header::HOST], "localhost:8000");
    }

    #[test]
    fn paths() {
        let split = |raw: &str| split_path(raw).map(|(p, port, rest)| (p.to_string(), port, rest.map(str::to_owned)));
        assert_eq!(split("/preview/p/8000"), Some(("p".into(), 8000, None)));
        assert_eq!(split("/preview/p/8000/"), Some(("p".into(), 8000, Some(String::new()))));
        assert_eq!(split("/preview/p/8000/a%20b/c"), Some(("p".into(), 8000, Some("a%20b/c".into()))));
        assert_eq!(split("/preview/p/99999/"), None);
        assert_eq!(split("/preview/P!/8000/"), None);
    }
}
