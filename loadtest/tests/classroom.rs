//! The classroom scenario at a small scale against an in-process server: every keystroke reaches
//! every other peer of its room, rooms converge, and latencies are measured.

use std::time::Duration;

use loadtest::classroom::{self, Classroom};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_classroom_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = collab_server::Config::for_data_dir(dir.path().to_path_buf());
    config.allow_anonymous = true;
    config.web_dir = "/nonexistent".into();
    let running = collab_server::start(config).await.unwrap();
    let scenario = Classroom {
        server: format!("ws://{}", running.addr),
        rooms: 2,
        students: 4,
        rate: 20.0,
        duration: Duration::from_millis(800),
    };
    let report = classroom::run(&scenario).await.unwrap();
    assert_eq!(report.peers, 10);
    assert!(report.edits >= 2 * 4 * 5, "students typed: {} edits", report.edits);
    assert!(report.converged, "rooms converged");
    assert_eq!(report.lost(), 0, "every keystroke reached every other peer");
    assert_eq!(report.deliveries, report.expected_deliveries, "and was counted once per receiver");
    assert_eq!(report.latencies.len() as u64, report.deliveries);
    assert!(report.percentile(0.99) < Duration::from_secs(10));
    running.shutdown().await.unwrap();
}
