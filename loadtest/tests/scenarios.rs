//! A short smoke run of every benchmark scenario against a real server in this process (both of
//! our endpoints) and against the reference servers from npm: nothing lost, every room
//! converged, trace replays ending exactly at `endContent`. Speed is measured by
//! `cargo xtask bench`, not here.

use std::path::PathBuf;
use std::time::Duration;

use collab_test_support::TestServer;
use loadtest::classroom::{self, Classroom};
use loadtest::server::{Programs, ServerProcess};
use loadtest::target::{Kind, Target};
use loadtest::{idle, replay, soak, storm};

/// Our server in this process, opened up for load: no per-connection throttle, no connect
/// rate, token-less peers allowed.
struct Server {
    server: TestServer,
}

impl Server {
    async fn start(tweak: impl FnOnce(&mut collab_server::Config)) -> Server {
        let server = TestServer::start_with(|config| {
            config.allow_anonymous = true;
            config.limits.rate_messages = 0;
            config.limits.connect_rate = 0;
            tweak(config);
        })
        .await;
        Server { server }
    }

    fn target(&self, kind: Kind) -> Target {
        Target::new(kind, self.server.url.clone())
    }
}

fn assert_whole(report: &classroom::Report, peers: usize) {
    assert_eq!(report.peers, peers);
    assert!(report.edits > 0, "nobody typed");
    assert!(report.converged, "every room's copies are identical and complete");
    assert_eq!(report.lost(), 0, "every keystroke reached every other peer");
    assert_eq!(report.deliveries, report.expected_deliveries);
    assert_eq!(report.latency.len(), report.deliveries, "one latency per delivery");
    assert_eq!(report.connect.len() as usize, peers, "one connection time per peer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classroom_on_both_endpoints_loses_nothing() {
    let server = Server::start(|_| {}).await;
    for kind in [Kind::Collab, Kind::CollabMux] {
        let mut scenario = Classroom::with_students(server.target(kind), 2, 6, Duration::from_millis(1500));
        scenario.prefix = format!("class-{}-", kind.slug());
        let report = classroom::run(&scenario).await.unwrap();
        assert_whole(&report, 14);
        // 12 students at 5-9 keystrokes/s for 1.5 s.
        assert!(report.edits >= 12 * 5, "{} keystrokes", report.edits);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_document_with_many_writers_converges() {
    let server = Server::start(|_| {}).await;
    let scenario = Classroom::hot_document(server.target(Kind::Collab), 40, 4.0, Duration::from_secs(1));
    let report = classroom::run(&scenario).await.unwrap();
    assert_whole(&report, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_stay_open() {
    // Every simulated client comes from 127.0.0.1: lift the per-address bound they would meet.
    let server = Server::start(|c| c.limits.max_connections_per_ip = 100_000).await;
    let scenario = idle::Idle { target: server.target(Kind::Collab), connections: 300, per_doc: 10 };
    let (report, peers) = idle::run(&scenario).await.unwrap();
    assert_eq!(report.connections, 300);
    assert_eq!(report.docs, 30);
    assert_eq!(peers.len(), 300);
    assert_eq!(report.connect.len(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_resyncs_every_peer_and_offline_keystroke() {
    let server = Server::start(|_| {}).await;
    for kind in [Kind::Collab, Kind::CollabMux] {
        let mut scenario = Classroom::hot_document(server.target(kind), 8, 5.0, Duration::from_millis(500));
        scenario.rooms = 5;
        scenario.prefix = format!("storm-{}-", kind.slug());
        let mut called = false;
        let report = storm::run(&scenario, || called = true).await.unwrap();
        assert!(called);
        assert_eq!(report.peers, 40);
        assert!(report.settled, "after the storm every room holds every keystroke, offline ones included");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_traces_replay_exactly_on_both_endpoints() {
    // The writer replays as fast as the server takes it; on a loaded machine its reader can fall
    // a default queue behind, and being cut off as slow (tested elsewhere) is not what this
    // test is about.
    let server = Server::start(|c| c.limits.outbound_queue = 1 << 16).await;
    for kind in [Kind::CollabMux, Kind::Collab] {
        let report =
            replay::sequential(&server.target(kind), "sveltecomponent", 2, Duration::from_secs(20)).await.unwrap();
        assert!(report.exact, "{}: every copy equals endContent: {:#?}", kind.slug(), report.peers);
        assert_eq!(report.txns, 18_335);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_trace_replays_exactly_with_one_client_per_agent() {
    let server = Server::start(|_| {}).await;
    let report =
        replay::concurrent(&server.target(Kind::Collab), "friendsforever", 1, Duration::from_secs(120)).await.unwrap();
    assert_eq!(report.writers, 2, "friendsforever has two agents");
    assert!(report.exact, "every copy equals endContent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_rooms_come_and_go_and_are_unloaded() {
    let server = Server::start(|c| c.limits.unload_delay = Duration::ZERO).await;
    let scenario = soak::Soak {
        target: server.target(Kind::Collab),
        http: server.server.http_addr().to_owned(),
        pid: std::process::id(),
        duration: Duration::from_secs(3),
        rooms: 3,
        students: 4,
        room_life: Duration::from_millis(900),
        sample_every: Duration::from_millis(500),
    };
    let report = soak::run(&scenario).await.unwrap();
    assert!(report.rooms_closed >= 6, "rooms came and went: {}", report.rooms_closed);
    assert!(report.all_settled);
    assert_eq!(report.lost, 0);
    assert!(report.samples.len() >= 5, "sampled as it ran");
    assert!(report.samples.iter().any(|s| s.documents > 0 && s.connections > 0));
    assert_eq!((report.after.documents, report.after.connections), (0, 0), "every room unloaded at the end");
}

fn reference_programs() -> Programs {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Programs { collab: PathBuf::from("/nonexistent"), reference: root.join("servers"), core: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_servers_run_the_same_scenarios() {
    for kind in [Kind::YWebsocket, Kind::Hocuspocus] {
        let server = ServerProcess::start(kind, &reference_programs(), &[]).unwrap();
        let mut scenario = Classroom::with_students(server.target.clone(), 2, 5, Duration::from_secs(1));
        scenario.server_pid = Some(server.pid());
        let report = classroom::run(&scenario).await.unwrap();
        assert_whole(&report, 12);
        assert!(report.server_cpu_seconds.is_some());
        let replayed =
            replay::sequential(&server.target, "sveltecomponent", 1, Duration::from_secs(120)).await.unwrap();
        assert!(replayed.exact, "{}: the trace replays exactly", kind.slug());
        let usage = server.usage().unwrap();
        assert!(usage.rss_kib > 0 && usage.peak_rss_kib >= usage.rss_kib);
    }
}
