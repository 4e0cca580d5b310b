//! The bridge against a real server: it joins the project as a peer, writes the files of the
//! project into its workspace as people type, and brings files that programs write back into the
//! documents while a person types in the same file.

use std::path::Path;
use std::time::Duration;

use collab_client::{DocPeer, MuxConnection};
use collab_server::Config;
use collab_test_support::{TestServer, WAIT, until};
use exec_bridge::mirror::Mirror;
use exec_bridge::peer::{self, BridgeConfig};
use sync_core::tree::{self, EntryKind};
use tokio_util::sync::CancellationToken;
use yrs::{GetString, ReadTxn, Transact, WriteTxn};

const PROJECT: &str = "bridged";

async fn server() -> TestServer {
    TestServer::start().await
}

/// An editor token for `user` in the project.
fn token(setup: &TestServer, user: &str) -> String {
    setup.editor(PROJECT, user)
}

/// A project whose tree holds one file `path` with `text`, edited by `ada` over one socket.
async fn project_with_file(setup: &TestServer, path: &str, text: &str) -> (MuxConnection, DocPeer, DocPeer, String) {
    let human = MuxConnection::connect(&setup.url).await.unwrap();
    let root = human.open(PROJECT, &token(setup, "ada")).await.unwrap();
    root.wait_synced(WAIT).await.unwrap();
    let id = {
        let mut txn = root.doc().transact_mut();
        tree::init(&mut txn);
        tree::create(&mut txn, path, EntryKind::File).unwrap()
    };
    let file = human.open(&tree::file_doc_name(PROJECT, &id), &token(setup, "ada")).await.unwrap();
    file.wait_synced(WAIT).await.unwrap();
    file.insert(0, text);
    (human, root, file, id)
}

/// A bridge for the project on a fresh workspace: the workspace, its stop switch and its task.
fn start_bridge(setup: &TestServer) -> (tempfile::TempDir, CancellationToken, tokio::task::JoinHandle<()>) {
    let workspace = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let config = BridgeConfig::new(&setup.url, PROJECT, &token(setup, "exec-bridge"), workspace.path().to_owned());
    let bridge = spawn_bridge(config, &shutdown);
    (workspace, shutdown, bridge)
}

