//! The reconnect-storm scenario: rooms of typing peers, then every client drops its connection
//! at once (no close handshake, as when a network blips), types a keystroke while offline, and
//! reconnects at the same moment as all the others. Measures the time until every peer is
//! resynced and every room holds every keystroke on every copy.

use std::time::{Duration, Instant};

use rand::SeedableRng;

use crate::classroom::{Classroom, Room, open_rooms, type_for, type_one, wait_settled};
use crate::stats::Stats;

#[derive(Debug, Clone)]
pub struct Report {
    pub peers: usize,
    /// From the first reconnect attempt until every room settled.
    pub resync_seconds: f64,
    pub settled: bool,
}

/// Runs `rooms` as in the classroom for `scenario.duration` of typing, then the storm;
/// `before_storm` runs between the drop and the reconnect (to reset the server's peak memory).
pub async fn run(scenario: &Classroom, before_storm: impl FnOnce()) -> anyhow::Result<Report> {
    let stats = Stats::default();
    let per_room = scenario.watchers + scenario.typists;
    let mut rooms: Vec<Room> = open_rooms(scenario, &stats).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(scenario.seed);
    // Some history to resync.
    type_for(&mut rooms, scenario.watchers, scenario.rate, scenario.duration, &stats, &mut rng).await;
    anyhow::ensure!(
        wait_settled(&rooms, &stats, Duration::from_secs(60)).await,
        "rooms did not settle before the storm"
    );

    for peer in rooms.iter_mut().flat_map(|r| r.peers.iter_mut()) {
        peer.disconnect();
    }
    for room in &mut rooms {
        for t in scenario.watchers..per_room {
            type_one(room, t, &stats, &mut rng);
        }
    }
    before_storm();
    let started = Instant::now();
    let target = &scenario.target;
    let reconnects = rooms.iter_mut().flat_map(|room| {
        let doc = room.doc.clone();
        room.peers.iter_mut().map(move |peer| {
            let doc = doc.clone();
            async move {
                target.rejoin(peer, &doc).await?;
                peer.wait_synced(Duration::from_secs(120)).await?;
                anyhow::Ok(())
            }
        })
    });
    for done in futures_util::future::join_all(reconnects).await {
        done?;
    }
    let settled = wait_settled(&rooms, &stats, Duration::from_secs(120)).await;
    Ok(Report {
        peers: rooms.iter().map(|r| r.peers.len()).sum(),
        resync_seconds: started.elapsed().as_secs_f64(),
        settled,
    })
}
