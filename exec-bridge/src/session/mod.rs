//! A project's runs and terminals, shared by all its peers: who may start and type, what every
//! peer sees live, and the history a late joiner is given.
//!
//! Why over 600 lines: the code is under 600; the rest is the unit tests of the session's rules.
//!
//! Invariants:
//! - Every change of state and its event happen under one lock, so a peer that subscribes gets
//!   a [`ServerMsg::Hello`] and then exactly the events after it: nothing missed, nothing twice.
//! - Viewers change nothing: every request of theirs is refused before it touches a sandbox.
//! - Memory per project is bounded: at most [`RUNS_KEPT`] runs with [`HISTORY_BYTES`] of output
//!   each, [`MAX_TERMINALS`] terminals with [`SCROLLBACK_BYTES`] each, and a broadcast buffer of
//!   [`EVENTS`] messages. A peer that falls further behind than the buffer is told so by its
//!   receiver (the server disconnects it; it reconnects and gets a fresh hello).
//! - A terminal's output is relayed at most at `term_rate` bytes per second; beyond that it is
//!   not read, the pty fills and the programs writing to it block (`yes` costs little).
//! - Nothing outlives its audience: a terminal with no peer subscribed for `terminal_idle` is
//!   closed with every process in it, and when the last peer leaves, the stdin of a run is
//!   closed (nobody can type into it any more), so its wall time limit applies again (see
//!   [`Limits::interactive_wall_time`]).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use sync_core::Role;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::detect;
use crate::peer::{PrepareRequest, Prepared};
use crate::protocol::{ClientMsg, Data, OutputChunk, RunInfo, ServerMsg, StreamName, TermInfo, VerdictInfo};
use crate::run::{self, Limits, Program, RunEvent, Stream};
use crate::sandbox::{Sandbox, TermSize, Terminal, grows_past_disk_limit};
use presence::Presence;
pub use presence::Subscription;
use rate::TokenBucket;

mod presence;
mod rate;

/// Output kept per run for late joiners (the oldest is dropped first).
pub const HISTORY_BYTES: usize = 256 << 10;
/// Output kept per terminal for late joiners.
pub const SCROLLBACK_BYTES: usize = 256 << 10;
/// Runs kept, the newest ones.
pub const RUNS_KEPT: usize = 5;
/// Terminals per project, open or ended (ended ones make way for new ones).
pub const MAX_TERMINALS: usize = 8;
/// Events buffered for the slowest peer.
pub const EVENTS: usize = 1024;
/// Largest terminal accepted, in cells.
const MAX_COLS: u16 = 1000;
const MAX_ROWS: u16 = 500;
/// How long a run waits for the bridge to write out pending edits.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a terminal stays open with no peer subscribed, by default.
pub const TERMINAL_IDLE: Duration = Duration::from_secs(600);

/// What a session runs in and with what limits.
#[derive(Clone)]
pub struct SessionConfig {
    pub sandbox: Arc<dyn Sandbox>,
    pub workspace: PathBuf,
    pub compile_limits: Limits,
    pub run_limits: Limits,
    /// CPU time, memory, processes and file size of a terminal's programs.
    pub term_limits: Limits,
    /// Bytes per second a terminal's output is relayed at most.
    pub term_rate: u64,
    /// How long a terminal stays open while no peer is subscribed to the session.
    pub terminal_idle: Duration,
    /// What the server holds of the project when a run is requested (see [`PrepareRequest`]).
    pub barrier: Option<Arc<dyn RunBarrier>>,
}

/// The server's side of "a run sees every edit made before it was requested".
#[async_trait::async_trait]
pub trait RunBarrier: Send + Sync {
    /// The current state of the project's documents, by name.
    async fn states(&self) -> Vec<(String, yrs::StateVector)>;
}

