//! `collab-bench soak`: classroom rooms coming and going against one of our servers for a long
//! time, with its memory, documents, connections and tasks sampled and plotted.

use std::path::Path;
use std::time::Duration;

use loadtest::plot::{self, Series};
use loadtest::server::{Programs, ServerProcess};
use loadtest::soak::{self, Soak};
use loadtest::target::Kind;

pub async fn soak(programs: &Programs, minutes: f64, out: &Path) -> anyhow::Result<()> {
    // A short unload delay, so that rooms that left are unloaded within the run.
    let server = ServerProcess::start(Kind::Collab, programs, &["--unload-delay", "5"])?;
    let http = server.target.base.trim_start_matches("ws://").to_owned();
    let scenario = Soak {
        target: server.target.clone(),
        http,
        pid: server.pid(),
        duration: Duration::from_secs_f64(minutes * 60.0),
        rooms: 4,
        students: 20,
        room_life: Duration::from_secs(60),
        sample_every: Duration::from_secs(10),
    };
    let report = soak::run(&scenario).await?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let first = report.samples[0];
    let busy: Vec<_> = report.samples.iter().filter(|s| s.connections > 0).collect();
    let peak = busy.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let early = busy.iter().take(busy.len() / 4).map(|s| s.rss_kib).max().unwrap_or(0);
    let late = busy.iter().skip(3 * busy.len() / 4).map(|s| s.rss_kib).max().unwrap_or(0);
    println!("## Soak: {minutes} minutes of classroom rooms coming and going\n");
    println!(
        "{} rooms of 1 teacher + {} students open at a time, each living {} s at 5-9 keystrokes/s per student.\n",
        scenario.rooms,
        scenario.students,
        scenario.room_life.as_secs()
    );
    println!("| measure | value |\n|---|---|");
    println!("| rooms opened and closed | {} |", report.rooms_closed);
    println!("| keystrokes | {} |", report.edits);
    println!("| lost deliveries | {} (every room settled: {}) |", report.lost, report.all_settled);
    println!("| RSS at start | {:.1} MiB |", mib(first.rss_kib));
    println!("| peak RSS in the first / last quarter of the run | {:.1} / {:.1} MiB |", mib(early), mib(late));
    println!("| peak RSS overall | {:.1} MiB |", mib(peak));
    println!(
        "| after the last room left: RSS, documents loaded, connections, tasks | {:.1} MiB, {}, {}, {} (at start: {}, {}, {}) |",
        mib(report.after.rss_kib),
        report.after.documents,
        report.after.connections,
        report.after.tasks,
        first.documents,
        first.connections,
        first.tasks
    );
    let minutes_of = |s: &soak::Sample| s.seconds / 60.0;
    let series = [
        Series {
            name: "server RSS (MiB)".into(),
            points: report.samples.iter().map(|s| (minutes_of(s), mib(s.rss_kib))).collect(),
        },
        Series {
            name: "documents loaded".into(),
            points: report.samples.iter().map(|s| (minutes_of(s), s.documents as f64)).collect(),
        },
        Series {
            name: "connections ÷ 10".into(),
            points: report.samples.iter().map(|s| (minutes_of(s), s.connections as f64 / 10.0)).collect(),
        },
        Series {
            name: "tokio tasks ÷ 10".into(),
            points: report.samples.iter().map(|s| (minutes_of(s), s.tasks as f64 / 10.0)).collect(),
        },
    ];
    let path = out.join("soak.svg");
    plot::lines(&path, "Soak: server memory and state over time", "minutes", "value", &series, false)?;
    println!("\nPlot: `{}`", path.display());
    anyhow::ensure!(report.lost == 0 && report.all_settled, "the soak lost edits");
    Ok(())
}
