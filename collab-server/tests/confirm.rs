//! Confirmed means saved, on both endpoints, and nobody goes blind while the store is down
//! (issue #14 items 11 to 14). The y-websocket side is driven by a raw y-protocols peer: plain
//! tungstenite and hand-encoded sync messages, one message per transaction, as a stranger's
//! client would speak it. Its confirmation of a write is the server's echo of it.
//!
//! Every test has a PostgreSQL server of its own, so that stalling its update log (a held
//! `LOCK TABLE`) stalls nobody else's test.

mod common;

use collab_client::MuxConnection;
use collab_test_support::postgres::{PrivatePostgres, StoreStall};
use collab_test_support::process::{Serve, ServerProcess};
use common::{TestServer, WAIT, http};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use sync_core::Role;
use tokio_tungstenite::tungstenite::Message;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{GetString, ReadTxn, StateVector, Text, Transact, Update};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One y-protocols message as the server sent it.
#[derive(Debug)]
enum Msg {
    Step1(Vec<u8>),
    Step2(Vec<u8>),
    Update(Vec<u8>),
    /// Awareness, auth or a query: not looked at here.
    Other,
    Closed(u16),
}

fn write_var(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn read_var(bytes: &[u8], at: &mut usize) -> u64 {
    let (mut n, mut shift) = (0u64, 0);
    loop {
        let b = bytes[*at];
        *at += 1;
        n |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return n;
        }
        shift += 7;
    }
}

/// `[0 = sync, kind, varbuf(payload)]`.
fn sync_frame(kind: u64, payload: &[u8]) -> Message {
    let mut out = Vec::new();
    write_var(&mut out, 0);
    write_var(&mut out, kind);
    write_var(&mut out, payload.len() as u64);
    out.extend_from_slice(payload);
    Message::Binary(out.into())
}

fn decode(frame: &[u8]) -> Msg {
    let mut at = 0;
    if read_var(frame, &mut at) != 0 {
        return Msg::Other;
    }
    let kind = read_var(frame, &mut at);
    let len = read_var(frame, &mut at) as usize;
    let payload = frame[at..at + len].to_vec();
    match kind {
        0 => Msg::Step1(payload),
        1 => Msg::Step2(payload),
        _ => Msg::Update(payload),
    }
}

/// A y-websocket client of one document: a yrs document and a socket, nothing else.
struct RawPeer {
    ws: Ws,
    doc: yrs::Doc,
    /// Updates received outside sync step 2 (relayed updates and echoes), in order.
    updates: Vec<Vec<u8>>,
}

impl RawPeer {
    async fn connect(server: &str, doc: &str, token: &str) -> RawPeer {
        let url = format!("{server}/sync/{doc}?token={token}");
        let ws = tokio_tungstenite::connect_async(url).await.expect("connect").0;
        let mut peer = RawPeer { ws, doc: yrs::Doc::new(), updates: Vec::new() };
        peer.sync().await;
        peer
    }

    fn text(&self) -> String {
        self.doc.get_or_insert_text("content").get_string(&self.doc.transact())
    }

