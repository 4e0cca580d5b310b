//! The exec channel end to end, on a real server whose bridge runs programs in a real sandbox:
//! bubblewrap (`local`) and Docker (`docker`, needs dockerd and the runtime image that
//! `cargo xtask test` builds). Every test runs on both.

mod common;

use std::time::Duration;

use collab_server::archive::ArchiveFile;
use collab_server::exec::SandboxKind;
use common::{TestServer, WAIT};
use exec_bridge::protocol::{ClientMsg, Data, ServerMsg};
use futures_util::{SinkExt, StreamExt};
use sync_core::Role;
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A peer of the exec channel that records everything it receives.
struct ExecPeer {
    socket: Socket,
    seen: Vec<ServerMsg>,
}

impl ExecPeer {
    async fn connect(server: &TestServer, project: &str, role: Role, user: &str) -> ExecPeer {
        let token = server.token(project, role, user);
        let url = format!("{}/exec/{project}?token={token}", server.url);
        let (socket, _) = tokio_tungstenite::connect_async(url).await.expect("exec socket opens");
        let mut peer = ExecPeer { socket, seen: Vec::new() };
        peer.until("the hello", |m| matches!(m, ServerMsg::Hello { .. })).await;
        peer
    }

    async fn send(&mut self, msg: &ClientMsg) {
        let text = serde_json::to_string(msg).expect("serialize");
        self.socket.send(Message::text(text)).await.expect("send");
    }

    async fn send_raw(&mut self, msg: Message) {
        self.socket.send(msg).await.expect("send");
    }

