//! `exec-bench`: time from a run request to the first output byte of a Python hello-world, on both
//! sandboxes (cold and warm), against a plain `docker run`, a plain `docker exec` and a plain
//! `bwrap` on the same machine. Prints the Markdown table BENCHMARKS.md records.
//!
//! Needs a running dockerd and the runtime image (`cargo xtask images`); `cargo xtask bench`
//! runs it. `--local-only` measures only the bubblewrap rows, without Docker.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use exec_bridge::run::{Limits, RunEvent};
use exec_bridge::sandbox::docker::{DEFAULT_IMAGE, DockerSandbox, DockerSandboxConfig};
use exec_bridge::sandbox::local::{LocalSandbox, LocalSandboxConfig};
use exec_bridge::sandbox::{Sandbox, SandboxCommand};
use tokio::io::AsyncReadExt;

#[derive(Debug, Parser)]
#[command(name = "exec-bench", about = "Run start latency of the sandboxes")]
struct Cli {
    /// Samples per figure.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Only the bubblewrap rows (the sandbox and plain `bwrap`): needs no dockerd.
    #[arg(long)]
    local_only: bool,
}

const HELLO: &str = "print('hello')";

/// Milliseconds from asking `sandbox` for a run until the first byte of its stdout.
async fn first_byte_via(sandbox: &dyn Sandbox, workspace: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let command = SandboxCommand::new("/usr/bin/python3", ["-c", HELLO]);
    let mut execution = sandbox.start(workspace, &command, &Limits::default()).await?;
    let mut first = None;
    while let Some(event) = execution.events.recv().await {
        match event {
            RunEvent::Output { .. } if first.is_none() => first = Some(started.elapsed()),
            RunEvent::Output { .. } => {}
            RunEvent::Finished(verdict) => anyhow::ensure!(first.is_some(), "no output; verdict {verdict:?}"),
        }
    }
    Ok(first.map(ms).unwrap_or_default())
}

/// Milliseconds until the first byte of a plain command's stdout.
async fn first_byte_of(program: &str, args: &[&str]) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut child =
        tokio::process::Command::new(program).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut byte = [0u8; 1];
    let n = stdout.read(&mut byte).await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(n == 1, "{program} printed nothing");
    child.wait().await?;
    Ok(ms(elapsed))
}

/// Milliseconds to the first output byte of a plain `bwrap` with no limits, `runs` times.
async fn plain_bwrap(runs: usize) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::new();
    for _ in 0..runs {
        let args = ["--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64"];
        let mut all: Vec<&str> = args.to_vec();
        all.extend([
            "--symlink",
            "usr/bin",
            "/bin",
            "--unshare-all",
            "--die-with-parent",
            "/usr/bin/python3",
            "-c",
            HELLO,
        ]);
        samples.push(first_byte_of("bwrap", &all).await?);
    }
    Ok(samples)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn row(label: &str, mut samples: Vec<f64>) -> String {
    samples.sort_by(f64::total_cmp);
    let q = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!("| {label} | {} | {:.1} | {:.1} | {:.1} |", samples.len(), q(0.5), q(0.9), q(1.0))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runs = cli.runs.max(1);
    let dir = tempfile::tempdir()?;
    let workspace = dir.path().join("ws");
    std::fs::create_dir(&workspace)?;
    println!("## Run start: request to first output byte, Python hello-world ({runs} samples each)\n");
    println!("| path | samples | p50 (ms) | p90 (ms) | max (ms) |\n|---|---|---|---|---|");

    let local: Arc<dyn Sandbox> = Arc::new(LocalSandbox::new(LocalSandboxConfig::default())?);
    let mut samples = Vec::new();
    for _ in 0..runs {
        samples.push(first_byte_via(local.as_ref(), &workspace).await?);
    }
    println!("{}", row("bubblewrap sandbox (every run is a fresh sandbox)", samples));
    if cli.local_only {
        println!("{}", row("plain `bwrap` (no limits, no uid drop)", plain_bwrap(runs).await?));
        return Ok(());
    }

    let docker = DockerSandbox::connect(DockerSandboxConfig::default()).await?;
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let ws = dir.path().join(format!("cold{i}"));
        std::fs::create_dir(&ws)?;
        cold.push(first_byte_via(&docker, &ws).await?);
        docker.remove_project(&ws).await?;
    }
    docker.prepare(&workspace).await?;
    for _ in 0..runs {
        warm.push(first_byte_via(&docker, &workspace).await?);
    }
    println!("{}", row("Docker sandbox, cold (creates the project's container)", cold));
    println!("{}", row("Docker sandbox, warm (the resident runner in the running container)", warm));

    let container = DockerSandbox::container_name(&workspace);
    let mut plain_exec = Vec::new();
    for _ in 0..runs {
        plain_exec.push(first_byte_of("docker", &["exec", &container, "/usr/bin/python3", "-c", HELLO]).await?);
    }
    docker.remove_project(&workspace).await?;
    let mut plain_run = Vec::new();
    for _ in 0..runs {
        let args = ["run", "--rm", "--network", "none", DEFAULT_IMAGE, "/usr/bin/python3", "-c", HELLO];
        plain_run.push(first_byte_of("docker", &args).await?);
    }
    println!("{}", row("plain `docker exec` (CLI) into a running container", plain_exec));
    println!("{}", row("plain `docker run --rm` (CLI)", plain_run));
    println!("{}", row("plain `bwrap` (no limits, no uid drop)", plain_bwrap(runs).await?));
    docker.shutdown().await?;
    Ok(())
}