    /// The next message, applied to the document if it carries content; answers a step 1.
    async fn next(&mut self) -> Msg {
        let msg = loop {
            let frame = tokio::time::timeout(WAIT, self.ws.next()).await.expect("a message from the server");
            match frame {
                Some(Ok(Message::Binary(bytes))) => break decode(&bytes),
                Some(Ok(Message::Close(frame))) => break Msg::Closed(frame.map_or(1005, |f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => break Msg::Closed(1006),
            }
        };
        match &msg {
            Msg::Step1(sv) => {
                let sv = StateVector::decode_v1(sv).expect("a state vector");
                let diff = self.doc.transact().encode_state_as_update_v1(&sv);
                self.send(sync_frame(1, &diff)).await;
            }
            Msg::Step2(update) | Msg::Update(update) => {
                let update = Update::decode_v1(update).expect("an update");
                self.doc.transact_mut().apply_update(update).expect("applies");
            }
            Msg::Other | Msg::Closed(_) => {}
        }
        if let Msg::Update(update) = &msg {
            self.updates.push(update.clone());
        }
        msg
    }

    async fn send(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send");
    }

    /// Sends a sync step 1 and reads up to the step 2 that answers it: afterwards, everything
    /// the server sent this peer before that answer has been read. Returns the updates read.
    async fn sync(&mut self) -> Vec<Vec<u8>> {
        let sv = self.doc.transact().state_vector().encode_v1();
        self.send(sync_frame(0, &sv)).await;
        let seen = self.updates.len();
        loop {
            match self.next().await {
                Msg::Step2(_) => return self.updates[seen..].to_vec(),
                Msg::Closed(code) => panic!("closed ({code}) before the step 2"),
                _ => {}
            }
        }
    }

    /// Inserts `s` at the start, one transaction, sent as one update message; returns it.
    async fn insert(&mut self, s: &str) -> Vec<u8> {
        let update = {
            let text = self.doc.get_or_insert_text("content");
            let mut txn = self.doc.transact_mut();
            text.insert(&mut txn, 0, s);
            txn.encode_update_v1()
        };
        self.send(sync_frame(2, &update)).await;
        update
    }

    /// Reads until the text holds `s`.
    async fn wait_for(&mut self, s: &str) {
        while !self.text().contains(s) {
            if let Msg::Closed(code) = self.next().await {
                panic!("closed ({code}) before {s:?} arrived");
            }
        }
    }

    /// Reads until the server sends `update` back (the echo that confirms it).
    async fn wait_echo(&mut self, update: &[u8]) {
        while !self.updates.iter().any(|u| holds(u, update)) {
            if let Msg::Closed(code) = self.next().await {
                panic!("closed ({code}) before the echo arrived");
            }
        }
    }

    /// Whether the server has confirmed `update` to this peer, among what was read so far.
    fn echoed(&self, update: &[u8]) -> bool {
        self.updates.iter().any(|u| holds(u, update))
    }

    /// Reads until the server closes the socket; returns the close code.
    async fn closed(&mut self) -> u16 {
        loop {
            if let Msg::Closed(code) = self.next().await {
                return code;
            }
        }
    }
}

/// Whether `relayed` carries `update`'s blocks: the same client's, from the same clock on or
/// earlier. A peer's own client is in no one else's updates, so only an echo does.
fn holds(relayed: &[u8], update: &[u8]) -> bool {
    let (Ok(relayed), Ok(update)) = (Update::decode_v1(relayed), Update::decode_v1(update)) else {
        return false;
    };
    let have = relayed.state_vector_lower();
    update.state_vector_lower().iter().all(|(client, clock)| have.contains_client(client) && have.get(client) <= *clock)
}

fn project() -> String {
    format!("confirm{}", rand::rng().random_range(0..u32::MAX))
}

async fn serve(dir: &std::path::Path, database_url: &str) -> ServerProcess {
    Serve::new(dir).args(["--database-url", database_url]).start().await
}

/// Issue #14 item 11: a y-websocket writer's echo is its confirmation, so it comes only once the
/// write is saved: not while the store is stalled, and a kill -9 then loses nothing the writer
/// was told. Once the store is back the echo comes, and that edit survives a kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ywebsocket_writers_echo_means_saved_through_kill_9() {
    let postgres = PrivatePostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve(dir.path(), &postgres.url()).await;
    let project = project();
    let doc = format!("{project}/file");
    let token = server.tokens().editor(&project, "w");
    let mut writer = RawPeer::connect(&server.url(), &doc, &token).await;
    let mut reader = RawPeer::connect(&server.url(), &doc, &token).await;

    let stall = StoreStall::start(&postgres.url()).await;
    let stalled = writer.insert("stalled;").await;
    reader.wait_for("stalled;").await;
    // Whatever the server sent the writer along with the reader's copy has been read by now.
    writer.sync().await;
    let confirmed_during_stall = writer.echoed(&stalled);
    assert!(!confirmed_during_stall, "the echo (the confirmation) came while the store was stalled");
    server.kill();
    stall.release().await;
    server.restart().await;
    let mut checker = RawPeer::connect(&server.url(), &doc, &token).await;
    checker.sync().await;
    assert!(!checker.text().contains("stalled;"), "unconfirmed, and the writer has not resent it");

    let mut writer = RawPeer::connect(&server.url(), &doc, &token).await;
    let saved = writer.insert("saved;").await;
    writer.wait_echo(&saved).await;
    server.kill();
    server.restart().await;
    let mut checker = RawPeer::connect(&server.url(), &doc, &token).await;
    checker.sync().await;
    assert!(checker.text().contains("saved;"), "an echoed edit was lost to kill -9: {:?}", checker.text());
}

/// Issue #14 items 12 and 13: while the store is stalled, a writer on either endpoint whose own
/// edits are unconfirmed still sees the other's edits at once; both are confirmed once the store
/// is back, and then saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_store_stall_writers_on_both_endpoints_see_each_other() {
    let postgres = PrivatePostgres::start();
    let url = postgres.url();
    let mut server = TestServer::start_with(|c| c.database_url = Some(url)).await;
    let project = project();
    let doc = format!("{project}/file");
    let token = server.editor(&project, "w");
    let mut raw = RawPeer::connect(&server.url, &doc, &token).await;
    let mux = MuxConnection::connect(&server.url).await.unwrap();
    let hocus = mux.open(&doc, &token).await.unwrap();
    hocus.wait_synced(WAIT).await.unwrap();
    let all_confirmed = |p: &collab_client::DocPeer| p.status().applied == p.status().updates_sent + 1;
    hocus.wait_until("joined", WAIT, all_confirmed).await.unwrap();

