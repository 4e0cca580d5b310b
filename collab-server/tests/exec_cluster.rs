//! Runs and terminals in a cluster: two nodes, each able to host a bridge, a real Redis holding
//! the lease that makes exactly one of them the project's bridge, and failover when it dies.

mod common;

use collab_test_support::wait;
use common::WAIT;
use common::cluster::Cluster;
use common::exec_peer::ExecPeer;
use exec_bridge::protocol::{ClientMsg, ServerMsg};
use futures_util::StreamExt;
use sync_core::tree::{self, EntryKind};
use tokio_tungstenite::tungstenite::Message;
use yrs::{Text, Transact};

const PROGRAM: &str = "import os\nprint('ran in', os.getcwd())\n";

/// Creates `main.py` in the cluster's project through node `node`.
async fn create_program(cluster: &Cluster, node: usize) {
    let root = cluster.peer(node, &cluster.project, "setup").await;
    let id = {
        let mut txn = root.doc().transact_mut();
        tree::init(&mut txn);
        tree::create(&mut txn, "main.py", EntryKind::File).expect("create")
    };
    let file = cluster.peer(node, &tree::file_doc_name(&cluster.project, &id), "setup").await;
    file.edit(|txn, text| text.insert(txn, 0, PROGRAM));
    // Another peer reads it back: then the node holds it.
    let check = cluster.peer(node, &tree::file_doc_name(&cluster.project, &id), "check").await;
    check.wait_text(PROGRAM, WAIT).await.expect("main.py reached the node");
    drop(file);
}

/// What a node answers an exec peer: the hello, or the error it was refused with.
async fn try_connect(cluster: &Cluster, node: usize, user: &str) -> Result<ExecPeer, String> {
    let url = format!("{}/exec/{}?token={}", cluster.nodes[node].url(), cluster.project, cluster.token(user));
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.map_err(|e| e.to_string())?;
    let first = tokio::time::timeout(WAIT, socket.next()).await.expect("an answer in time");
    let Some(Ok(Message::Text(text))) = first else { return Err(format!("{first:?}")) };
    match serde_json::from_str::<ServerMsg>(&text).expect("parses") {
        hello @ ServerMsg::Hello { .. } => Ok(ExecPeer { socket, seen: vec![hello], forgotten: 0 }),
        ServerMsg::Error { message } => {
            let close = tokio::time::timeout(WAIT, socket.next()).await.expect("closed in time");
            match close {
                Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1013),
                other => panic!("a refused peer is closed with 1013, got {other:?}"),
            }
            Err(message)
        }
        other => panic!("unexpected first message {other:?}"),
    }
}

/// Connects to `node`, retrying while the project's lease is elsewhere; fails after [`WAIT`].
async fn connect_eventually(cluster: &Cluster, node: usize, user: &str) -> ExecPeer {
    let what = format!("node {node} to take the project");
    wait::poll(&what, WAIT, || async { try_connect(cluster, node, user).await.ok() }, || cluster.logs()).await
}

async fn run_once(peer: &mut ExecPeer) -> String {
    peer.seen.clear();
    peer.send(&ClientMsg::Run {}).await;
    let finished = peer.until("run finished", |m| matches!(m, ServerMsg::RunFinished { .. })).await;
    let ServerMsg::RunFinished { run, verdict } = finished else { unreachable!() };
    assert_eq!(verdict.code, Some(0), "{verdict:?}");
    peer.run_text(run)
}

/// Node 0 renews its lease for 1.5 s at a time, so a crash frees the project soon; nodes 1 and 2
/// take it for 60 s, far beyond [`WAIT`], so another node gets a project they held within the
/// test's patience only if they gave the lease back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bridge_per_project_with_failover() {
    let project = format!("leased-{:08x}", rand::random::<u32>());
    let mut cluster = Cluster::start_with(0, &project, &["--sandbox", "local", "--exec-idle", "0.5"]).await;
    cluster.add_node_with(&["--exec-lease", "1.5"]).await;
    cluster.add_node_with(&["--exec-lease", "60"]).await;
    create_program(&cluster, 0).await;

    // Node 0 takes the project; node 1 refuses to start a second bridge for it.
    let mut ann = connect_eventually(&cluster, 0, "ann").await;
    let refused = try_connect(&cluster, 1, "bob").await.err().expect("node 1 refuses while node 0 holds the lease");
    assert!(refused.contains("another node"), "{refused}");
    assert_eq!(run_once(&mut ann).await, "ran in /workspace\n");
    assert!(cluster.workspace(0).join("main.py").exists());
    assert!(!cluster.workspace(1).exists(), "node 1 started a bridge of its own");

    // Node 0 crashes without giving the lease back: node 1 takes over once it expires.
    cluster.kill_node(0);
    drop(ann);
    let mut bob = connect_eventually(&cluster, 1, "bob").await;
    assert_eq!(run_once(&mut bob).await, "ran in /workspace\n");
    assert_eq!(std::fs::read_to_string(cluster.workspace(1).join("main.py")).expect("mirrored on node 1"), PROGRAM);

    // A session that goes idle hands the lease back at once; a new node takes the project long
    // before node 1's 60 s lease could have expired.
    let third = cluster.add_node_with(&["--exec-lease", "60"]).await;
    drop(bob);
    let mut cat = connect_eventually(&cluster, third, "cat").await;
    assert_eq!(run_once(&mut cat).await, "ran in /workspace\n");
}
