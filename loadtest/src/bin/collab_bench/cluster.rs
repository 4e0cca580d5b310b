//! The classroom load on one lone node and on two nodes joined by Redis: what the Redis hop costs
//! in latency and in CPU per delivered update. Peers of every room alternate between the two
//! nodes, so most deliveries cross the bus; latency is split by whether sender and receiver sit
//! on the same node.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use loadtest::classroom::{self, Classroom, Report};
use loadtest::server::{Programs, ServerProcess, usage};
use loadtest::target::{Kind, Target};

/// A private redis-server, pinned to the servers' core; killed on drop.
struct Redis {
    child: Child,
    url: String,
}

impl Redis {
    fn start(program: &str, core: Option<usize>) -> anyhow::Result<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &core.unwrap_or(0).to_string(), program]);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        let child =
            cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().with_context(|| format!("starting {program}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not listen within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Redis { child, url: format!("redis://127.0.0.1:{port}") })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One run's figures.
#[derive(Debug, Clone)]
struct Run {
    delivered_per_s: f64,
    same: (f64, f64),
    cross: (f64, f64),
    /// Cross-node p99 minus same-node p99 of the same run: the Redis hop, with the core sharing
    /// of the two nodes and Redis the same on both sides.
    hop_p99: f64,
    /// CPU µs per update delivered to each node's peers.
    node_cpu_us: Vec<f64>,
    /// Redis CPU µs per delivered update (two-node runs).
    redis_cpu_us: Option<f64>,
    lost: u64,
    converged: bool,
}

fn figures(report: &Report, redis_cpu: Option<f64>) -> Run {
    Run {
        delivered_per_s: report.delivered_per_second(),
        same: (report.same_node.ms(0.5), report.same_node.ms(0.99)),
        cross: (report.cross_node.ms(0.5), report.cross_node.ms(0.99)),
        hop_p99: if report.cross_node.is_empty() {
            0.0
        } else {
            report.cross_node.ms(0.99) - report.same_node.ms(0.99)
        },
        node_cpu_us: report.nodes.iter().map(|n| n.cpu_us_per_delivery()).collect(),
        redis_cpu_us: redis_cpu.map(|s| s * 1e6 / report.deliveries.max(1) as f64),
        lost: report.lost(),
        converged: report.converged,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn summary(runs: &[Run]) -> Run {
    let m = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let nodes = runs[0].node_cpu_us.len();
    Run {
        delivered_per_s: m(&|r| r.delivered_per_s),
        same: (m(&|r| r.same.0), m(&|r| r.same.1)),
        cross: (m(&|r| r.cross.0), m(&|r| r.cross.1)),
        hop_p99: m(&|r| r.hop_p99),
        node_cpu_us: (0..nodes).map(|i| m(&|r| r.node_cpu_us[i])).collect(),
        redis_cpu_us: runs[0].redis_cpu_us.map(|_| m(&|r| r.redis_cpu_us.unwrap_or(0.0))),
        lost: runs.iter().map(|r| r.lost).sum(),
        converged: runs.iter().all(|r| r.converged),
    }
}

fn row(label: &str, r: &Run) -> String {
    let ms = |(p50, p99): (f64, f64)| if p99 == 0.0 { "—".to_owned() } else { format!("{p50:.2} / {p99:.2}") };
    let cpu: Vec<String> = r.node_cpu_us.iter().map(|c| format!("{c:.1}")).collect();
    let redis = r.redis_cpu_us.map_or("—".to_owned(), |c| format!("{c:.1}"));
    let lost = if r.converged && r.lost == 0 { "0".to_owned() } else { format!("**{} lost**", r.lost) };
    format!(
        "| {label} | {:.0} | {} | {} | {} | {redis} | {lost} |",
        r.delivered_per_s,
        ms(r.same),
        ms(r.cross),
        cpu.join(" / ")
    )
}

pub async fn cluster(
    programs: &Programs,
    redis_server: &str,
    database_url: &str,
    runs: usize,
    quick: bool,
) -> anyhow::Result<()> {
    let (rooms, students, seconds) = if quick { (1, 10, 3) } else { (4, 35, 15) };
    // Documents persist in the shared database between invocations: a fresh prefix each time.
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() % 1_000_000;
    println!(
        "## Cluster: {rooms} rooms of 1 teacher + {students} students at 5-9 keystrokes/s, one node against two\n\n\
         Nodes and Redis pinned to core {:?}, generator on the other core; PostgreSQL store; {runs} run(s), medians.\n",
        programs.core
    );
    let mut lone = Vec::new();
    let mut pair = Vec::new();
    for round in 0..runs {
        let mut scenario =
            Classroom::with_students(Target::new(Kind::Collab, ""), rooms, students, Duration::from_secs(seconds));
        scenario.seed = round as u64 + 1;

        let server = ServerProcess::start(Kind::Collab, programs, &["--database-url", database_url])?;
        scenario.prefix = format!("k{nonce}l{round}r");
        scenario.target = server.target.clone();
        scenario.server_pid = Some(server.pid());
        let report = classroom::run(&scenario).await?;
        drop(server);
        let run = figures(&report, None);
        eprintln!("  lone node round {round}: p99 {:.2} ms, {:.2} µs CPU/update", run.same.1, run.node_cpu_us[0]);
        lone.push(run);

        let redis = Redis::start(redis_server, programs.core)?;
        let args = ["--database-url", database_url, "--redis-url", &redis.url];
        let a = ServerProcess::start(Kind::Collab, programs, &args)?;
        let b = ServerProcess::start(Kind::Collab, programs, &args)?;
        scenario.prefix = format!("k{nonce}p{round}r");
        scenario.target = a.target.clone();
        scenario.server_pid = Some(a.pid());
        scenario.more_nodes = vec![(b.target.clone(), b.pid())];
        let redis_before = usage(redis.child.id())?.cpu_seconds;
        let report = classroom::run(&scenario).await?;
        let redis_cpu = usage(redis.child.id())?.cpu_seconds - redis_before;
        let run = figures(&report, Some(redis_cpu));
        eprintln!(
            "  two nodes round {round}: same-node p99 {:.2} ms, cross-node p99 {:.2} ms, CPU/update {:.2?} µs",
            run.same.1, run.cross.1, run.node_cpu_us
        );
        pair.push(run);
    }
    let (lone, pair) = (summary(&lone), summary(&pair));
    println!(
        "| setup | delivered updates/s | same-node p50 / p99 (ms) | cross-node p50 / p99 (ms) | CPU per delivered update, per node (µs) | Redis CPU per delivered update (µs) | lost |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!("{}", row("one node, no Redis", &lone));
    println!("{}", row("two nodes over Redis", &pair));
    let worst_cpu = pair.node_cpu_us.iter().copied().fold(0.0, f64::max);
    println!(
        "\nThe Redis hop adds {:+.2} ms to p99 within a cluster run (median of cross-node p99 − same-node p99) and \
         {:+.2} ms against the lone node (median cross-node p99 − median lone p99); target ≤ 2 ms. The busier node \
         spends {:.2}× the CPU per delivered update of the lone node (target ≤ 1.5×).",
        pair.hop_p99,
        pair.cross.1 - lone.same.1,
        worst_cpu / lone.node_cpu_us[0].max(1e-9)
    );
    Ok(())
}
