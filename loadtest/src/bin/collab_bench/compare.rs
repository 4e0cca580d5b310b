//! `collab-bench compare`: the same scenarios against our server and the reference servers, each
//! run on a fresh server process pinned to one core, servers alternating within each round;
//! figures are medians over the rounds, with the p99 range shown so a noisy run shows.

use std::path::Path;
use std::time::Duration;

use loadtest::classroom::{self, Classroom};
use loadtest::plot::{self, Series};
use loadtest::server::{Programs, ServerProcess};
use loadtest::target::Kind;
use loadtest::{idle, replay, storm};

/// What one run of a typing scenario measured.
#[derive(Debug, Clone, Copy)]
struct Measure {
    delivered_per_s: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    cpu_us: f64,
    /// Share of one core the server used while typing.
    busy: f64,
    /// Share of one core the generator used over the same span.
    generator_busy: f64,
    peak_rss_kib: u64,
    peers: usize,
    lost: u64,
    converged: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn range(v: &[f64]) -> (f64, f64) {
    (v.iter().copied().fold(f64::MAX, f64::min), v.iter().copied().fold(0.0, f64::max))
}

/// Medians of a set of runs.
#[derive(Debug, Clone, Copy)]
struct Summary {
    m: Measure,
    p99_range: (f64, f64),
    runs: usize,
    all_converged: bool,
    lost: u64,
}

impl Summary {
    fn of(runs: &[Measure]) -> Summary {
        let med = |f: fn(&Measure) -> f64| median(runs.iter().map(f).collect());
        let p99s: Vec<f64> = runs.iter().map(|m| m.p99).collect();
        Summary {
            m: Measure {
                delivered_per_s: med(|m| m.delivered_per_s),
                p50: med(|m| m.p50),
                p90: med(|m| m.p90),
                p99: med(|m| m.p99),
                max: med(|m| m.max),
                cpu_us: med(|m| m.cpu_us),
                busy: med(|m| m.busy),
                generator_busy: med(|m| m.generator_busy),
                peak_rss_kib: med(|m| m.peak_rss_kib as f64) as u64,
                peers: runs.first().map_or(0, |m| m.peers),
                lost: 0,
                converged: true,
            },
            p99_range: range(&p99s),
            runs: runs.len(),
            all_converged: runs.iter().all(|m| m.converged),
            lost: runs.iter().map(|m| m.lost).sum(),
        }
    }

    /// A run is called noisy when its p99 spread over the runs exceeds half the median.
    fn noisy(&self) -> bool {
        self.runs > 1 && self.p99_range.1 - self.p99_range.0 > 0.5 * self.m.p99
    }