impl SessionConfig {
    /// Default limits: [`Limits::default`] for runs, one hour of CPU time for terminals,
    /// terminal output relayed at up to 2 MiB/s, and terminals closed after [`TERMINAL_IDLE`]
    /// without a peer.
    pub fn new(sandbox: Arc<dyn Sandbox>, workspace: PathBuf) -> SessionConfig {
        SessionConfig {
            sandbox,
            workspace,
            compile_limits: Limits::compile(),
            run_limits: Limits::default(),
            term_limits: Limits { cpu_time: Duration::from_secs(3600), ..Limits::default() },
            term_rate: 2 << 20,
            terminal_idle: TERMINAL_IDLE,
            barrier: None,
        }
    }
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub name: String,
    pub role: Role,
}

/// Why a request was refused; the message is shown to the peer that sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refuse<T>(message: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(message.into()))
}

struct RunRecord {
    info: RunInfo,
    history_bytes: usize,
    stdin: Option<mpsc::Sender<Bytes>>,
    stop: CancellationToken,
}

struct TermRecord {
    by: String,
    size: TermSize,
    scrollback: VecDeque<u8>,
    exit_code: Option<Option<i32>>,
    input: mpsc::Sender<Bytes>,
    resize: mpsc::Sender<TermSize>,
    close: CancellationToken,
}

impl TermRecord {
    fn info(&self, term: u64) -> TermInfo {
        TermInfo {
            term,
            by: self.by.clone(),
            cols: self.size.cols,
            rows: self.size.rows,
            scrollback: Data(self.scrollback.iter().copied().collect()),
            exited: self.exit_code.is_some(),
            exit_code: self.exit_code.flatten(),
        }
    }
}

#[derive(Default)]
struct State {
    runs: VecDeque<RunRecord>,
    /// A run is being prepared (between the request and its start).
    starting: bool,
    terms: BTreeMap<u64, TermRecord>,
    /// Terminals being started (between the cap check and their record): they count against
    /// the cap, so concurrent opens cannot pass it.
    opening: usize,
    next_id: u64,
}

impl State {
    fn running(&self) -> bool {
        self.starting || self.runs.back().is_some_and(|r| r.info.verdict.is_none())
    }

    fn run(&mut self, id: u64) -> Option<&mut RunRecord> {
        self.runs.iter_mut().find(|r| r.info.run == id)
    }

    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// The runs and terminals of one project.
pub struct Session {
    config: SessionConfig,
    prepare: mpsc::Sender<PrepareRequest>,
    state: Mutex<State>,
    events: broadcast::Sender<ServerMsg>,
    /// How many peers are subscribed now.
    peers: Arc<watch::Sender<usize>>,
    closed: CancellationToken,
}

impl Session {
    /// A session whose runs ask `prepare` (the project's bridge peer) for the project's files.
    pub fn new(config: SessionConfig, prepare: mpsc::Sender<PrepareRequest>) -> Arc<Session> {
        let (events, _) = broadcast::channel(EVENTS);
        let peers = Arc::new(watch::Sender::new(0));
        Arc::new(Session { config, prepare, state: Mutex::default(), events, peers, closed: CancellationToken::new() })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends an event; the caller holds the state lock. No receiver is not an error.
    fn emit(&self, _state: &MutexGuard<'_, State>, msg: ServerMsg) {
        let _ = self.events.send(msg);
    }

    /// The hello for a new peer with `role`, and the events that follow it. The peer counts as
    /// present (keeping terminals open and runs' stdin) until the subscription is dropped.
    pub fn subscribe(self: &Arc<Self>, role: Role) -> (ServerMsg, Subscription) {
        let state = self.state();
        let runs = state.runs.iter().map(|r| r.info.clone()).collect();
        let terms = state.terms.iter().map(|(id, t)| t.info(*id)).collect();
        let hello = ServerMsg::Hello { role: role.as_str().to_owned(), runs, terms };
        self.peers.send_modify(|peers| *peers += 1);
        let present = Presence { peers: Arc::clone(&self.peers), session: Arc::downgrade(self) };
        (hello, Subscription { events: self.events.subscribe(), _present: present })
    }

    /// The last peer left: nobody can type into a run any more, so its stdin is closed.
    fn nobody_left(&self) {
        let mut state = self.state();
        for run in &mut state.runs {
            run.stdin = None;
        }
    }

    /// Resolves once no peer has been subscribed for `idle` in a row.
    async fn abandoned_for(&self, idle: Duration) {
        let mut peers = self.peers.subscribe();
        loop {
            if peers.wait_for(|peers| *peers == 0).await.is_err() {
                return std::future::pending().await;
            }
            tokio::select! {
                () = tokio::time::sleep(idle) => return,
                _ = peers.wait_for(|peers| *peers > 0) => {}
            }
        }
    }

    /// True while a run or a terminal is going.
    pub fn busy(&self) -> bool {
        let state = self.state();
        state.running() || state.terms.values().any(|t| t.exit_code.is_none())
    }

    /// Cancelled once the session is closed.
    pub fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }

