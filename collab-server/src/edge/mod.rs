//! The HTTP edge, the top layer: the router, [`AppState`], the access extractors, the API
//! handlers, the WebSocket upgrades, the preview proxy handler, `/healthz`, `/metrics` and the
//! web front end. Only this layer speaks HTTP and maps errors to statuses ([`AppError`]).

pub mod access;
pub mod api;
pub mod error;
pub mod listen;
pub mod page_headers;
pub mod preview;
pub mod preview_rules;
pub mod upgrade;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_http::services::{ServeDir, ServeFile};
use tracing::info;

pub use self::error::AppError;
use crate::auth::{Authorizer, Keys};
use crate::config::Config;
use crate::exec::ExecHub;
use crate::metrics::Metrics;
use crate::sync::conn::Connections;
use crate::sync::rooms::Rooms;
use crate::tasks::Tasks;

/// Everything a request handler needs, shared by all of them.
#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    pub keys: Keys,
    pub auth: Authorizer,
    pub rooms: Rooms,
    /// What the sync connections share.
    pub sync: Arc<Connections>,
    pub exec: Arc<ExecHub>,
    pub metrics: Arc<Metrics>,
    pub tasks: Tasks,
    pub shutdown: CancellationToken,
    /// The preview origin (`--preview-listen`), if previews are on.
    pub preview: Option<preview::Origin>,
}

pub fn router(app: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/projects/{project}/export", get(api::export))
        .route("/api/projects/{project}/import", post(api::import))
        .route("/api/projects/{project}/checkpoints", get(api::list_checkpoints).post(api::create_checkpoint))
        .route("/api/projects/{project}/checkpoints/{id}/restore", post(api::restore_checkpoint))
        .route("/api/projects/{project}/checkpoints/{id}/diff", get(api::diff_checkpoint))
        .layer(DefaultBodyLimit::max(api::IMPORT_BODY_LIMIT));
    // Everything that opens a socket or does work for a token shares one per-address rate;
    // `/healthz`, `/metrics`, `/api/config` and the static front end do not.
    let mut limited = Router::new()
        .route("/sync", get(upgrade::mux_upgrade))
        .route("/sync/{*doc}", get(upgrade::yws_upgrade))
        .merge(api)
        .route("/exec/{project}", get(upgrade::exec_upgrade))
        .route("/preview/{*rest}", axum::routing::any(preview::elsewhere));
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
            app.tasks.spawn("rate limiter pruning", prune_rate_limiter(prune, app.shutdown.clone()));
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
        .route("/api/config", get(preview::client_config))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .merge(web)
        .layer(axum::middleware::map_response(page_headers::add))
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