    let stall = StoreStall::start(&postgres.url()).await;
    let mut raw_edits = Vec::new();
    for round in 0..3 {
        raw_edits.push(raw.insert(&format!("raw{round};")).await);
        hocus.wait_until("the raw writer's edit", WAIT, |p| p.text().contains(&format!("raw{round};"))).await.unwrap();
        hocus.insert(0, &format!("mux{round};"));
        raw.wait_for(&format!("mux{round};")).await;
    }
    raw.sync().await;
    assert!(!raw_edits.iter().any(|u| raw.echoed(u)), "the raw writer was confirmed while the store was stalled");
    assert_eq!(hocus.status().applied, 1, "the multiplexed writer was confirmed while the store was stalled");

    stall.release().await;
    for update in &raw_edits {
        raw.wait_echo(update).await;
    }
    hocus.wait_until("confirmed once the store is back", WAIT, all_confirmed).await.unwrap();
    let text = raw.text();
    assert_eq!(hocus.text(), text);
    drop((hocus, mux, raw));
    server.restart().await;
    let mut checker = RawPeer::connect(&server.url, &doc, &token).await;
    checker.sync().await;
    assert_eq!(checker.text(), text, "what was confirmed is saved");
    server.stop().await;
}

/// Issue #14 item 14: past the unsaved-backlog bound only a peer that brings something new is
/// refused; a fresh joiner (whose step 2 carries nothing) and a viewer stay connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_backlog_bound_only_real_writers_are_refused() {
    let postgres = PrivatePostgres::start();
    let url = postgres.url();
    let server = TestServer::start_with(|c| {
        c.database_url = Some(url);
        c.limits.max_unsaved_bytes = 1024;
    })
    .await;
    let project = project();
    let doc = format!("{project}/file");
    let token = server.editor(&project, "w");
    let mut writer = RawPeer::connect(&server.url, &doc, &token).await;

    let stall = StoreStall::start(&postgres.url()).await;
    writer.insert(&"x".repeat(2000)).await;
    server.eventually("past the bound", |s| s.metric("collab_unsaved_bytes") >= 1024.0).await;

    // A fresh editor: its handshake step 2 is empty, so it is no write.
    let mut joiner = RawPeer::connect(&server.url, &doc, &token).await;
    assert!(joiner.text().contains("xxxx"), "the joiner gets the document");
    joiner.sync().await;
    // A step 2 that repeats what the server holds is no write either.
    let known = joiner.doc.transact().encode_state_as_update_v1(&StateVector::default());
    joiner.send(sync_frame(1, &known)).await;
    joiner.sync().await;
    // A viewer that sends content is refused that write (as always) but stays connected.
    let viewer_token = server.token(&project, Role::Viewer, "v");
    let mut viewer = RawPeer::connect(&server.url, &doc, &viewer_token).await;
    viewer.insert("viewer;").await;
    viewer.sync().await;
    assert_eq!(server.metric("collab_writes_refused_total"), 0.0, "nobody was refused yet");

    // A real write is refused, and its writer disconnected.
    joiner.insert("new;").await;
    assert_eq!(joiner.closed().await, 1013);
    assert_eq!(server.metric("collab_writes_refused_total"), 1.0);
    stall.release().await;
    server.eventually("backlog saved", |s| s.metric("collab_unsaved_bytes") == 0.0).await;
    writer.sync().await;
    server.stop().await;
}

/// A gzip'd tar of `files` (path, text).
fn tar_gz(files: &[(&str, &str)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (path, text) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, path, text.as_bytes()).expect("tar member");
    }
    tar.into_inner().expect("tar").finish().expect("gzip")
}