    /// Stops every run and terminal; the session refuses everything after.
    pub fn close(&self) {
        self.closed.cancel();
        let mut state = self.state();
        for run in &mut state.runs {
            run.stop.cancel();
        }
        for term in state.terms.values() {
            term.close.cancel();
        }
    }

    /// Carries out `msg` from `actor`.
    pub async fn handle(self: &Arc<Self>, actor: &Actor, msg: ClientMsg) -> Result<(), Refused> {
        if !actor.role.can_write() {
            return refuse("viewers can watch runs and terminals but not start, stop or type in them");
        }
        if self.closed.is_cancelled() {
            return refuse("this project's sandbox is shutting down");
        }
        match msg {
            ClientMsg::Run {} => self.start_run(actor).await,
            ClientMsg::Stdin { run, data } => {
                let mut state = self.state();
                let Some(record) = state.run(run) else { return refuse(format!("no run {run}")) };
                let Some(stdin) = &record.stdin else { return refuse(format!("run {run} takes no more input")) };
                stdin.try_send(Bytes::from(data.0)).or_else(|_| refuse("the program is not reading its input"))
            }
            ClientMsg::StdinEof { run } => {
                let mut state = self.state();
                let Some(record) = state.run(run) else { return refuse(format!("no run {run}")) };
                record.stdin = None;
                Ok(())
            }
            ClientMsg::Stop { run } => {
                let mut state = self.state();
                let Some(record) = state.run(run) else { return refuse(format!("no run {run}")) };
                record.stop.cancel();
                Ok(())
            }
            ClientMsg::TermOpen { cols, rows } => self.open_terminal(actor, size(cols, rows)?).await,
            ClientMsg::TermInput { term, data } => {
                let state = self.state();
                let record = live_term(&state, term)?;
                record.input.try_send(Bytes::from(data.0)).or_else(|_| refuse("the terminal is not reading input"))
            }
            ClientMsg::TermResize { term, cols, rows } => {
                let size = size(cols, rows)?;
                let mut state = self.state();
                let record = live_term(&state, term)?;
                let _ = record.resize.try_send(size);
                if let Some(record) = state.terms.get_mut(&term) {
                    record.size = size;
                }
                self.emit(&state, ServerMsg::TermResized { term, cols, rows });
                Ok(())
            }
            ClientMsg::TermClose { term } => {
                let state = self.state();
                live_term(&state, term)?.close.cancel();
                Ok(())
            }
        }
    }

