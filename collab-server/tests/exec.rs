//! The exec channel end to end, on a real server whose bridge runs programs in a real sandbox:
//! bubblewrap (`local`) and Docker (`docker`, needs dockerd and the runtime image that
//! `cargo xtask test` builds). Every test runs on both.

mod common;

use std::time::Duration;

use collab_server::archive::ArchiveFile;
use collab_server::exec::SandboxKind;
use collab_test_support::http;
use common::exec_peer::ExecPeer;
use common::{TestServer, WAIT};
use exec_bridge::protocol::{ClientMsg, Data, ServerMsg};
use futures_util::{SinkExt, StreamExt};
use sync_core::Role;
use tokio_tungstenite::tungstenite::Message;

async fn connect(server: &TestServer, project: &str, role: Role, user: &str) -> ExecPeer {
    ExecPeer::connect(&server.url, project, &server.token(project, role, user)).await
}

async fn server(kind: SandboxKind) -> TestServer {
    TestServer::start_with(|c| {
        c.sandbox = kind;
        c.exec_idle = Duration::from_secs(600);
        c.exec_send_timeout = Duration::from_secs(1);
        c.preview_listen = Some("127.0.0.1:0".parse().expect("an address"));
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
    let mut ann = connect(&server, "p1", Role::Editor, "ann").await;
    let mut bob = connect(&server, "p1", Role::Editor, "bob").await;
    let mut viv = connect(&server, "p1", Role::Viewer, "viv").await;
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

    let late = connect(&server, "p1", Role::Viewer, "late").await;
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
    let mut ann = connect(&server, "p2", Role::Editor, "ann").await;
    until_in_workspace(&server, "p2", "main.py", "print('one')\n").await;
    let program = "open('out.txt', 'w').write('written by the program\\n')\nprint('two')\n";
    write(&server, "p2", &[("main.py", program)]).await;
    until_in_workspace(&server, "p2", "main.py", program).await;
    ann.send(&ClientMsg::Run {}).await;
    let finished = ann.until("run finished", |m| matches!(m, ServerMsg::RunFinished { .. })).await;
    assert_eq!(ann.run_text(run_id(&finished)), "two\n");
    common::until_async("out.txt in the documents", || async {
        let files = collab_server::project::read_files(&server.app().rooms, "p2").await.expect("read");
        files.iter().any(|f| f.path == "out.txt" && f.text == "written by the program\n")
    })
    .await;
    server.stop().await;
}

/// A project past the 256 documents one person's socket may open: the bridge (a server peer,
/// its token marked as a service's) mirrors every file, Run sees them all, and 300 files a
/// program writes all reach the documents with their content.
async fn a_project_of_many_files_runs_and_takes_back_what_it_writes(kind: SandboxKind) {
    let server = server(kind).await;
    let mut files: Vec<(String, String)> = (0..400).map(|i| (format!("data/f{i:03}.txt"), format!("{i}\n"))).collect();
    let program = "import glob, os\n\
print(len(glob.glob('data/*.txt')), sum(int(open(p).read()) for p in glob.glob('data/*.txt')))\n\
os.makedirs('out', exist_ok=True)\n\
[open('out/o%03d.txt' % i, 'w').write('out %d\\n' % i) for i in range(300)]\n";
    files.push(("main.py".to_owned(), program.to_owned()));
    let refs: Vec<(&str, &str)> = files.iter().map(|(p, t)| (p.as_str(), t.as_str())).collect();
    write(&server, "many", &refs).await;
    let mut ann = connect(&server, "many", Role::Editor, "ann").await;
    until_in_workspace(&server, "many", "data/f399.txt", "399\n").await;
    ann.send(&ClientMsg::Run {}).await;
    let finished = ann.until("run finished", |m| matches!(m, ServerMsg::RunFinished { .. })).await;
    assert_eq!(ann.run_text(run_id(&finished)), format!("400 {}\n", (0..400).sum::<u32>()));
    common::until_async("all 300 written files in the documents with their text", || async {
        let files = collab_server::project::read_files(&server.app().rooms, "many").await.expect("read");
        let out: Vec<_> = files.iter().filter(|f| f.path.starts_with("out/")).collect();
        out.len() == 300
            && out.iter().all(|f| {
                f.path
                    .strip_prefix("out/o")
                    .and_then(|n| n.strip_suffix(".txt"))
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| f.text == format!("out {n}\n"))
            })
    })
    .await;
    server.stop().await;
}

/// A run requested right after an edit reached the server runs the edited program, even when
/// the bridge has not written the edit out yet.
async fn run_sees_the_latest_edit(kind: SandboxKind) {
    let server = server(kind).await;
    write(&server, "p9", &[("main.py", "print('first')\n")]).await;
    let mut ann = connect(&server, "p9", Role::Editor, "ann").await;
    for i in 0..5 {
        write(&server, "p9", &[("main.py", &format!("print({i} * 11)\n"))]).await;
        ann.seen.clear();
        ann.send(&ClientMsg::Run {}).await;
        let finished = ann.until("run finished", |m| matches!(m, ServerMsg::RunFinished { .. })).await;
        assert_eq!(ann.run_text(run_id(&finished)), format!("{}\n", i * 11));
    }
    server.stop().await;
}

/// A shared terminal: both editors see the echo, a viewer's keystrokes are refused, resize
/// works, and the terminal outlives its opener's connection with its scrollback replayed.
async fn shared_terminal(kind: SandboxKind) {
    let server = server(kind).await;
    write(&server, "p3", &[("notes.txt", "hi\n")]).await;
    let mut ann = connect(&server, "p3", Role::Editor, "ann").await;
    let mut bob = connect(&server, "p3", Role::Editor, "bob").await;
    let mut viv = connect(&server, "p3", Role::Viewer, "viv").await;
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
    let mut cat = connect(&server, "p3", Role::Editor, "cat").await;
    let ServerMsg::Hello { terms, .. } = &cat.seen[0] else { panic!("hello first") };
    assert_eq!(terms.iter().filter(|t| !t.exited).count(), 2, "{terms:?}");
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
    let mut ann = connect(&server, "p4", Role::Editor, "ann").await;
    let mut other = connect(&server, "p5", Role::Editor, "oli").await;
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

    // The sloth reads nothing while Ann keeps up with 8 MiB of the flood: by then its socket is
    // full and the server has given up on it (after the 1 s send timeout). Then it drains what
    // was buffered and must come to the end of its socket.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while ann.term_bytes(term) < 8 << 20 {
        assert!(tokio::time::Instant::now() < deadline, "the flood stalled at {} bytes", ann.term_bytes(term));
        let _ = tokio::time::timeout(Duration::from_millis(200), ann.until("output", |_| false)).await;
        ann.forget_output();
    }
    loop {
        match tokio::time::timeout_at(deadline, sloth.next()).await.expect("the slow peer is disconnected") {
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }

    ann.send(&ClientMsg::TermInput { term, data: Data(vec![3]) }).await; // Ctrl-C
    ann.send(&ClientMsg::TermClose { term }).await;
    ann.until("terminal exits", |m| matches!(m, ServerMsg::TermExited { term: t, .. } if *t == term)).await;
    let late = connect(&server, "p4", Role::Viewer, "late").await;
    let ServerMsg::Hello { terms, .. } = &late.seen[0] else { panic!("hello first") };
    let closed = terms.iter().find(|t| t.term == term).expect("terminal kept");
    assert!(closed.exited, "a closed terminal is replayed as ended");
    let scrollback = closed.scrollback.0.len();
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
    let mut eve = connect(&server, "p6", Role::Editor, "eve").await;
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
    let mut ann = connect(&server, "p6", Role::Editor, "ann").await;
    until_in_workspace(&server, "p6", "main.py", "print('still fine')\n").await;
    ann.send(&ClientMsg::Run {}).await;
    let finished = ann.until("run finished", |m| matches!(m, ServerMsg::RunFinished { .. })).await;
    assert_eq!(ann.run_text(run_id(&finished)), "still fine\n");
    server.stop().await;
}

const WS_ECHO: &str = r#"import base64, hashlib, socket
def exactly(c, n):
    data = b''
    while len(data) < n:
        data += c.recv(n - len(data))
    return data
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('', 8001))
s.listen()
while True:
    c, _ = s.accept()
    request = b''
    while b'\r\n\r\n' not in request:
        request += c.recv(4096)
    key = [l.split(b':', 1)[1].strip() for l in request.split(b'\r\n') if l.lower().startswith(b'sec-websocket-key')][0]
    accept = base64.b64encode(hashlib.sha1(key + b'258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest())
    c.sendall(b'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ' + accept + b'\r\n\r\n')
    head = exactly(c, 2)
    mask = exactly(c, 4)
    data = bytes(b ^ mask[i % 4] for i, b in enumerate(exactly(c, head[1] & 127)))
    c.sendall(bytes([0x81, len(data) + 5]) + b'echo:' + data)
"#;

/// `GET path` with one optional extra header (`(name, value)`); returns the status, the
/// headers as `name: value` lines (names lowercase) and the body.
async fn get(server: &TestServer, path: &str, extra: Option<(&str, &str)>) -> (u16, String, String) {
    let mut request = http::Request::new("GET", path);
    if let Some((name, value)) = extra {
        request = request.header(name, value);
    }
    let response = request.send(&preview_addr(server)).await.expect("a response");
    (response.status, response.header_lines(), response.text())
}

/// `host:port` of the server's preview listener.
fn preview_addr(server: &TestServer) -> String {
    server.app().preview.as_ref().expect("previews are on").addr.to_string()
}

/// A Python HTTP server and a WebSocket echo started in a terminal are reachable through
/// `/preview/{project}/{port}/` on the preview listener, by project members only, without the
/// token reaching them.
async fn live_preview(kind: SandboxKind) {
    let server = server(kind).await;
    write(&server, "p7", &[("index.html", "<h1>preview works</h1>\n"), ("ws_echo.py", WS_ECHO)]).await;
    let mut ann = connect(&server, "p7", Role::Editor, "ann").await;
    until_in_workspace(&server, "p7", "ws_echo.py", WS_ECHO).await;
    ann.send(&ClientMsg::TermOpen { cols: 120, rows: 24 }).await;
    let term = term_id(&ann.until("terminal opened", |m| matches!(m, ServerMsg::TermOpened { .. })).await);
    ann.send(&ClientMsg::TermInput {
        term,
        data: Data(b"python3 ws_echo.py & python3 -m http.server 8000\n".to_vec()),
    })
    .await;
    ann.until_term_text(term, "Serving HTTP").await;

    let token = server.token("p7", Role::Viewer, "viv");
    let (status, headers, _) = get(&server, &format!("/preview/p7/8000/index.html?token={token}&v=1"), None).await;
    assert_eq!(status, 307, "{headers}");
    assert!(headers.contains("location: /preview/p7/8000/index.html?v=1"), "{headers}");
    let cookie = headers
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a cookie")
        .to_owned();
    let (status, headers, body) = get(&server, "/preview/p7/8000/index.html?v=1", Some(("cookie", &cookie))).await;
    assert_eq!((status, body.as_str()), (200, "<h1>preview works</h1>\n"), "{headers}");
    assert!(!headers.contains("content-security-policy"), "{headers}");
    // The program's own log shows the request as it got it: no token.
    ann.until_term_text(term, "GET /index.html?v=1").await;
    assert!(!ann.term_text(term).contains(&token[..20]), "the token reached the program");

    let (status, _, _) = get(&server, "/preview/p7/8000/index.html", None).await;
    assert_eq!(status, 401, "no token");
    let stranger = server.token("p8", Role::Editor, "eve");
    let (status, _, _) = get(&server, &format!("/preview/p7/8000/?token={stranger}"), None).await;
    assert_eq!(status, 401, "another project's token");
    let bearer = format!("Bearer {token}");
    let (status, _, body) = get(&server, "/preview/p7/8999/", Some(("authorization", &bearer))).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("8999"), "{body}");

    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request =
        format!("ws://{}/preview/p7/8001/", preview_addr(&server)).into_client_request().expect("request");
    request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().expect("header"));
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.expect("websocket through the preview");
    socket.send(Message::text("ping")).await.expect("send");
    let echo = tokio::time::timeout(WAIT, socket.next()).await.expect("echo in time");
    assert_eq!(echo.expect("a frame").expect("a frame").into_text().expect("text").as_str(), "echo:ping");
    server.stop().await;
}