    /// Receives until a message satisfies `pred`; returns it.
    async fn until(&mut self, what: &str, pred: impl Fn(&ServerMsg) -> bool) -> ServerMsg {
        if let Some(found) = self.seen.iter().find(|m| pred(m)) {
            return found.clone();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {:?}", self.summary()));
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("socket ended waiting for {what}: {other:?}"),
            };
            let msg: ServerMsg = serde_json::from_str(&text).expect("server messages parse");
            self.seen.push(msg.clone());
            if pred(&msg) {
                return msg;
            }
        }
    }

    /// Everything a terminal printed so far (hello scrollback and live output).
    fn term_text(&self, term: u64) -> String {
        let mut bytes = Vec::new();
        for msg in &self.seen {
            match msg {
                ServerMsg::Hello { terms, .. } => {
                    for t in terms.iter().filter(|t| t.term == term) {
                        bytes.extend_from_slice(&t.scrollback.0);
                    }
                }
                ServerMsg::TermOutput { term: t, data } if *t == term => bytes.extend_from_slice(&data.0),
                _ => {}
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Everything a run printed so far (both streams).
    fn run_text(&self, run: u64) -> String {
        let mut bytes = Vec::new();
        for msg in &self.seen {
            match msg {
                ServerMsg::Hello { runs, .. } => {
                    for r in runs.iter().filter(|r| r.run == run) {
                        r.history.iter().for_each(|c| bytes.extend_from_slice(&c.data.0));
                    }
                }
                ServerMsg::RunOutput { run: r, data, .. } if *r == run => bytes.extend_from_slice(&data.0),
                _ => {}
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    async fn until_term_text(&mut self, term: u64, needle: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.term_text(term).contains(needle) {
            assert!(tokio::time::Instant::now() < deadline, "no {needle:?} in terminal: {:?}", self.term_text(term));
            let _ = tokio::time::timeout(Duration::from_millis(200), self.until("output", |_| false)).await;
        }
    }

    async fn until_error(&mut self, containing: &str) -> String {
        let before = self.seen.len();
        let msg = self
            .until(
                &format!("an error about {containing:?}"),
                |m| matches!(m, ServerMsg::Error { message } if message.contains(containing)),
            )
            .await;
        let _ = before;
        match msg {
            ServerMsg::Error { message } => message,
            _ => unreachable!(),
        }
    }

    fn summary(&self) -> Vec<String> {
        self.seen.iter().rev().take(8).map(|m| format!("{m:?}").chars().take(200).collect()).collect()
    }
}

async fn server(kind: SandboxKind) -> TestServer {
    TestServer::start_with(|c| {
        c.sandbox = kind;
        c.exec_idle = Duration::from_secs(600);
    })
    .await
}

async fn write(server: &TestServer, project: &str, files: &[(&str, &str)]) {
    let files: Vec<ArchiveFile> =
        files.iter().map(|(path, text)| ArchiveFile { path: (*path).to_owned(), text: (*text).to_owned() }).collect();
    collab_server::project::write_files(&server.app().rooms, project, &files).await.expect("files written");
}

/// Waits until the bridge wrote `path` with `text` into the project's workspace.
async fn until_in_workspace(server: &TestServer, project: &str, path: &str, text: &str) {
    let file = server.app().exec.workspace(project).join(path);
    common::until(&format!("{path} in the workspace"), || std::fs::read_to_string(&file).is_ok_and(|t| t == text))
        .await;
}

fn run_id(msg: &ServerMsg) -> u64 {
    match msg {
        ServerMsg::RunStarted { run, .. } | ServerMsg::RunFinished { run, .. } => *run,
        other => panic!("not a run message: {other:?}"),
    }
}

fn term_id(msg: &ServerMsg) -> u64 {
    match msg {
        ServerMsg::TermOpened { term, .. } => *term,
        other => panic!("not a terminal message: {other:?}"),
    }
}

const ASK_NAME: &str = "import sys\nprint('ready', flush=True)\nname = input()\nprint('hello', name)\nsys.exit(3)\n";

/// A run one peer starts is watched live by the others, takes stdin from another editor, and
/// is replayed with its verdict to a peer that joins later. Viewers cannot start one.
async fn run_watched_live_and_replayed(kind: SandboxKind) {
    let server = server(kind).await;
    write(&server, "p1", &[("main.py", ASK_NAME)]).await;
    let mut ann = ExecPeer::connect(&server, "p1", Role::Editor, "ann").await;
    let mut bob = ExecPeer::connect(&server, "p1", Role::Editor, "bob").await;
    let mut viv = ExecPeer::connect(&server, "p1", Role::Viewer, "viv").await;
    until_in_workspace(&server, "p1", "main.py", ASK_NAME).await;

    viv.send(&ClientMsg::Run {}).await;
    viv.until_error("viewers").await;

    ann.send(&ClientMsg::Run {}).await;
    let started = bob.until("run started", |m| matches!(m, ServerMsg::RunStarted { .. })).await;
    let run = run_id(&started);
    assert!(
        matches!(&started, ServerMsg::RunStarted { by, command, .. } if by == "ANN" && command.contains("main.py"))
    );
    ann.send(&ClientMsg::Run {}).await;
    ann.until_error("already going").await;
    bob.until("ready", |m| matches!(m, ServerMsg::RunOutput { data, .. } if data.0.starts_with(b"ready"))).await;
    viv.send(&ClientMsg::Stdin { run, data: Data(b"mallory\n".to_vec()) }).await;
    viv.until_error("viewers").await;
    bob.send(&ClientMsg::Stdin { run, data: Data(b"bob\n".to_vec()) }).await;
    for peer in [&mut ann, &mut bob, &mut viv] {
        let finished = peer.until("run finished", |m| matches!(m, ServerMsg::RunFinished { .. })).await;
        let ServerMsg::RunFinished { verdict, .. } = finished else { unreachable!() };
        assert_eq!((verdict.kind.as_str(), verdict.code), ("exited", Some(3)), "{verdict:?}");
        assert_eq!(peer.run_text(run), "ready\nhello bob\n");
    }

    let late = ExecPeer::connect(&server, "p1", Role::Viewer, "late").await;
    let ServerMsg::Hello { runs, role, .. } = &late.seen[0] else { panic!("hello first") };
    assert_eq!(role, "viewer");
    let replayed = runs.iter().find(|r| r.run == run).expect("the run is replayed");
    assert_eq!(replayed.verdict.as_ref().map(|v| v.code), Some(Some(3)));
    assert_eq!(late.run_text(run), "ready\nhello bob\n");
    server.stop().await;
}

/// An edit reaches the workspace; a file the program writes comes back into the documents.
async fn files_flow_both_ways(kind: SandboxKind) {
    let server = server(kind).await;
    write(&server, "p2", &[("main.py", "print('one')\n")]).await;
    let mut ann = ExecPeer::connect(&server, "p2", Role::Editor, "ann").await;
    until_in_workspace(&server, "p2", "main.py", "print('one')\n").await;
    let program = "open('out.txt', 'w').write('written by the program\\n')\nprint('two')\n";
    write(&server, "p2", &[("main.py", program)]).await;
    until_in_workspace(&server, "p2", "main.py", program).await;
    ann.send(&ClientMsg::Run {}).await;
    let finished = ann.until("run finished", |m| matches!(m, ServerMsg::RunFinished { .. })).await;
    assert_eq!(ann.run_text(run_id(&finished)), "two\n");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let files = collab_server::project::read_files(&server.app().rooms, "p2").await.expect("read");
        if files.iter().any(|f| f.path == "out.txt" && f.text == "written by the program\n") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "out.txt never reached the documents");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

/// A shared terminal: both editors see the echo, a viewer's keystrokes are refused, resize
/// works, and the terminal outlives its opener's connection with its scrollback replayed.
async fn shared_terminal(kind: SandboxKind) {
    let server = server(kind).await;
    write(&server, "p3", &[("notes.txt", "hi\n")]).await;
    let mut ann = ExecPeer::connect(&server, "p3", Role::Editor, "ann").await;
    let mut bob = ExecPeer::connect(&server, "p3", Role::Editor, "bob").await;
    let mut viv = ExecPeer::connect(&server, "p3", Role::Viewer, "viv").await;
    viv.send(&ClientMsg::TermOpen { cols: 80, rows: 24 }).await;
    viv.until_error("viewers").await;
    ann.send(&ClientMsg::TermOpen { cols: 0, rows: 24 }).await;
    ann.until_error("columns").await;

    ann.send(&ClientMsg::TermOpen { cols: 80, rows: 24 }).await;
    let term = term_id(&bob.until("terminal opened", |m| matches!(m, ServerMsg::TermOpened { .. })).await);
    ann.send(&ClientMsg::TermInput { term, data: Data(b"echo hi-$((6*7))\n".to_vec()) }).await;
    for peer in [&mut ann, &mut bob, &mut viv] {
        peer.until_term_text(term, "hi-42").await;
    }
    viv.send(&ClientMsg::TermInput { term, data: Data(b"echo viewer-$((2*3))\n".to_vec()) }).await;
    viv.until_error("viewers").await;
    ann.send(&ClientMsg::TermResize { term, cols: 100, rows: 30 }).await;
    bob.until("resized", |m| matches!(m, ServerMsg::TermResized { cols: 100, rows: 30, .. })).await;
    bob.send(&ClientMsg::TermInput { term, data: Data(b"stty size; echo done-$((1+1))\n".to_vec()) }).await;
    viv.until_term_text(term, "done-2").await;
    assert!(viv.term_text(term).contains("30 100"), "stty size after resize: {:?}", viv.term_text(term));
    assert!(!viv.term_text(term).contains("viewer-6"), "a viewer's keystrokes ran");

    // A second terminal, then the opener leaves: both terminals live on, replayed on join.
    ann.send(&ClientMsg::TermOpen { cols: 80, rows: 24 }).await;
    let second = term_id(
        &bob.until("second terminal", |m| matches!(m, ServerMsg::TermOpened { term: t, .. } if *t != term)).await,
    );
    drop(ann);
    let mut cat = ExecPeer::connect(&server, "p3", Role::Editor, "cat").await;
    let ServerMsg::Hello { terms, .. } = &cat.seen[0] else { panic!("hello first") };
    assert_eq!(terms.iter().filter(|t| t.exit_code.is_none()).count(), 2, "{terms:?}");
    assert!(cat.term_text(term).contains("hi-42"));
    cat.send(&ClientMsg::TermInput { term: second, data: Data(b"cat notes.txt; exit 4\n".to_vec()) }).await;
    let exited =
        bob.until("second exits", |m| matches!(m, ServerMsg::TermExited { term: t, .. } if *t == second)).await;
    assert_eq!(exited, ServerMsg::TermExited { term: second, exit_code: Some(4) });
    cat.send(&ClientMsg::TermInput { term: second, data: Data(b"ls\n".to_vec()) }).await;
    cat.until_error("ended").await;
    server.stop().await;
}

/// `yes` in a terminal neither stalls the server nor exhausts memory: a peer that never reads
/// is disconnected, another project's terminal answers meanwhile, and the scrollback is capped.
async fn flow_control(kind: SandboxKind) {
    let server = server(kind).await;
    let mut ann = ExecPeer::connect(&server, "p4", Role::Editor, "ann").await;
    let mut other = ExecPeer::connect(&server, "p5", Role::Editor, "oli").await;
    // A peer that reads nothing at all.
    let token = server.token("p4", Role::Viewer, "sloth");
    let (mut sloth, _) =
        tokio_tungstenite::connect_async(format!("{}/exec/p4?token={token}", server.url)).await.expect("connect");

    ann.send(&ClientMsg::TermOpen { cols: 80, rows: 24 }).await;
    let term = term_id(&ann.until("terminal opened", |m| matches!(m, ServerMsg::TermOpened { .. })).await);
    ann.send(&ClientMsg::TermInput { term, data: Data(b"yes flood\n".to_vec()) }).await;
    ann.until_term_text(term, "flood\r\nflood").await;

    other.send(&ClientMsg::TermOpen { cols: 80, rows: 24 }).await;
    let t2 = term_id(&other.until("other terminal", |m| matches!(m, ServerMsg::TermOpened { .. })).await);
    other.send(&ClientMsg::TermInput { term: t2, data: Data(b"echo calm-$((5*5))\n".to_vec()) }).await;
    other.until_term_text(t2, "calm-25").await;

    // The sloth is cut off: once its buffer is full the server closes its socket.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut read = 0usize;
    loop {
        match tokio::time::timeout_at(deadline, sloth.next()).await.expect("the slow peer is disconnected") {
            Some(Ok(Message::Text(t))) => read += t.len(),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
        if read == 0 {
            // Reading nothing for a while first: this peer is the slow one.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }

    ann.send(&ClientMsg::TermInput { term, data: Data(vec![3]) }).await; // Ctrl-C
    ann.send(&ClientMsg::TermClose { term }).await;
    ann.until("terminal exits", |m| matches!(m, ServerMsg::TermExited { term: t, .. } if *t == term)).await;
    let late = ExecPeer::connect(&server, "p4", Role::Viewer, "late").await;
    let ServerMsg::Hello { terms, .. } = &late.seen[0] else { panic!("hello first") };
    let scrollback = terms.iter().find(|t| t.term == term).expect("terminal kept").scrollback.0.len();
    assert!(scrollback <= exec_bridge::session::SCROLLBACK_BYTES && scrollback > 100_000, "scrollback {scrollback}");
    server.stop().await;
}

/// Hostile and broken input: each gets a clear error (or a refused upgrade) and changes nothing.
async fn bad_input(kind: SandboxKind) {
    let server = server(kind).await;
    let wrong_project = server.token("elsewhere", Role::Editor, "eve");
    for token in ["not-a-token", "", &wrong_project] {
        let refused = tokio_tungstenite::connect_async(format!("{}/exec/p6?token={token}", server.url)).await;
        match refused {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
            other => panic!("token {token:?} was not refused: {other:?}"),
        }
    }
    let mut eve = ExecPeer::connect(&server, "p6", Role::Editor, "eve").await;
    eve.send_raw(Message::text("{not json")).await;
    eve.until_error("not a valid exec message").await;
    eve.send_raw(Message::text(r#"{"type":"term_input","term":99,"data":"aGk="}"#)).await;
    eve.until_error("no terminal 99").await;
    eve.send_raw(Message::binary(vec![1, 2, 3])).await;
    eve.until_error("JSON text").await;
    eve.send(&ClientMsg::Run {}).await;
    eve.until_error("nothing to run").await;
    eve.send_raw(Message::text("x".repeat(200_000))).await;
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match eve.socket.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "an oversized message closes the socket");
    // The project still works for others.
    write(&server, "p6", &[("main.py", "print('still fine')\n")]).await;
    let mut ann = ExecPeer::connect(&server, "p6", Role::Editor, "ann").await;
    until_in_workspace(&server, "p6", "main.py", "print('still fine')\n").await;
    ann.send(&ClientMsg::Run {}).await;
    let finished = ann.until("run finished", |m| matches!(m, ServerMsg::RunFinished { .. })).await;
    assert_eq!(ann.run_text(run_id(&finished)), "still fine\n");
    server.stop().await;
}

macro_rules! on_both_sandboxes {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::SandboxKind::Local).await })*
        }
        mod docker {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::SandboxKind::Docker).await })*
        }
    };
}

on_both_sandboxes!(run_watched_live_and_replayed, files_flow_both_ways, shared_terminal, flow_control, bad_input);
