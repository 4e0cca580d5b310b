//! `collab-bridge`: mirrors one project of a collab server into a workspace folder, both ways.
//!
//! ```sh
//! collab-bridge --server ws://127.0.0.1:8080 --project demo \
//!     --token "$(collab token --project demo --user exec-bridge --name 'Run bridge')" --workspace ./ws
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use exec_bridge::mirror::Mirror;
use exec_bridge::peer::{self, BridgeConfig};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "collab-bridge", about = "Mirror a collab project into a workspace folder, both ways")]
struct Cli {
    /// `ws://host:port` of the collab server.
    #[arg(long, env = "COLLAB_BRIDGE_SERVER")]
    server: String,
    #[arg(long, env = "COLLAB_BRIDGE_PROJECT")]
    project: String,
    /// An editor token for the project, issued to the bridge (`collab token --user exec-bridge`).
    #[arg(long, env = "COLLAB_BRIDGE_TOKEN", hide_env_values = true)]
    token: String,
    /// The folder the project's files are written to.
    #[arg(long, env = "COLLAB_BRIDGE_WORKSPACE")]
    workspace: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.workspace)?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    // A lost connection restarts the bridge with the same mirror, so files written meanwhile
    // merge into the documents when it is back.
    let mut mirror = Mirror::new();
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let config = BridgeConfig::new(&cli.server, &cli.project, &cli.token, cli.workspace.clone());
        match peer::run(config, &mut mirror, shutdown.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "bridge stopped; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    Ok(())
}