    async fn start_run(self: &Arc<Self>, actor: &Actor) -> Result<(), Refused> {
        {
            let mut state = self.state();
            if state.running() {
                return refuse("a run is already going: stop it first");
            }
            state.starting = true;
        }
        let prepared = self.prepared().await;
        let program =
            prepared.and_then(|p| detect::program_for(&p.settings, &p.paths).map_err(|e| Refused(e.to_string())));
        let program = match program {
            Ok(program) => program,
            Err(refused) => {
                self.state().starting = false;
                return Err(refused);
            }
        };
        let stop = CancellationToken::new();
        let id = {
            let mut state = self.state();
            state.starting = false;
            let id = state.next();
            let command = describe(&program);
            let info = RunInfo {
                run: id,
                by: actor.name.clone(),
                command: command.clone(),
                history: Vec::new(),
                verdict: None,
            };
            while state.runs.len() >= RUNS_KEPT {
                state.runs.pop_front();
            }
            state.runs.push_back(RunRecord { info, history_bytes: 0, stdin: None, stop: stop.clone() });
            self.emit(&state, ServerMsg::RunStarted { run: id, by: actor.name.clone(), command });
            id
        };
        let sandbox = Arc::clone(&self.config.sandbox);
        let started = run::run_program(
            &sandbox,
            &self.config.workspace,
            &program,
            &self.config.compile_limits,
            &self.config.run_limits,
        )
        .await;
        match started {
            Ok(execution) => {
                if let Some(record) = self.state().run(id) {
                    record.stdin = Some(execution.stdin);
                }
                tokio::spawn(Arc::clone(self).pump_run(id, execution.events, stop));
            }
            Err(err) => {
                tracing::warn!(error = %err, "a run could not start");
                self.finish_run(id, VerdictInfo::failed(format!("the run could not start: {err}")));
            }
        }
        Ok(())
    }

    async fn prepared(&self) -> Result<Prepared, Refused> {
        let unavailable = || Refused("the project's files are not ready yet; try again".into());
        let wait_for = match &self.config.barrier {
            Some(barrier) => barrier.states().await,
            None => Vec::new(),
        };
        let (reply, answer) = oneshot::channel();
        self.prepare
            .send_timeout(PrepareRequest { wait_for, reply }, PREPARE_TIMEOUT)
            .await
            .map_err(|_| unavailable())?;
        tokio::time::timeout(PREPARE_TIMEOUT, answer).await.map_err(|_| unavailable())?.map_err(|_| unavailable())
    }

