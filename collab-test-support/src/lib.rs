//! What the workspace's integration tests share: a server in this process ([`TestServer`]) or
//! as its own `collab serve` process ([`process::ServerProcess`]), a cluster of such processes
//! with the faults a test injects in one line ([`cluster::Cluster`]: kill or restart a node,
//! cut a node off from Redis or the store, stall the store), a TCP link a test can cut
//! ([`net::CutProxy`]), private Redis and PostgreSQL servers, one HTTP client, tokens, and
//! waits on conditions with a deadline instead of fixed sleeps.

pub mod cluster;
pub mod http;
pub mod metrics;
pub mod net;
pub mod postgres;
pub mod process;
pub mod redis;
pub mod server;
pub mod tokens;
pub mod wait;
pub mod ws;

/// The HAProxy configuration generator `cargo xtask cluster` uses too.
pub use haproxy_config as haproxy;
pub use server::TestServer;
pub use wait::{WAIT, until, until_async};

/// A fixed seed from `TEST_SEED`, or a fresh one; printed so a failing run can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("{test}: seed {seed} (replay with TEST_SEED={seed})");
    seed
}
