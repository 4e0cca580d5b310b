//! A project's session as its peers share it, on the local sandbox: what outlives its audience.

use std::sync::Arc;
use std::time::{Duration, Instant};

use exec_bridge::peer::PrepareRequest;
use exec_bridge::protocol::{ClientMsg, Data, ServerMsg};
use exec_bridge::sandbox::Sandbox;
use exec_bridge::sandbox::local::{LocalSandbox, LocalSandboxConfig};
use exec_bridge::session::{Actor, Session, SessionConfig, Subscription};
use sync_core::Role;
use tokio::sync::mpsc;

const PATIENCE: Duration = Duration::from_secs(60);

fn sandbox() -> Arc<dyn Sandbox> {
    Arc::new(LocalSandbox::new(LocalSandboxConfig::default()).expect("bubblewrap and GNU time are installed"))
}

fn editor() -> Actor {
    Actor { name: "ada".into(), role: Role::Editor }
}

/// A session on a fresh workspace whose terminals close after `terminal_idle` without a peer;
/// the prepare channel is kept open (no run is started here).
fn session(workspace: &std::path::Path, terminal_idle: Duration) -> (Arc<Session>, mpsc::Receiver<PrepareRequest>) {
    let mut config = SessionConfig::new(sandbox(), workspace.to_owned());
    config.terminal_idle = terminal_idle;
    let (prepare, requests) = mpsc::channel(1);
    (Session::new(config, prepare), requests)
}

/// The next event of `events` that `pick` takes, within [`PATIENCE`].
async fn next<T>(events: &mut Subscription, mut pick: impl FnMut(ServerMsg) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv()).await.expect("an event in time").expect("open");
        if let Some(found) = pick(event) {
            return found;
        }
    }
}

/// Waits until the terminal `term` printed `marker`.
async fn printed(events: &mut Subscription, term: u64, marker: &str) {
    let mut text = String::new();
    next(events, |event| match event {
        ServerMsg::TermOutput { term: t, data } if t == term => {
            text.push_str(&String::from_utf8_lossy(&data.0));
            text.contains(marker).then_some(())
        }
        _ => None,
    })
    .await;
}

/// The pids of host processes whose command line is exactly `args`.
fn host_processes(args: &str) -> Vec<String> {
    let ps = std::process::Command::new("ps").args(["-eo", "pid=,args="]).output().expect("ps runs");
    String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter_map(|line| {
            let (pid, command) = line.trim().split_once(' ')?;
            (command.trim() == args).then(|| pid.to_owned())
        })
        .collect()
}

