//! The `collab` binary: `collab serve` runs the server, `collab token` prints an access token.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use collab_server::auth::{Identity, Keys};
use collab_server::config::{Cli, Command, TokenArgs};
use sync_core::Role;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => serve(*config).await,
        Command::Token(args) => token(&args),
    }
}

async fn serve(config: collab_server::Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    // Every connection is a file descriptor: take the hard limit, not the 1024 soft default.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
    let demo = config.demo;
    let data_dir = config.data_dir.clone();
    let running = collab_server::start(config).await?;
    let base = format!("http://{}", running.addr);
    let mut out = std::io::stdout().lock();
    writeln!(out, "collab listening on {base}")?;
    if let Some(preview) = &running.app.preview {
        writeln!(out, "previews on {}", preview.url)?;
    }
    if demo {
        let keys = Keys::load_or_create(&data_dir)?;
        writeln!(out, "Open the demo project as two people, each in their own tab:")?;
        for (user, name) in [("ada", "Ada"), ("grace", "Grace")] {
            let identity = Identity {
                user: user.into(),
                name: name.into(),
                project: collab_server::demo::PROJECT.into(),
                role: Role::Editor,
            };
            let token = keys.sign(&identity, Duration::from_secs(7 * 86400))?;
            writeln!(out, "  {name}: {base}/?project={}&token={token}", collab_server::demo::PROJECT)?;
        }
    }
    out.flush()?;
    drop(out);
    let app = running.app.clone();
    // SIGINT (Ctrl-C) or SIGTERM (docker stop, systemd, Kubernetes): flush every document, exit.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    running.app.tasks.spawn("signals", async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
            _ = app.shutdown.cancelled() => return,
        }
        tracing::info!("shutting down");
        app.shutdown.cancel();
    });
    running.wait().await
}

fn token(args: &TokenArgs) -> anyhow::Result<()> {
    let role =
        Role::parse(&args.role).with_context(|| format!("--role must be editor or viewer, not {:?}", args.role))?;
    anyhow::ensure!(sync_core::names::is_project_id(&args.project), "--project must match [a-z0-9][a-z0-9_-]{{0,62}}");
    let keys = Keys::load_or_create(&args.data_dir)?;
    let identity = Identity {
        user: args.user.clone(),
        name: args.name.clone().unwrap_or_else(|| args.user.clone()),
        project: args.project.clone(),
        role,
    };
    println!("{}", keys.sign(&identity, args.ttl)?);
    Ok(())
}