    async fn pump_run(self: Arc<Self>, id: u64, mut events: mpsc::Receiver<RunEvent>, stop: CancellationToken) {
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                _ = stop.cancelled() => {
                    // Dropping the events kills the run.
                    drop(events);
                    self.finish_run(id, VerdictInfo { kind: "stopped".into(), code: None, signal: None, summary: "stopped".into() });
                    return;
                }
            };
            match event {
                Some(RunEvent::Output { stream, bytes }) => {
                    let stream = match stream {
                        Stream::Stdout => StreamName::Stdout,
                        Stream::Stderr => StreamName::Stderr,
                    };
                    let mut state = self.state();
                    if let Some(record) = state.run(id) {
                        append_history(record, stream, &bytes);
                    }
                    self.emit(&state, ServerMsg::RunOutput { run: id, stream, data: Data(bytes.to_vec()) });
                }
                Some(RunEvent::Finished(verdict)) => return self.finish_run(id, VerdictInfo::from(&verdict)),
                None => return self.finish_run(id, VerdictInfo::failed("the run ended without a verdict")),
            }
        }
    }

    fn finish_run(&self, id: u64, verdict: VerdictInfo) {
        let mut state = self.state();
        if let Some(record) = state.run(id) {
            record.stdin = None;
            record.info.verdict = Some(verdict.clone());
        }
        self.emit(&state, ServerMsg::RunFinished { run: id, verdict });
    }

    async fn open_terminal(self: &Arc<Self>, actor: &Actor, size: TermSize) -> Result<(), Refused> {
        let slot = {
            let mut state = self.state();
            let open = state.terms.values().filter(|t| t.exit_code.is_none()).count() + state.opening;
            if open >= MAX_TERMINALS {
                return refuse(format!("a project has at most {MAX_TERMINALS} terminals open: close one first"));
            }
            while state.terms.len() + state.opening >= MAX_TERMINALS {
                let Some(ended) = state.terms.iter().find(|(_, t)| t.exit_code.is_some()).map(|(id, _)| *id) else {
                    break;
                };
                state.terms.remove(&ended);
            }
            state.opening += 1;
            OpeningSlot { session: self }
        };
        let terminal = self
            .config
            .sandbox
            .open_terminal(&self.config.workspace, size, &self.config.term_limits)
            .await
            .map_err(|e| Refused(format!("the terminal could not start: {e}")))?;
        let Terminal { input, resize, output, exited } = terminal;
        let close = CancellationToken::new();
        let id = {
            let mut state = self.state();
            // The record takes the slot's place under the same lock.
            slot.release(&mut state);
            let id = state.next();
            let record = TermRecord {
                by: actor.name.clone(),
                size,
                scrollback: VecDeque::new(),
                exit_code: None,
                input,
                resize,
                close: close.clone(),
            };
            state.terms.insert(id, record);
            self.emit(
                &state,
                ServerMsg::TermOpened { term: id, by: actor.name.clone(), cols: size.cols, rows: size.rows },
            );
            id
        };
        tokio::spawn(Arc::clone(self).pump_terminal(id, output, exited, close));
        Ok(())
    }

    async fn pump_terminal(
        self: Arc<Self>,
        id: u64,
        mut output: mpsc::Receiver<Bytes>,
        exited: oneshot::Receiver<Option<i32>>,
        close: CancellationToken,
    ) {
        let mut bucket = TokenBucket::new(self.config.term_rate);
        let abandoned = self.abandoned_for(self.config.terminal_idle);
        tokio::pin!(abandoned);
        // A terminal's programs are held to the workspace's size limit as a run's are (but a
        // terminal opened on a workspace over it may still be used to clean it up).
        let disk = grows_past_disk_limit(self.config.workspace.clone(), self.config.term_limits.workspace_bytes);
        tokio::pin!(disk);
        loop {
            let chunk = tokio::select! {
                chunk = output.recv() => chunk,
                _ = close.cancelled() => None,
                () = &mut abandoned => {
                    tracing::info!(term = id, "closing a terminal nobody is connected to");
                    None
                }
                () = &mut disk => {
                    let said = format!("\r\n[terminal closed: the workspace is over its size limit of {} MiB]\r\n", self.config.term_limits.workspace_bytes >> 20);
                    let state = self.state();
                    self.emit(&state, ServerMsg::TermOutput { term: id, data: Data(said.into_bytes()) });
                    None
                }
            };
            let Some(chunk) = chunk else { break };
            {
                let mut state = self.state();
                if let Some(record) = state.terms.get_mut(&id) {
                    record.scrollback.extend(chunk.iter());
                    let excess = record.scrollback.len().saturating_sub(SCROLLBACK_BYTES);
                    record.scrollback.drain(..excess);
                }
                self.emit(&state, ServerMsg::TermOutput { term: id, data: Data(chunk.to_vec()) });
            }
            // Over the rate, the next read waits: the pty fills and its writers block.
            if let Some(wait) = bucket.take(chunk.len() as u64, Instant::now()) {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = close.cancelled() => break,
                }
            }
        }
        // Dropping the output ends the shell (on close); then its exit code arrives.
        drop(output);
        let exit_code = exited.await.unwrap_or(None);
        let mut state = self.state();
        if let Some(record) = state.terms.get_mut(&id) {
            record.exit_code = Some(exit_code);
        }
        self.emit(&state, ServerMsg::TermExited { term: id, exit_code });
    }
}

/// A terminal counted in [`State::opening`] until it has a record or failed to start.
struct OpeningSlot<'a> {
    session: &'a Session,
}

impl OpeningSlot<'_> {
    fn release(self, state: &mut State) {
        state.opening -= 1;
        std::mem::forget(self);
    }
}