/// Runs the bridge as `collab-bridge` does: restarted with the same mirror when it stops.
fn spawn_bridge(config: BridgeConfig, shutdown: &CancellationToken) -> tokio::task::JoinHandle<()> {
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut mirror = Mirror::new();
        while !shutdown.is_cancelled() {
            if peer::run(config.clone(), &mut mirror, shutdown.clone()).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn text(peer: &DocPeer) -> String {
    let content = peer.doc().get_or_insert_text(tree::CONTENT);
    content.get_string(&peer.doc().transact())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_flow_both_ways_while_people_type() {
    let setup = server().await;
    let (human, root, file, _) = project_with_file(&setup, "src/main.py", "print('héllo')\n").await;
    let (workspace, shutdown, bridge) = start_bridge(&setup);

    // Documents to files: the existing file, then a keystroke.
    let main = workspace.path().join("src/main.py");
    until("the file in the workspace", || read(&main).as_deref() == Some("print('héllo')\n")).await;
    let len = text(&file).len() as u32;
    file.insert(len, "print(2)\n");
    until("the keystroke in the workspace", || read(&main).as_deref() == Some("print('héllo')\nprint(2)\n")).await;

    // Files to documents: a program rewrites the first line while the person types at the end.
    std::fs::write(&main, "print('formatted')\nprint(2)\n").unwrap();
    let len = text(&file).len() as u32;
    file.insert(len, "# typed\n");
    file.wait_until("both edits", WAIT, |p| text(p) == "print('formatted')\nprint(2)\n# typed\n").await.unwrap();
    until("both edits in the workspace", || read(&main).as_deref() == Some("print('formatted')\nprint(2)\n# typed\n"))
        .await;

    // A new file written by a program joins the tree with its content; a deleted one leaves it.
    std::fs::write(workspace.path().join("out.txt"), "42\n").unwrap();
    root.wait_until("out.txt in the tree", WAIT, |p| tree::find_by_path(&p.doc().transact(), "out.txt").is_some())
        .await
        .unwrap();
    let out_id = tree::find_by_path(&root.doc().transact(), "out.txt").unwrap().id;
    let out = human.open(&tree::file_doc_name(PROJECT, &out_id), &token(&setup, "ada")).await.unwrap();
    out.wait_until("out.txt content", WAIT, |p| text(p) == "42\n").await.unwrap();
    std::fs::remove_file(workspace.path().join("out.txt")).unwrap();
    root.wait_until("out.txt gone", WAIT, |p| tree::find_by_path(&p.doc().transact(), "out.txt").is_none())
        .await
        .unwrap();

    // A file created in the tree by a person appears in the workspace.
    let new_id = tree::create(&mut root.doc().transact_mut(), "notes.md", EntryKind::File).unwrap();
    let notes = human.open(&tree::file_doc_name(PROJECT, &new_id), &token(&setup, "ada")).await.unwrap();
    notes.wait_synced(WAIT).await.unwrap();
    notes.insert(0, "# notes\n");
    let notes_path = workspace.path().join("notes.md");
    until("notes.md in the workspace", || read(&notes_path).as_deref() == Some("# notes\n")).await;

    shutdown.cancel();
    bridge.await.unwrap();
    setup.stop().await;
}

/// A hostile path in the tree is refused: nothing is written outside the workspace, and the
/// bridge keeps mirroring the other files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_path_in_the_tree_writes_nothing_outside() {
    let setup = server().await;
    let human = MuxConnection::connect(&setup.url).await.unwrap();
    let root = human.open(PROJECT, &token(&setup, "ada")).await.unwrap();
    root.wait_synced(WAIT).await.unwrap();
    let outside = tempfile::tempdir().unwrap();
    let workspace = outside.path().join("ws");
    std::fs::create_dir(&workspace).unwrap();
    let (bad, good) = {
        let mut txn = root.doc().transact_mut();
        tree::init(&mut txn);
        // Written straight into the map, as a hostile client would, bypassing tree::create's checks.
        let bad = tree::new_file_id();
        let files = txn.get_or_insert_map("files");
        let entry: yrs::MapPrelim =
            [("path", yrs::Any::from("../escaped.txt")), ("kind", yrs::Any::from("file"))].into_iter().collect();
        yrs::Map::insert(&files, &mut txn, bad.as_str(), entry);
        (bad, tree::create(&mut txn, "fine.txt", EntryKind::File).unwrap())
    };
    for (id, content) in [(&bad, "escape"), (&good, "fine")] {
        let peer = human.open(&tree::file_doc_name(PROJECT, id), &token(&setup, "ada")).await.unwrap();
        peer.wait_synced(WAIT).await.unwrap();
        peer.insert(0, content);
    }
    let shutdown = CancellationToken::new();
    let config = BridgeConfig::new(&setup.url, PROJECT, &token(&setup, "exec-bridge"), workspace.clone());
    let bridge = spawn_bridge(config, &shutdown);
    let fine = workspace.join("fine.txt");
    until("fine.txt in the workspace", || read(&fine).as_deref() == Some("fine")).await;
    assert!(!outside.path().join("escaped.txt").exists(), "a file was written outside the workspace");
    shutdown.cancel();
    bridge.await.unwrap();
    setup.stop().await;
}

/// The server goes away and comes back: the bridge reconnects, and a file a program changed
/// meanwhile merges into the document instead of being overwritten by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_written_while_the_server_is_away_merge_when_it_returns() {
    let mut setup = server().await;
    let (human, root, file, id) = project_with_file(&setup, "log.txt", "one\n").await;
    let (workspace, shutdown, bridge) = start_bridge(&setup);
    let log = workspace.path().join("log.txt");
    until("log.txt in the workspace", || read(&log).as_deref() == Some("one\n")).await;
    drop((file, root, human));

    setup.restart_after(|| std::fs::write(&log, "one\ntwo\n").unwrap()).await;
    let human = MuxConnection::connect(&setup.url).await.unwrap();
    let file = human.open(&tree::file_doc_name(PROJECT, &id), &token(&setup, "ada")).await.unwrap();
    file.wait_until("the program's line", WAIT, |p| text(p) == "one\ntwo\n").await.unwrap();
    assert_eq!(read(&log).as_deref(), Some("one\ntwo\n"));
    shutdown.cancel();
    bridge.await.unwrap();
    setup.stop().await;
}

/// A run's preparation waits until the bridge holds the state the server had when the run was
/// requested: the reply comes only after the awaited edit arrived, and the file on disk has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waits_for_the_edits_made_before_it() {
    let setup = server().await;
    let (_human, _root, file, id) = project_with_file(&setup, "main.py", "print(1)\n").await;
    let workspace = tempfile::tempdir().unwrap();
    let config = BridgeConfig::new(&setup.url, PROJECT, &token(&setup, "exec-bridge"), workspace.path().to_owned());
    let (requests, mut incoming) = tokio::sync::mpsc::channel(1);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let bridge = tokio::spawn(async move {
        let mut mirror = Mirror::new();
        let _ = peer::run_serving(config, &mut mirror, stop, &mut incoming).await;
    });
    let main = workspace.path().join("main.py");
    until("the first version on disk", || read(&main).as_deref() == Some("print(1)\n")).await;

    // Ask for a state one edit ahead of what the human has sent so far.
    let mut ahead = file.doc().transact().state_vector();
    ahead.inc_by(file.doc().client_id(), 1);
    let (reply, prepared) = tokio::sync::oneshot::channel();
    let wait_for = vec![(tree::file_doc_name(PROJECT, &id), ahead)];
    requests.send(peer::PrepareRequest { wait_for, reply }).await.unwrap();
    let mut prepared = std::pin::pin!(prepared);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut prepared).await.is_err(),
        "the bridge answered before it had the awaited edit"
    );
    file.edit(|txn, text| {
        use yrs::Text;
        text.remove_range(txn, 6, 1);
        text.insert(txn, 6, "2");
    });
    let prepared = tokio::time::timeout(WAIT, prepared).await.expect("answered in time").expect("answered");
    assert_eq!(prepared.paths, ["main.py"]);
    assert_eq!(read(&main).as_deref(), Some("print(2)\n"), "the edit is on disk when the run starts");
    shutdown.cancel();
    bridge.await.unwrap();
    setup.stop().await;
}