/// Whether the Docker container named `name` exists.
fn container_exists(name: &str) -> bool {
    let status = std::process::Command::new("docker")
        .args(["container", "inspect", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the docker client runs");
    status.success()
}

/// Docker only: a project's container is started when its first peer arrives (so the first run
/// is warm), stopped once the project is idle, and started again by the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_containers_start_warm_and_stop_when_idle() {
    let server = TestServer::start_with(|c| {
        c.sandbox = SandboxKind::Docker;
        c.exec_idle = Duration::from_secs_f64(0.4);
        c.sandbox_idle = Duration::from_secs(1);
    })
    .await;
    write(&server, "p10", &[("main.py", "print('warm')\n")]).await;
    let mut ann = connect(&server, "p10", Role::Editor, "ann").await;
    let workspace = server.app().exec.workspace("p10");
    std::fs::create_dir_all(&workspace).expect("workspace");
    let name = exec_bridge::sandbox::docker::DockerSandbox::container_name(&workspace.canonicalize().expect("exists"));
    common::until("the container started before any run", || container_exists(&name)).await;
    common::until("the idle container stopped", || !container_exists(&name)).await;
    ann.send(&ClientMsg::Run {}).await;
    let finished = ann.until("run finished", |m| matches!(m, ServerMsg::RunFinished { .. })).await;
    assert_eq!(ann.run_text(run_id(&finished)), "warm\n");
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

on_both_sandboxes!(
    run_watched_live_and_replayed,
    a_project_of_many_files_runs_and_takes_back_what_it_writes,
    run_sees_the_latest_edit,
    files_flow_both_ways,
    shared_terminal,
    flow_control,
    bad_input,
    live_preview
);
