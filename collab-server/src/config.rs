//! Command-line and environment configuration: every flag also reads a `COLLAB_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "collab", version, about = "Real-time collaboration server for CRDT projects")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the sync endpoints, the web front end, /healthz and /metrics.
    Serve(Box<Config>),
    /// Print a signed access token for scripts and tests.
    Token(TokenArgs),
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on; port 0 picks a free port (the chosen one is printed).
    #[arg(long, env = "COLLAB_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory for the SQLite database and the token signing secret.
    #[arg(long, env = "COLLAB_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Document store URL (`sqlite://...` or `postgres://...`); default: SQLite in the data directory.
    #[arg(long, env = "COLLAB_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Redis URL (`redis://host:port`) of the cluster bus: nodes sharing it (and one
    /// `--database-url`) serve the same documents. Without it the node runs alone.
    #[arg(long, env = "COLLAB_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Directory of the built web front end, served at `/`.
    #[arg(long, env = "COLLAB_WEB_DIR", default_value = "web/dist")]
    pub web_dir: PathBuf,
    /// Development only: accept connections without a token, as editors of any project.
    #[arg(long, env = "COLLAB_ALLOW_ANONYMOUS", default_value_t = false)]
    pub allow_anonymous: bool,
    /// Create the `demo` project if it does not exist and print URLs to open it.
    #[arg(long, env = "COLLAB_DEMO", default_value_t = false)]
    pub demo: bool,
    /// Seconds between automatic checkpoints of projects that changed since the last one; 0 turns
    /// them off.
    #[arg(long, env = "COLLAB_AUTO_CHECKPOINT_INTERVAL", value_parser = parse_secs, default_value = "600")]
    pub auto_checkpoint_interval: Duration,
    /// Automatic checkpoints kept per project (older ones are deleted; named ones never are).
    #[arg(long, env = "COLLAB_AUTO_CHECKPOINTS_KEPT", default_value_t = 20)]
    pub auto_checkpoints_kept: usize,
    /// Where runs and terminals execute: `none` (the exec channel is off), `local`
    /// (bubblewrap on this machine) or `docker` (a container per project).
    #[arg(long, env = "COLLAB_SANDBOX", value_enum, default_value = "none")]
    pub sandbox: SandboxKind,
    /// Folder of the projects' workspaces (the files runs see); default: `workspaces` in the
    /// data directory.
    #[arg(long, env = "COLLAB_WORKSPACES_DIR")]
    pub workspaces_dir: Option<PathBuf>,
    /// Seconds a project's runs-and-terminals session stays after its last exec peer left, when
    /// nothing runs in it.
    #[arg(long, env = "COLLAB_EXEC_IDLE", value_parser = parse_secs, default_value = "600")]
    pub exec_idle: Duration,
    /// Seconds after its last run or terminal a project's Docker container is stopped (it starts
    /// again on the next run).
    #[arg(long, env = "COLLAB_SANDBOX_IDLE", value_parser = parse_secs, default_value = "900")]
    pub sandbox_idle: Duration,
    /// Seconds one message to an exec peer may take to leave before the peer counts as stuck and
    /// is disconnected (runs and terminals never wait for it).
    #[arg(long, env = "COLLAB_EXEC_SEND_TIMEOUT", value_parser = parse_secs, default_value = "10")]
    pub exec_send_timeout: Duration,
    /// Seconds a node's hold on a project's sandbox lasts without renewal (cluster mode): after
    /// a node dies, another takes the project's runs and terminals over this much later.
    #[arg(long, env = "COLLAB_EXEC_LEASE", value_parser = parse_secs, default_value = "10")]
    pub exec_lease: Duration,
    /// Address of the preview listener, which serves only `/preview/{project}/{port}/...` (the
    /// programs running in projects' sandboxes) from an origin of its own; port 0 picks a free
    /// port. Without it there are no previews.
    #[arg(long, env = "COLLAB_PREVIEW_LISTEN")]
    pub preview_listen: Option<SocketAddr>,
    /// The preview listener's public URL (`http://localhost:8081`), which the IDE links to. Its
    /// host name should differ from the IDE's (cookies ignore ports); a `{project}` in it
    /// (`http://{project}.localhost:8081`) gives each project a host, and so an origin, of its
    /// own, and a request must then come for its project's host. Default: `http://` and the
    /// bound preview address, with `localhost` for a loopback one.
    #[arg(long, env = "COLLAB_PREVIEW_URL")]
    pub preview_url: Option<String>,
    /// Exec sockets (`/exec/{project}`) one user may have open on this node at once, over all
    /// projects; one more is refused with an error message and 1013.
    #[arg(long, env = "COLLAB_EXEC_SOCKETS_PER_USER", default_value_t = 16)]
    pub exec_sockets_per_user: usize,
    #[command(flatten)]
    pub limits: Limits,
}