/// A data directory of mode 0700 (as one holding the signing key should be) with the local
/// sandbox: the server says at start that the sandbox cannot reach its workspaces, and how to
/// fix it, instead of every run failing with a message of bwrap's.
#[tokio::test]
async fn a_private_data_directory_is_reported_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut config = Config::for_data_dir(data.clone());
    config.web_dir = "/nonexistent".into();
    config.sandbox = collab_server::exec::SandboxKind::Local;
    match collab_server::start(config).await {
        Err(err) => {
            let text = format!("{err:#}");
            let named = data.canonicalize().unwrap().display().to_string();
            assert!(text.contains("cannot reach") && text.contains(&named) && text.contains("0700"), "{text}");
            assert!(text.contains("chmod o+x"), "the message says how to fix it: {text}");
        }
        // Not as root the sandbox runs as the server's own user, who owns the data directory.
        Ok(running) => {
            use std::os::unix::fs::MetadataExt;
            assert_ne!(std::fs::metadata("/proc/self").unwrap().uid(), 0, "as root the server must refuse");
            running.shutdown().await.unwrap();
        }
    }
}

/// What a program writes reaches the documents by the workspace watcher's events, not by
/// waiting for the periodic scan (here an hour away after the first one), in a new folder too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_a_program_writes_is_noticed_without_waiting_for_a_scan() {
    let setup = server().await;
    let (human, root, _file, _) = project_with_file(&setup, "main.py", "print(1)\n").await;
    let workspace = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let mut config = BridgeConfig::new(&setup.url, PROJECT, &token(&setup, "exec-bridge"), workspace.path().to_owned());
    config.scan_every = Duration::from_secs(3600);
    let bridge = spawn_bridge(config, &shutdown);
    let main = workspace.path().join("main.py");
    until("main.py in the workspace", || read(&main).as_deref() == Some("print(1)\n")).await;
    // Once this file is in the tree, the one periodic scan there will be has happened.
    std::fs::write(workspace.path().join("probe.txt"), "probe\n").unwrap();
    root.wait_until("probe.txt in the tree", WAIT, |p| tree::find_by_path(&p.doc().transact(), "probe.txt").is_some())
        .await
        .unwrap();
    std::fs::create_dir(workspace.path().join("out")).unwrap();
    std::fs::write(workspace.path().join("out/result.txt"), "42\n").unwrap();
    root.wait_until("out/result.txt in the tree", WAIT, |p| {
        tree::find_by_path(&p.doc().transact(), "out/result.txt").is_some()
    })
    .await
    .unwrap();
    let id = tree::find_by_path(&root.doc().transact(), "out/result.txt").unwrap().id;
    let result = human.open(&tree::file_doc_name(PROJECT, &id), &token(&setup, "ada")).await.unwrap();
    result.wait_until("its content", WAIT, |p| text(p) == "42\n").await.unwrap();
    shutdown.cancel();
    bridge.await.unwrap();
    setup.stop().await;
}