    fn row(&self, label: &str) -> String {
        let m = &self.m;
        format!(
            "| {label} | {:.0} | {:.2} / {:.2} / {:.2} / {:.2} | {:.2}-{:.2}{} | {:.2} | {:.0} % | {:.0} %{} | {:.0} MiB | {} |",
            m.delivered_per_s,
            m.p50,
            m.p90,
            m.p99,
            m.max,
            self.p99_range.0,
            self.p99_range.1,
            if self.noisy() { " (noisy)" } else { "" },
            m.cpu_us,
            m.busy * 100.0,
            m.generator_busy * 100.0,
            if m.generator_busy > 0.9 { " (saturated)" } else { "" },
            m.peak_rss_kib / 1024,
            if self.all_converged && self.lost == 0 { "0".to_owned() } else { format!("**{} lost**", self.lost) },
        )
    }
}

const TABLE_HEAD: &str = "| server | delivered updates/s | latency p50 / p90 / p99 / max (ms) | p99 range (ms) | server CPU per delivered update (µs) | server core busy | generator core busy | server peak RSS | lost |\n|---|---|---|---|---|---|---|---|---|";

/// Runs a typing scenario once against a fresh server of `kind`.
async fn typing_run(kind: Kind, programs: &Programs, scenario: &Classroom) -> anyhow::Result<Measure> {
    let server = ServerProcess::start(kind, programs, &[])?;
    let mut scenario = scenario.clone();
    scenario.target = server.target.clone();
    scenario.server_pid = Some(server.pid());
    let report = classroom::run(&scenario).await?;
    let usage = server.usage()?;
    let cpu = report.server_cpu_seconds.unwrap_or(0.0);
    Ok(Measure {
        delivered_per_s: report.delivered_per_second(),
        p50: report.latency.ms(0.5),
        p90: report.latency.ms(0.9),
        p99: report.latency.ms(0.99),
        max: report.latency.max_ms(),
        cpu_us: report.cpu_us_per_delivery().unwrap_or(0.0),
        busy: cpu / report.seconds,
        generator_busy: report.generator_cpu_seconds / report.seconds,
        peak_rss_kib: usage.peak_rss_kib,
        peers: report.peers,
        lost: report.lost(),
        converged: report.converged,
    })
}

/// Runs `scenario` `runs` times against each kind, alternating kinds within each round.
async fn typing(
    kinds: &[Kind],
    programs: &Programs,
    scenario: &Classroom,
    runs: usize,
) -> anyhow::Result<Vec<Summary>> {
    let mut all: Vec<Vec<Measure>> = vec![Vec::new(); kinds.len()];
    for round in 0..runs {
        for (i, kind) in kinds.iter().enumerate() {
            let mut s = scenario.clone();
            s.seed = round as u64 + 1;
            let m = typing_run(*kind, programs, &s).await?;
            eprintln!(
                "  {} round {round}: {:.0} updates/s, p99 {:.2} ms, {:.2} µs CPU/update",
                kind.slug(),
                m.delivered_per_s,
                m.p99,
                m.cpu_us
            );
            all[i].push(m);
        }
    }
    Ok(all.iter().map(|runs| Summary::of(runs)).collect())
}

fn ratio_line(kinds: &[Kind], summaries: &[Summary]) -> String {
    let ours = summaries[0].m;
    let mut parts = Vec::new();
    for (kind, s) in kinds.iter().zip(summaries).skip(1) {
        if kind.is_ours() {
            continue;
        }
        parts.push(format!(
            "{}: p99 {:.1}×, CPU per update {:.1}× ours",
            kind.slug(),
            s.m.p99 / ours.p99.max(1e-9),
            s.m.cpu_us / ours.cpu_us.max(1e-9)
        ));
    }
    format!("Ratios (theirs ÷ ours, ours = {}): {}.", kinds[0].slug(), parts.join("; "))
}

pub async fn compare(programs: &Programs, runs: usize, quick: bool, out: &Path) -> anyhow::Result<()> {
    let seconds = |full: u64| Duration::from_secs(if quick { 2 } else { full });
    let kinds = [Kind::Collab, Kind::YWebsocket, Kind::Hocuspocus];
    let with_mux = [Kind::Collab, Kind::CollabMux, Kind::YWebsocket, Kind::Hocuspocus];
    let placeholder = loadtest::target::Target::new(Kind::Collab, "");
    println!("Server pinned to core {:?}; generator on the other core. {runs} run(s) per figure.\n", programs.core);

    // Latency against offered load: 100 rooms of 10 typists (10 × 9 deliveries per keystroke).
    let (rooms, rates): (usize, &[f64]) = if quick { (10, &[2.0, 5.0]) } else { (100, &[1.0, 2.5, 5.0, 7.5, 10.0]) };
    println!("## Latency against offered load: {rooms} rooms × 10 typists, each at a steady rate\n");
    println!("{TABLE_HEAD}");
    let mut p50_series: Vec<Series> = kinds.iter().map(|k| Series { name: k.label().into(), points: vec![] }).collect();
    let mut p99_series = p50_series.clone();
    for &rate in rates {
        eprintln!("sweep: {rate} keystrokes/s per typist");
        let mut scenario = Classroom::hot_document(placeholder.clone(), 10, rate, seconds(8));
        scenario.rooms = rooms;
        scenario.prefix = "sweep".into();
        let summaries = typing(&kinds, programs, &scenario, runs).await?;
        for (i, s) in summaries.iter().enumerate() {
            println!("{}", s.row(&format!("{} at {rate}/s per typist", kinds[i].slug())));
            p50_series[i].points.push((s.m.delivered_per_s, s.m.p50));
            p99_series[i].points.push((s.m.delivered_per_s, s.m.p99));
        }
        println!("| {} | | | | | | | | |", ratio_line(&kinds, &summaries));
    }
    for (name, series) in [("p50", &p50_series), ("p99", &p99_series)] {
        let path = out.join(format!("latency-{name}-vs-load.svg"));
        plot::lines(
            &path,
            &format!("{name} propagation latency against delivered load (server on one core)"),
            "delivered updates per second",
            &format!("{name} latency (ms, log scale)"),
            series,
            true,
        )?;
        println!("\nPlot: `{}`", path.display());
    }

    let (class_rooms, students) = if quick { (1, 10) } else { (4, 35) };
    println!("\n## Classroom: {class_rooms} rooms of 1 teacher + {students} students at 5-9 keystrokes/s\n");
    println!("{TABLE_HEAD}");
    let scenario = Classroom::with_students(placeholder.clone(), class_rooms, students, seconds(15));
    let summaries = typing(&with_mux, programs, &scenario, runs).await?;
    for (kind, s) in with_mux.iter().zip(&summaries) {
        println!("{}", s.row(kind.slug()));
    }
    println!("\n{}", ratio_line(&with_mux, &summaries));

    let writers = if quick { 20 } else { 200 };
    println!("\n## Hot document: {writers} writers in one document, 1 keystroke/s each\n");
    println!("{TABLE_HEAD}");
    let scenario = Classroom::hot_document(placeholder.clone(), writers, 1.0, seconds(10));
    let summaries = typing(&with_mux, programs, &scenario, runs).await?;
    for (kind, s) in with_mux.iter().zip(&summaries) {
        println!("{}", s.row(kind.slug()));
    }
    println!("\n{}", ratio_line(&with_mux, &summaries));

    idle_connections(&with_mux, programs, if quick { 500 } else { 10_000 }, runs).await?;
    reconnect_storm(&with_mux, programs, if quick { 5 } else { 100 }, runs).await?;
    traces(&with_mux, programs, quick).await?;
    Ok(())
}

/// Connect p50 and p99 (ms), seconds until all connected, RSS before and after (KiB).
type IdleRow = (f64, f64, f64, f64, f64);

async fn idle_connections(kinds: &[Kind], programs: &Programs, connections: usize, runs: usize) -> anyhow::Result<()> {
    println!("\n## Idle connections: {connections} peers, 10 per document, synced and silent\n");
    println!(
        "| server | connect p50 / p99 (ms) | all connected in (s) | RSS before → after (MiB) | memory per connection (KiB) |\n|---|---|---|---|---|"
    );
    let mut per_conn: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut rows: Vec<Vec<IdleRow>> = vec![Vec::new(); kinds.len()];
    for _ in 0..runs {
        for (i, kind) in kinds.iter().enumerate() {
            let server = ServerProcess::start(*kind, programs, &[])?;
            let before = server.usage()?.rss_kib;
            let scenario = idle::Idle { target: server.target.clone(), connections, per_doc: 10 };
            let (report, peers) = idle::run(&scenario).await?;
            let after = server.usage()?.rss_kib;
            drop(peers);
            let kib = after.saturating_sub(before) as f64 / connections as f64;
            eprintln!("  idle {}: {kib:.1} KiB per connection", kind.slug());
            per_conn[i].push(kib);
            rows[i].push((
                report.connect.ms(0.5),
                report.connect.ms(0.99),
                report.seconds,
                before as f64,
                after as f64,
            ));
        }
    }
    for (i, kind) in kinds.iter().enumerate() {
        let col = |f: fn(&IdleRow) -> f64| median(rows[i].iter().map(f).collect());
        println!(
            "| {} | {:.2} / {:.2} | {:.1} | {:.0} → {:.0} | {:.1} |",
            kind.slug(),
            col(|r| r.0),
            col(|r| r.1),
            col(|r| r.2),
            col(|r| r.3) / 1024.0,
            col(|r| r.4) / 1024.0,
            median(per_conn[i].clone())
        );
    }
    let ours = median(per_conn[0].clone());
    let theirs: Vec<String> = kinds
        .iter()
        .zip(&per_conn)
        .filter(|(k, _)| !k.is_ours())
        .map(|(k, v)| format!("{} {:.1}×", k.slug(), median(v.clone()) / ours.max(1e-9)))
        .collect();
    println!("\nMemory per connection, theirs ÷ ours: {}.", theirs.join(", "));
    Ok(())
}

async fn reconnect_storm(kinds: &[Kind], programs: &Programs, rooms: usize, runs: usize) -> anyhow::Result<()> {
    println!("\n## Reconnect storm: {rooms} rooms × 10 peers drop at once, type offline, reconnect together\n");
    println!(
        "| server | time until every peer resynced and every room whole (s), median (range) | server peak RSS during the storm (MiB) | settled |\n|---|---|---|---|"
    );
    for kind in kinds {
        let mut times = Vec::new();
        let mut peaks = Vec::new();
        let mut settled = true;
        for round in 0..runs {
            let server = ServerProcess::start(*kind, programs, &[])?;
            let mut scenario = Classroom::hot_document(server.target.clone(), 10, 2.0, Duration::from_secs(3));
            scenario.rooms = rooms;
            scenario.prefix = "storm".into();
            scenario.seed = round as u64 + 1;
            let report = storm::run(&scenario, || {
                let _ = server.reset_peak();
            })
            .await?;
            peaks.push(server.usage()?.peak_rss_kib as f64 / 1024.0);
            times.push(report.resync_seconds);
            settled &= report.settled;
        }
        let (lo, hi) = range(&times);
        println!(
            "| {} | {:.2} ({lo:.2}-{hi:.2}) | {:.0} | {} |",
            kind.slug(),
            median(times.clone()),
            median(peaks),
            if settled { "yes" } else { "**no**" }
        );
    }
    Ok(())
}

async fn traces(kinds: &[Kind], programs: &Programs, quick: bool) -> anyhow::Result<()> {
    let (sequential, concurrent) = replay::available()?;
    println!("\n## Trace replay: each trace typed as fast as the server takes it, 3 watchers\n");
    println!(
        "| trace | server | writers | transactions | transactions/s | every copy equals endContent |\n|---|---|---|---|---|---|"
    );
    let timeout = Duration::from_secs(300);
    let sequential: Vec<String> =
        if quick { sequential.into_iter().filter(|n| n == "sveltecomponent").collect() } else { sequential };
    for name in sequential.iter().map(|n| (n, false)).chain(concurrent.iter().map(|n| (n, true))) {
        for kind in kinds {
            let server = ServerProcess::start(*kind, programs, &[])?;
            let report = if name.1 {
                replay::concurrent(&server.target, name.0, 3, timeout).await?
            } else {
                replay::sequential(&server.target, name.0, 3, timeout).await?
            };
            println!(
                "| {} | {} | {} | {} | {:.0} | {} |",
                report.trace,
                kind.slug(),
                report.writers,
                report.txns,
                report.txns_per_second(),
                if report.exact { "yes" } else { "**no**" }
            );
        }
    }
    Ok(())
}
