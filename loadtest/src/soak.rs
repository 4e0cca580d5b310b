//! The soak: classroom rooms coming and going for a long time against one of our servers, with
//! the server's memory, loaded documents, open connections and live tasks sampled as it runs.
//! Memory should stay flat: rooms that leave are unloaded and leave no tasks or map entries.

use std::time::{Duration, Instant};

use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::classroom::{open_room, type_for, wait_settled};
use crate::stats::Stats;
use crate::target::Target;

#[derive(Debug, Clone)]
pub struct Soak {
    pub target: Target,
    /// `host:port` of the server's HTTP listener, for `/metrics`.
    pub http: String,
    /// The server process, for `/proc`.
    pub pid: u32,
    pub duration: Duration,
    /// Rooms open at any time.
    pub rooms: usize,
    pub students: usize,
    /// How long a room lives; rooms start staggered over one lifetime.
    pub room_life: Duration,
    pub sample_every: Duration,
}

/// One reading of the server.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub seconds: f64,
    pub rss_kib: u64,
    pub documents: i64,
    pub connections: i64,
    pub tasks: i64,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub samples: Vec<Sample>,
    pub rooms_closed: u64,
    pub edits: u64,
    pub lost: u64,
    /// Every room settled (all copies equal, every keystroke present) before it left.
    pub all_settled: bool,
    /// The reading after the last room left and the server had time to unload.
    pub after: Sample,
}

/// Reads one gauge from the server's `/metrics`.
pub async fn metric(http: &str, name: &str) -> anyhow::Result<i64> {
    let mut stream = tokio::net::TcpStream::connect(http).await?;
    stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes()).await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
        .map(|v| v as i64)
        .ok_or_else(|| anyhow::anyhow!("{name} not in /metrics"))
}

async fn sample(soak: &Soak, started: Instant) -> anyhow::Result<Sample> {
    Ok(Sample {
        seconds: started.elapsed().as_secs_f64(),
        rss_kib: crate::server::usage(soak.pid)?.rss_kib,
        documents: metric(&soak.http, "collab_documents_loaded").await?,
        connections: metric(&soak.http, "collab_connections_active").await?,
        tasks: metric(&soak.http, "collab_tasks_alive").await?,
    })
}

/// One room's life: join, type at classroom rates, settle, leave. Returns whether it settled.
async fn room_life(soak: Soak, index: u64, stats: Stats) -> anyhow::Result<bool> {
    let doc = format!("soak{index}/file");
    let mut room = open_room(std::slice::from_ref(&soak.target), &doc, soak.students + 1, &stats).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(index);
    type_for(std::slice::from_mut(&mut room), 1, (5.0, 9.0), soak.room_life, &stats, &mut rng).await;
    Ok(wait_settled(std::slice::from_ref(&room), &stats, Duration::from_secs(60)).await)
}

pub async fn run(soak: &Soak) -> anyhow::Result<Report> {
    let stats = Stats::default();
    let started = Instant::now();
    let mut samples = vec![sample(soak, started).await?];
    let mut rooms = tokio::task::JoinSet::new();
    let mut next_room = 0u64;
    let mut closed = 0u64;
    let mut all_settled = true;
    let stagger = soak.room_life / soak.rooms as u32;
    let mut next_start = Instant::now();
    let mut next_sample = Instant::now() + soak.sample_every;
    let end = started + soak.duration;
    loop {
        let now = Instant::now();
        if now < end && rooms.len() < soak.rooms && now >= next_start {
            rooms.spawn(room_life(soak.clone(), next_room, stats.clone()));
            next_room += 1;
            next_start = now + stagger;
        }
        if now >= next_sample {
            samples.push(sample(soak, started).await?);
            next_sample += soak.sample_every;
        }
        if now >= end && rooms.is_empty() {
            break;
        }
        let wake = next_sample.min(if now < end { next_start } else { next_sample });
        tokio::select! {
            Some(done) = rooms.join_next() => {
                all_settled &= done??;
                closed += 1;
            }
            _ = tokio::time::sleep_until(wake.max(Instant::now()).into()) => {}
        }
    }
    // Rooms are gone: the server unloads their documents after its unload delay.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut after = sample(soak, started).await?;
    while (after.documents > 0 || after.connections > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = sample(soak, started).await?;
    }
    samples.push(after);
    let snapshot = stats.snapshot();
    Ok(Report {
        samples,
        rooms_closed: closed,
        edits: snapshot.edits,
        lost: snapshot.expected.saturating_sub(snapshot.deliveries),
        all_settled,
        after,
    })
}