/// A terminal stays open while a peer is connected, however quiet it is; once the last peer
/// has been gone for `terminal_idle`, it is closed with every process in it.
#[tokio::test]
async fn a_terminal_nobody_is_connected_to_ends_after_the_idle_time() {
    let workspace = tempfile::tempdir().expect("temp dir");
    let idle = Duration::from_millis(800);
    let (session, _requests) = session(workspace.path(), idle);
    let (_, mut events) = session.subscribe(Role::Editor);
    session.handle(&editor(), ClientMsg::TermOpen { cols: 80, rows: 24 }).await.expect("opens");
    let term = next(&mut events, |e| match e {
        ServerMsg::TermOpened { term, .. } => Some(term),
        _ => None,
    })
    .await;
    let seconds = 600_000 + u64::from(std::process::id());
    let sleeper = format!("sleep {seconds}");
    let line = format!("sleep {seconds} & echo started-$((6*7))\n");
    session.handle(&editor(), ClientMsg::TermInput { term, data: Data(line.into_bytes()) }).await.expect("typed");
    printed(&mut events, term, "started-42").await;
    let deadline = Instant::now() + PATIENCE;
    while host_processes(&sleeper).len() != 1 {
        assert!(Instant::now() < deadline, "the sleeper does not show in ps");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Connected and quiet for longer than the idle time: still open.
    tokio::time::sleep(idle * 2).await;
    let line = b"echo alive-$((7*7))\n".to_vec();
    session.handle(&editor(), ClientMsg::TermInput { term, data: Data(line) }).await.expect("still open");
    printed(&mut events, term, "alive-49").await;

    // Nobody connected: closed after the idle time, and the sleeper with it.
    drop(events);
    let left = Instant::now();
    let deadline = left + PATIENCE;
    while !host_processes(&sleeper).is_empty() || session.busy() {
        assert!(Instant::now() < deadline, "the abandoned terminal is still open after {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(left.elapsed() >= idle, "closed after {:?}, before the idle time", left.elapsed());
    let (hello, _events) = session.subscribe(Role::Editor);
    let ServerMsg::Hello { terms, .. } = hello else { panic!("a hello") };
    assert!(terms.iter().all(|t| t.exited), "the terminal shows as ended: {terms:?}");
}

/// A run's stdin stays open while a peer is connected, so a program waiting for input outlives
/// the wall time limit; when the last peer leaves, nobody can type any more: its stdin is
/// closed and the wall time limit ends it.
#[tokio::test]
async fn a_run_waiting_for_input_ends_when_its_last_peer_leaves() {
    let workspace = tempfile::tempdir().expect("temp dir");
    std::fs::write(workspace.path().join("main.py"), "import time\nprint('waiting')\ntime.sleep(600)\n")
        .expect("main.py");
    let mut config = SessionConfig::new(sandbox(), workspace.path().to_owned());
    config.run_limits.wall_time = Duration::from_secs(1);
    config.run_limits.interactive_wall_time = PATIENCE;
    let (prepare, mut requests) = mpsc::channel::<PrepareRequest>(1);
    tokio::spawn(async move {
        while let Some(request) = requests.recv().await {
            let prepared = exec_bridge::peer::Prepared { settings: Default::default(), paths: vec!["main.py".into()] };
            let _ = request.reply.send(prepared);
        }
    });
    let session = Session::new(config, prepare);
    let (_, mut events) = session.subscribe(Role::Editor);
    session.handle(&editor(), ClientMsg::Run {}).await.expect("runs");
    let started = Instant::now();
    next(&mut events, |e| match e {
        ServerMsg::RunOutput { data, .. } => String::from_utf8_lossy(&data.0).contains("waiting").then_some(()),
        _ => None,
    })
    .await;
    // Past the wall time with a peer connected: still running.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(session.busy(), "the run was ended while someone could still type into it");
    drop(events);
    let deadline = Instant::now() + PATIENCE;
    while session.busy() {
        assert!(Instant::now() < deadline, "the run outlived its last peer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (hello, _events) = session.subscribe(Role::Editor);
    let ServerMsg::Hello { runs, .. } = hello else { panic!("a hello") };
    let verdict = runs[0].verdict.as_ref().expect("a verdict");
    assert_eq!(verdict.summary, "wall time limit exceeded", "{verdict:?}");
    assert!(started.elapsed() > Duration::from_secs(1));
}

/// A terminal's programs are held to the workspace size limit too: past it the terminal is
/// closed, and it says why.
#[tokio::test]
async fn a_terminal_filling_the_disk_is_closed_and_says_why() {
    let workspace = tempfile::tempdir().expect("temp dir");
    let mut config = SessionConfig::new(sandbox(), workspace.path().to_owned());
    config.term_limits.workspace_bytes = 16 << 20;
    let (prepare, _requests) = mpsc::channel(1);
    let session = Session::new(config, prepare);
    let (_, mut events) = session.subscribe(Role::Editor);
    session.handle(&editor(), ClientMsg::TermOpen { cols: 80, rows: 24 }).await.expect("opens");
    let term = next(&mut events, |e| match e {
        ServerMsg::TermOpened { term, .. } => Some(term),
        _ => None,
    })
    .await;
    let line = b"for i in $(seq 200); do head -c 1048576 /dev/zero > fill-$i; done; sleep 600\n".to_vec();
    session.handle(&editor(), ClientMsg::TermInput { term, data: Data(line) }).await.expect("typed");
    printed(&mut events, term, "over its size limit of 16 MiB").await;
    next(&mut events, |e| matches!(e, ServerMsg::TermExited { term: t, .. } if t == term).then_some(())).await;
    assert!(!session.busy(), "nothing runs any more");
}
