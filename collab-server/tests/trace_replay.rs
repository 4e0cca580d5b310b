//! Replays a real recorded editing session (automerge-paper, 259,778 keystrokes) through the
//! server: one client types it as fast as the server accepts while another watches.
//!
//! The trace is from the `josephg/editing-traces` data set, CC BY 4.0; see
//! `../shared/data/editing-traces/README.md` for the attribution.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use common::{TestServer, WAIT};
use serde::Deserialize;

#[derive(Deserialize)]
struct Trace {
    #[serde(rename = "endContent")]
    end_content: String,
    txns: Vec<Txn>,
}

#[derive(Deserialize)]
struct Txn {
    patches: Vec<(u32, u32, String)>,
}

/// The traces live in `shared/` beside the repository; `COLLAB_TRACES_DIR` may point elsewhere.
/// A missing trace fails the test: it is never skipped.
fn trace_path(name: &str) -> PathBuf {
    let root = std::env::var_os("COLLAB_TRACES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/editing-traces"));
    root.join("sequential").join(name)
}

fn load(name: &str) -> Trace {
    let path = trace_path(name);
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("trace {} missing: {e}", path.display()));
    let mut json = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut json).expect("gunzip");
    serde_json::from_str(&json).expect("trace json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automerge_paper_trace_typed_through_the_server_reaches_a_watcher_exactly() {
    let trace = load("automerge-paper.json.gz");
    assert_eq!(trace.txns.len(), 259_778);
    let server = TestServer::start_with(|c| {
        c.limits.rate_messages = 0;
        c.limits.rate_bytes = 0;
    })
    .await;
    let doc = "trace/paper";
    let typist = server.connect(doc, "typist").await;
    let watcher = server.connect(doc, "watcher").await;
    let started = Instant::now();
    for txn in &trace.txns {
        // One transaction per recorded keystroke, as an editor would make them.
        typist.edit(|t, text| {
            for (pos, del, ins) in &txn.patches {
                if *del > 0 {
                    yrs::Text::remove_range(text, t, *pos, *del);
                }
                if !ins.is_empty() {
                    yrs::Text::insert(text, t, *pos, ins);
                }
            }
        });
        if typist.unsent() > 4096 {
            // Let the socket drain: "as fast as the server accepts".
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(typist.text(), trace.end_content, "the typist's own document replays the trace");
    watcher.wait_text(&trace.end_content, WAIT * 6).await.expect("the watcher ends with endContent");
    let elapsed = started.elapsed();
    eprintln!(
        "replayed {} keystrokes in {:.2?} ({:.0}/s) through {} frames",
        trace.txns.len(),
        elapsed,
        trace.txns.len() as f64 / elapsed.as_secs_f64(),
        server.metric("collab_messages_in_total")
    );
    server.stop().await;
}