/// The project's files and texts, as the server holds them now.
async fn files_of(server: &TestServer, project: &str) -> Vec<(String, String)> {
    let files = collab_server::project::read_files(&server.app().rooms, project).await.expect("read the project");
    let mut files: Vec<(String, String)> = files.into_iter().map(|f| (f.path, f.text)).collect();
    files.sort();
    files
}

fn owned(files: &[(&str, &str)]) -> Vec<(String, String)> {
    files.iter().map(|(p, t)| ((*p).to_owned(), (*t).to_owned())).collect()
}

/// Issue #14 item 15: an import or a restore while the store is stalled answers 503 within its
/// bound (`project::SAVE_WAIT`) instead of hanging, and then completes on its own once the store
/// is back: every file with its text, nothing half done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_and_restores_during_a_store_stall_answer_503_in_time_and_complete_once_it_is_back() {
    let postgres = PrivatePostgres::start();
    let url = postgres.url();
    let server = TestServer::start_with(|c| c.database_url = Some(url)).await;
    let project = project();
    let token = server.editor(&project, "w");
    let import = format!("/api/projects/{project}/import");
    let first = [("a.txt", "first")];
    let (status, _) = http(&server, "POST", &import, &token, &tar_gz(&first)).await;
    assert_eq!(status, 200);
    let (status, body) =
        http(&server, "POST", &format!("/api/projects/{project}/checkpoints?name=one"), &token, b"").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let checkpoint = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["id"].as_i64().unwrap();
    let bound = collab_server::project::SAVE_WAIT + std::time::Duration::from_secs(5);

    let stall = StoreStall::start(&postgres.url()).await;
    let second = [("a.txt", "second"), ("b.txt", "new"), ("c/d.txt", "deep")];
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(bound, http(&server, "POST", &import, &token, &tar_gz(&second))).await;
    let (status, body) = answer.expect("the import answered within its bound while the store is stalled");
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    eprintln!("import answered 503 after {:?}", started.elapsed());
    stall.release().await;
    let want = owned(&second);
    common::until_async("the import completes", || async { files_of(&server, &project).await == want }).await;

    let stall = StoreStall::start(&postgres.url()).await;
    let restore = format!("/api/projects/{project}/checkpoints/{checkpoint}/restore");
    let answer = tokio::time::timeout(bound, http(&server, "POST", &restore, &token, b"")).await;
    let (status, body) = answer.expect("the restore answered within its bound while the store is stalled");
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    stall.release().await;
    // The checkpoint held only a.txt: the others leave the tree, a.txt gets its old text back.
    let want = owned(&first);
    common::until_async("the restore completes", || async { files_of(&server, &project).await == want }).await;
    server.stop().await;
}

/// A writer's echoes held through an outage all arrive once the store is back, merged (a frame
/// per commit), and the writer stays connected with an outbound queue of 8 frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_store_stall_a_writers_held_echoes_arrive_as_one_frame() {
    let postgres = PrivatePostgres::start();
    let url = postgres.url();
    let server = TestServer::start_with(|c| {
        c.database_url = Some(url);
        c.limits.outbound_queue = 8;
    })
    .await;
    let project = project();
    let doc = format!("{project}/file");
    let token = server.editor(&project, "w");
    let mut writer = RawPeer::connect(&server.url, &doc, &token).await;
    let mut reader = RawPeer::connect(&server.url, &doc, &token).await;
    let stall = StoreStall::start(&postgres.url()).await;
    let mut edits = Vec::new();
    for i in 0..40 {
        // Each edit once the one before reached the reader: each is a batch of its own.
        edits.push(writer.insert(&format!("e{i};")).await);
        reader.wait_for(&format!("e{i};")).await;
    }
    writer.sync().await;
    assert!(!edits.iter().any(|u| writer.echoed(u)), "confirmed while the store was stalled");
    let before = writer.updates.len();
    stall.release().await;
    writer.wait_echo(edits.last().unwrap()).await;
    assert!(edits.iter().all(|u| writer.echoed(u)), "every edit is confirmed");
    // One frame per commit: the one in flight when the store stalled, and the next, which takes
    // everything held meanwhile.
    let frames = writer.updates.len() - before;
    assert!(frames <= 2, "40 held echoes came in {frames} frames");
    writer.sync().await;
    server.stop().await;
}
