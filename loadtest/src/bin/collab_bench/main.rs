//! `collab-bench`: the benchmark driver `cargo xtask bench` runs. `load` measures document
//! loading and edit application; `compare` runs every scenario against our server and the
//! reference Yjs servers side by side; `soak` runs rooms coming and going against ours for a
//! long time. Results are printed as the Markdown tables BENCHMARKS.md records, plots written
//! as SVG.

mod cluster;
mod compare;
mod load;
mod soak;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use std::time::Duration;

use loadtest::classroom::Classroom;
use loadtest::server::Programs;
use loadtest::target::{Kind, Target};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of the collaboration engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Document loading from SQLite (and each DATABASE_URL given) and edit application costs.
    Load { database_urls: Vec<String> },
    /// Every scenario against our server and the reference servers, alternating runs.
    Compare {
        #[command(flatten)]
        programs: ProgramArgs,
        /// Runs of each measurement; figures are medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// A few seconds per scenario instead of the full run (to try the command out).
        #[arg(long)]
        quick: bool,
        /// Where the SVG plots go.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// Rooms of typists against a server that is already running (for profiling it).
    Rooms {
        /// `ws://host:port` of a server accepting token-less peers.
        #[arg(long)]
        url: String,
        /// collab, collab-mux, y-websocket or hocuspocus.
        #[arg(long, default_value = "collab")]
        kind: String,
        #[arg(long, default_value_t = 5)]
        rooms: usize,
        #[arg(long, default_value_t = 10)]
        typists: usize,
        /// Keystrokes per second per typist.
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// The classroom load on one node and on two nodes joined by a private Redis.
    Cluster {
        #[command(flatten)]
        programs: ProgramArgs,
        /// PostgreSQL both nodes share.
        #[arg(long)]
        database_url: String,
        #[arg(long, default_value = "/usr/bin/redis-server")]
        redis_server: String,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        quick: bool,
    },
    /// Classroom rooms coming and going against our server, sampling its memory.
    Soak {
        #[command(flatten)]
        programs: ProgramArgs,
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct ProgramArgs {
    /// Our `collab` binary.
    #[arg(long)]
    collab: PathBuf,
    /// `loadtest/servers`, with `npm ci` done.
    #[arg(long, default_value = "loadtest/servers")]
    reference: PathBuf,
    /// The core servers are pinned to; run the generator on another (`taskset -c 1`).
    #[arg(long, default_value_t = 0)]
    core: usize,
}

impl ProgramArgs {
    fn programs(&self) -> Programs {
        Programs { collab: self.collab.clone(), reference: self.reference.clone(), core: Some(self.core) }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Thousands of peers are thousands of sockets.
    rlimit::increase_nofile_limit(u64::MAX)?;
    match Cli::parse().command {
        Command::Load { database_urls } => load::load(&database_urls).await,
        Command::Compare { programs, runs, quick, out } => {
            std::fs::create_dir_all(&out)?;
            compare::compare(&programs.programs(), runs.max(1), quick, &out).await
        }
        Command::Rooms { url, kind, rooms, typists, rate, seconds } => {
            let kind = Kind::from_slug(&kind).ok_or_else(|| anyhow::anyhow!("unknown server kind {kind}"))?;
            let mut scenario =
                Classroom::hot_document(Target::new(kind, url), typists, rate, Duration::from_secs_f64(seconds));
            scenario.rooms = rooms;
            let report = loadtest::classroom::run(&scenario).await?;
            println!(
                "{} peers, {} keystrokes, {} deliveries ({:.0}/s), latency p50/p90/p99/max {} ms, lost {}, converged {}",
                report.peers,
                report.edits,
                report.deliveries,
                report.delivered_per_second(),
                report.latency.summary(),
                report.lost(),
                report.converged
            );
            Ok(())
        }
        Command::Cluster { programs, database_url, redis_server, runs, quick } => {
            cluster::cluster(&programs.programs(), &redis_server, &database_url, runs.max(1), quick).await
        }
        Command::Soak { programs, minutes, out } => {
            std::fs::create_dir_all(&out)?;
            soak::soak(&programs.programs(), minutes, &out).await
        }
    }
}