impl Drop for OpeningSlot<'_> {
    fn drop(&mut self) {
        self.session.state().opening -= 1;
    }
}

fn live_term(state: &State, term: u64) -> Result<&TermRecord, Refused> {
    match state.terms.get(&term) {
        Some(record) if record.exit_code.is_none() => Ok(record),
        Some(_) => refuse(format!("terminal {term} has ended")),
        None => refuse(format!("no terminal {term}")),
    }
}

fn size(cols: u16, rows: u16) -> Result<TermSize, Refused> {
    if cols == 0 || rows == 0 || cols > MAX_COLS || rows > MAX_ROWS {
        return refuse(format!("a terminal is 1 to {MAX_COLS} columns by 1 to {MAX_ROWS} rows"));
    }
    Ok(TermSize { cols, rows })
}

fn append_history(record: &mut RunRecord, stream: StreamName, bytes: &[u8]) {
    let history = &mut record.info.history;
    match history.last_mut() {
        Some(last) if last.stream == stream => last.data.0.extend_from_slice(bytes),
        _ => history.push(OutputChunk { stream, data: Data(bytes.to_vec()) }),
    }
    record.history_bytes += bytes.len();
    while record.history_bytes > HISTORY_BYTES {
        let excess = record.history_bytes - HISTORY_BYTES;
        let first = &mut history[0];
        if first.data.0.len() <= excess {
            record.history_bytes -= first.data.0.len();
            history.remove(0);
        } else {
            first.data.0.drain(..excess);
            record.history_bytes -= excess;
        }
    }
}

/// The command line a run shows, e.g. `gcc -O2 -o a.out main.c -lm && ./a.out`.
fn describe(program: &Program) -> String {
    let line = |c: &crate::sandbox::SandboxCommand| {
        if c.program == "/bin/sh" && c.args.first().is_some_and(|a| a == "-c") {
            return c.args[1..].join(" ");
        }
        let name = match c.program.strip_prefix('/') {
            Some(_) => c.program.rsplit('/').next().unwrap_or(&c.program),
            None => &c.program,
        };
        std::iter::once(name).chain(c.args.iter().map(String::as_str)).collect::<Vec<_>>().join(" ")
    };
    match &program.compile {
        Some(compile) => format!("{} && {}", line(compile), line(&program.run)),
        None => line(&program.run),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_newest_bytes_by_stream() {
        let info = RunInfo { run: 1, by: "a".into(), command: "c".into(), history: Vec::new(), verdict: None };
        let mut record = RunRecord { info, history_bytes: 0, stdin: None, stop: CancellationToken::new() };
        append_history(&mut record, StreamName::Stdout, b"ab");
        append_history(&mut record, StreamName::Stdout, b"cd");
        append_history(&mut record, StreamName::Stderr, b"e");
        assert_eq!(record.info.history.len(), 2);
        assert_eq!(record.info.history[0].data.0, b"abcd");
        let big = vec![b'x'; HISTORY_BYTES];
        append_history(&mut record, StreamName::Stdout, &big);
        let total: usize = record.info.history.iter().map(|c| c.data.0.len()).sum();
        assert_eq!((total, record.history_bytes), (HISTORY_BYTES, HISTORY_BYTES));
        assert!(record.info.history.iter().all(|c| c.data.0.iter().all(|b| *b == b'x')));
    }

    #[test]
    fn sizes_out_of_range_are_refused() {
        assert!(size(0, 10).is_err() && size(10, 0).is_err() && size(1001, 10).is_err());
        assert_eq!(size(80, 24), Ok(TermSize { cols: 80, rows: 24 }));
    }

    #[test]
    fn commands_are_described_as_people_type_them() {
        assert_eq!(describe(&Program::python("main.py")), "python3 main.py");
        assert_eq!(describe(&Program::c("main.c")), "gcc -O2 -o a.out main.c -lm && ./a.out");
    }
}