/// Limits and timings. Defaults suit an interactive editor; tests tighten them.
#[derive(Debug, Clone, Args)]
pub struct Limits {
    /// Largest accepted WebSocket message, in bytes (larger ones close the socket with 1009).
    #[arg(long, env = "COLLAB_MAX_MESSAGE_SIZE", default_value_t = 8 << 20)]
    pub max_message_size: usize,
    /// Frames queued for one client before it counts as too slow and is disconnected (1013).
    #[arg(long, env = "COLLAB_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,
    /// Bytes queued for one client before it counts as too slow and is disconnected (1013); one
    /// frame larger than this still goes out when nothing else waits.
    #[arg(long, env = "COLLAB_OUTBOUND_QUEUE_BYTES", default_value_t = 32 << 20)]
    pub outbound_queue_bytes: usize,
    /// Sustained messages per second a connection may send, counted inside frames and weighed by
    /// the work they ask for (a sync step 1 counts 256, an awareness query 64, anything else 1;
    /// see `sync_core::cost`); bursts use --rate-burst. Excess is throttled (reading pauses),
    /// never dropped. 0 disables the limit. The default is far above what a script typing or
    /// pasting through y-websocket sends (one message per transaction).
    #[arg(long, env = "COLLAB_RATE_MESSAGES", default_value_t = 10_000)]
    pub rate_messages: u32,
    /// Sustained bytes per second a connection may send. 0 disables the limit.
    #[arg(long, env = "COLLAB_RATE_BYTES", default_value_t = 4 << 20)]
    pub rate_bytes: u32,
    /// Burst allowance of the message rate limit, in messages as --rate-messages weighs them (the
    /// byte burst is --max-message-size).
    #[arg(long, env = "COLLAB_RATE_BURST", default_value_t = 50_000)]
    pub rate_burst: u32,
    /// Awareness client ids one connection may speak for in one document; an awareness message
    /// past it closes the connection (1007).
    #[arg(long, env = "COLLAB_MAX_AWARENESS_CLIENTS", default_value_t = 16)]
    pub max_awareness_clients: usize,
    /// New WebSocket connections per second allowed from one IP address (burst: 10x). 0 disables.
    #[arg(long, env = "COLLAB_CONNECT_RATE", default_value_t = 50)]
    pub connect_rate: u32,
    /// Open connections (HTTP and WebSocket) from one IP address; more are closed on accept.
    /// Behind a proxy every client shares the proxy's address: raise it there.
    #[arg(long, env = "COLLAB_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    pub max_connections_per_ip: usize,
    /// Open connections in total; more are closed on accept. 0 (the default): seven eighths of
    /// the open-file limit, so the store and the sandboxes keep descriptors to work with.
    #[arg(long, env = "COLLAB_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,
    /// Seconds a connection may take to send its first byte and then a whole request head;
    /// a connection that sends nothing is closed after it.
    #[arg(long, env = "COLLAB_HEADER_TIMEOUT", value_parser = parse_secs, default_value = "10")]
    pub header_timeout: Duration,
    /// Documents one multiplexed socket may have open at once.
    #[arg(long, env = "COLLAB_MAX_DOCS_PER_SOCKET", default_value_t = 256)]
    pub max_docs_per_socket: usize,
    /// Messages a multiplexed socket may send for documents it has not authenticated yet.
    #[arg(long, env = "COLLAB_PREAUTH_MESSAGES", default_value_t = 64)]
    pub preauth_messages: usize,
    /// Bytes a multiplexed socket may send for documents it has not authenticated yet.
    #[arg(long, env = "COLLAB_PREAUTH_BYTES", default_value_t = 1 << 20)]
    pub preauth_bytes: usize,
    /// Seconds a multiplexed socket may stay open without any authenticated document.
    #[arg(long, env = "COLLAB_AUTH_TIMEOUT", value_parser = parse_secs, default_value = "30")]
    pub auth_timeout: Duration,
    /// Seconds between server pings.
    #[arg(long, env = "COLLAB_PING_INTERVAL", value_parser = parse_secs, default_value = "15")]
    pub ping_interval: Duration,
    /// Seconds without any frame from a client before its connection is closed as dead.
    #[arg(long, env = "COLLAB_IDLE_TIMEOUT", value_parser = parse_secs, default_value = "60")]
    pub idle_timeout: Duration,
    /// Seconds after which an awareness state that was not renewed is removed.
    #[arg(long, env = "COLLAB_AWARENESS_TIMEOUT", value_parser = parse_secs, default_value = "30")]
    pub awareness_timeout: Duration,
    /// Seconds a document stays loaded after its last peer leaves.
    #[arg(long, env = "COLLAB_UNLOAD_DELAY", value_parser = parse_secs, default_value = "10")]
    pub unload_delay: Duration,
    /// Bytes of applied but unsaved updates one document may hold while the store is unreachable;
    /// past it, new edits are refused (the connection closes with 1013) until the store catches up.
    #[arg(long, env = "COLLAB_MAX_UNSAVED_BYTES", default_value_t = 64 << 20)]
    pub max_unsaved_bytes: usize,
    /// Most appends (from any documents) written in one store transaction.
    #[arg(long, env = "COLLAB_COMMIT_BATCH", default_value_t = 256)]
    pub commit_batch: usize,
    /// Seconds a group commit waits to gather more appends once one is queued; 0 (the default)
    /// commits at once, gathering whatever queued during the previous commit.
    #[arg(long, env = "COLLAB_COMMIT_INTERVAL", value_parser = parse_secs, default_value = "0")]
    pub commit_interval: Duration,
    /// Seconds between state comparisons of a document with the other nodes that serve it,
    /// repairing anything the bus lost (cluster mode only).
    #[arg(long, env = "COLLAB_REPAIR_INTERVAL", value_parser = parse_secs, default_value = "2")]
    pub repair_interval: Duration,
    /// Logged updates of a document before they are merged into its snapshot.
    #[arg(long, env = "COLLAB_COMPACT_THRESHOLD", default_value_t = 500)]
    pub compact_threshold: u64,
}

/// Which sandbox runs a node's programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxKind {
    /// No runs or terminals: the exec channel answers 503.
    None,
    /// bubblewrap on this machine (the embedded default).
    Local,
    /// A Docker container per project.
    Docker,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Directory holding the signing secret (the same as `collab serve --data-dir`).
    #[arg(long, env = "COLLAB_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Project the token covers.
    #[arg(long)]
    pub project: String,
    /// `editor` or `viewer`.
    #[arg(long, default_value = "editor")]
    pub role: String,
    /// User id.
    #[arg(long)]
    pub user: String,
    /// Display name (defaults to the user id).
    #[arg(long)]
    pub name: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, value_parser = parse_secs, default_value = "86400")]
    pub ttl: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("expected a number of seconds, got {s:?}"))
}

impl Config {
    /// A configuration for tests and embedding: loopback, port 0, the given data directory.
    pub fn for_data_dir(data_dir: PathBuf) -> Config {
        let cli = Cli::parse_from(["collab", "serve", "--listen", "127.0.0.1:0"]);
        let Command::Serve(mut config) = cli.command else { unreachable!("parsed a serve command") };
        config.data_dir = data_dir;
        *config
    }
}
