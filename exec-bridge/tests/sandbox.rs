//! The sandbox conformance suite: every verdict and every isolation promise of [`Sandbox`], for
//! runs, terminals and previews, run against each implementation (bubblewrap, Docker) with real
//! python3, gcc and bash.
//!
//! Each check is an `async fn` taking the sandbox; the `conformance!` macro at the end makes a
//! test of it per implementation (`local::NAME`, `docker::NAME`).

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use collab_test_support::wait;
use common::workspace_with;
use exec_bridge::run::{Limits, Program, RunEvent, RunOutput, Stream, TimeLimit, Verdict, run_program};
use exec_bridge::sandbox::docker::{DockerSandbox, DockerSandboxConfig};
use exec_bridge::sandbox::local::{LocalSandbox, LocalSandboxConfig};
use exec_bridge::sandbox::{
    Execution, PortStream, Sandbox, SandboxCommand, SandboxError, TERM_CHUNK, TermSize, Terminal,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest any test waits for a run; far above every limit used here.
const PATIENCE: Duration = Duration::from_secs(60);

fn local_sandbox() -> Arc<dyn Sandbox> {
    match LocalSandbox::new(LocalSandboxConfig::default()) {
        Ok(sandbox) => Arc::new(sandbox),
        Err(err) => {
            panic!("the sandbox tests need bubblewrap and GNU time: {err}; run `cargo xtask test`, which installs them")
        }
    }
}

/// A Docker sandbox with the default runtime image; containers of earlier test runs whose
/// workspace is gone (a test that panicked) are removed first.
async fn docker_sandbox() -> Arc<DockerSandbox> {
    common::docker_sandbox(DockerSandboxConfig::default()).await
}

async fn run(sandbox: &Arc<dyn Sandbox>, workspace: &Path, program: &Program, limits: &Limits) -> RunOutput {
    let execution = run_program(sandbox, workspace, program, &Limits::compile(), limits).await.expect("the run starts");
    tokio::time::timeout(PATIENCE, execution.collect()).await.expect("the run ends in time").expect("a verdict")
}

async fn python(sandbox: &Arc<dyn Sandbox>, script: &str, limits: &Limits) -> RunOutput {
    let workspace = workspace_with(&[("main.py", script)]);
    run(sandbox, workspace.path(), &Program::python("main.py"), limits).await
}

async fn a_normal_exit_streams_its_output(sandbox: Arc<dyn Sandbox>) {
    let out =
        python(&sandbox, "import sys\nprint('hello')\nprint('oops', file=sys.stderr)\n", &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::Exited { code: 0 });
    assert_eq!(out.stdout_text(), "hello\n");
    assert_eq!(out.stderr_text(), "oops\n");
}

async fn a_non_zero_exit_is_reported_with_its_code(sandbox: Arc<dyn Sandbox>) {
    let out = python(&sandbox, "import sys\nsys.exit(3)\n", &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::Exited { code: 3 });
}

async fn an_exit_code_above_128_is_not_mistaken_for_a_signal(sandbox: Arc<dyn Sandbox>) {
    let out = python(&sandbox, "import sys\nsys.exit(139)\n", &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::Exited { code: 139 });
}

async fn a_signal_is_reported(sandbox: Arc<dyn Sandbox>) {
    let out = python(&sandbox, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::Signaled { signal: 11 });
}

async fn an_infinite_loop_hits_the_cpu_limit(sandbox: Arc<dyn Sandbox>) {
    let limits = Limits { cpu_time: Duration::from_secs(1), ..Limits::default() };
    let out = python(&sandbox, "while True:\n    pass\n", &limits).await;
    assert_eq!(out.verdict, Verdict::TimeLimit(TimeLimit::Cpu));
}

async fn a_sleeping_program_hits_the_wall_time_limit(sandbox: Arc<dyn Sandbox>) {
    let limits = Limits { wall_time: Duration::from_secs(1), ..Limits::default() };
    let started = Instant::now();
    let out = python(&sandbox, "import time\ntime.sleep(600)\n", &limits).await;
    assert_eq!(out.verdict, Verdict::TimeLimit(TimeLimit::Wall));
    assert!(started.elapsed() < Duration::from_secs(30), "killed late: {:?}", started.elapsed());
}

async fn a_memory_bomb_hits_the_memory_limit(sandbox: Arc<dyn Sandbox>) {
    let out =
        python(&sandbox, "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))\n", &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::MemoryLimit, "stderr: {}", out.stderr_text());
}

async fn a_c_memory_bomb_hits_the_memory_limit(sandbox: Arc<dyn Sandbox>) {
    let source = "#include <stdlib.h>\n#include <string.h>\nint main(void) {\n  for (;;) { char *p = malloc(1 << 20); memset(p, 1, 1 << 20); }\n}\n";
    let workspace = workspace_with(&[("bomb.c", source)]);
    let out = run(&sandbox, workspace.path(), &Program::c("bomb.c"), &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::MemoryLimit, "stderr: {}", out.stderr_text());
}

async fn the_process_limit_holds_even_when_the_tests_run_as_root(sandbox: Arc<dyn Sandbox>) {
    // Children sleep so they stay counted; the parent counts the forks that succeed.
    let script = "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(5)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    print(n)\n";
    let limits = Limits { processes: 16, ..Limits::default() };
    let out = python(&sandbox, script, &limits).await;
    assert_eq!(out.verdict, Verdict::Exited { code: 0 }, "stderr: {}", out.stderr_text());
    let forked: u32 = out.stdout_text().trim().parse().expect("a count");
    assert!(forked < 16, "forked {forked} processes under a limit of 16");
}

async fn a_fork_bomb_is_contained_and_ends_with_a_verdict(sandbox: Arc<dyn Sandbox>) {
    let script = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n";
    let limits = Limits { wall_time: Duration::from_secs(2), ..Limits::default() };
    // Named uniquely, so that its processes are told apart from another test's bomb.
    let bomb = format!("bomb{}.py", unique());
    let workspace = workspace_with(&[(&bomb, script)]);
    let execution = run_program(&sandbox, workspace.path(), &Program::python(&bomb), &Limits::compile(), &limits)
        .await
        .expect("the run starts");
    let collecting = tokio::spawn(execution.collect());
    let forks = format!("/usr/bin/python3 {bomb}");
    eventually("the bomb forks", || host_processes(&forks).len() > 1).await;
    // The machine stays usable while the bomb goes off.
    let status = tokio::process::Command::new("true").status().await.expect("the host can still start a process");
    assert!(status.success());
    let out = tokio::time::timeout(PATIENCE, collecting).await.expect("ends in time").expect("task").expect("verdict");
    assert_eq!(out.verdict, Verdict::TimeLimit(TimeLimit::Wall));
}

async fn infinite_output_hits_the_output_limit(sandbox: Arc<dyn Sandbox>) {
    let limits = Limits { output_bytes: 64 << 10, ..Limits::default() };
    let out = python(&sandbox, "while True:\n    print('y' * 999)\n", &limits).await;
    assert_eq!(out.verdict, Verdict::OutputLimit);
    assert_eq!(out.stdout.len(), 64 << 10, "output is cut exactly at the limit");
}

async fn a_c_program_compiles_and_runs(sandbox: Arc<dyn Sandbox>) {
    let source = "#include <stdio.h>\nint main(void) { int x; if (scanf(\"%d\", &x) != 1) return 2; printf(\"%d\\n\", 2 * x); return 0; }\n";
    let workspace = workspace_with(&[("main.c", source)]);
    let execution =
        run_program(&sandbox, workspace.path(), &Program::c("main.c"), &Limits::compile(), &Limits::default())
            .await
            .expect("the run starts");
    // Written while gcc still runs: held for the program.
    execution.stdin.send(Bytes::from_static(b"21\n")).await.expect("stdin");
    let out = tokio::time::timeout(PATIENCE, execution.collect()).await.expect("in time").expect("verdict");
    assert_eq!(out.verdict, Verdict::Exited { code: 0 }, "stderr: {}", out.stderr_text());
    assert_eq!(out.stdout_text(), "42\n");
}

/// Every language the runtime promises, as `detect` runs it: Python 3, C, C++, JavaScript
/// (Node.js) and Bash, each within the default limits.
async fn every_language_runs_with_the_default_limits(sandbox: Arc<dyn Sandbox>) {
    let programs = [
        ("main.py", "print(6 * 7)\n"),
        ("main.c", "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 6 * 7); return 0; }\n"),
        ("main.cpp", "#include <iostream>\nint main() { std::cout << 6 * 7 << std::endl; }\n"),
        ("index.js", "console.log(6 * 7);\n"),
        ("main.sh", "echo $((6 * 7))\n"),
    ];
    for (path, source) in programs {
        let workspace = workspace_with(&[(path, source)]);
        let settings = sync_core::tree::Settings::default();
        let program = exec_bridge::detect::program_for(&settings, &[path.to_owned()]).expect("detected");
        let out = run(&sandbox, workspace.path(), &program, &Limits::default()).await;
        assert_eq!(out.verdict, Verdict::Exited { code: 0 }, "{path}: {}", out.stderr_text());
        assert_eq!(out.stdout_text(), "42\n", "{path}");
    }
}

async fn a_c_compile_error_is_a_verdict_not_a_run(sandbox: Arc<dyn Sandbox>) {
    let workspace = workspace_with(&[("main.c", "int main(void) { return missing; }\n")]);
    let out = run(&sandbox, workspace.path(), &Program::c("main.c"), &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::CompileError(Box::new(Verdict::Exited { code: 1 })));
    assert!(out.stderr_text().contains("missing"), "gcc's diagnostics are streamed: {}", out.stderr_text());
    assert!(!workspace.path().join("a.out").exists());
}

async fn there_is_no_network(sandbox: Arc<dyn Sandbox>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let script = format!(
        "import socket\nfor addr in [('1.1.1.1', 53), ('127.0.0.1', {port})]:\n    try:\n        socket.create_connection(addr, timeout=2)\n        print('connected', addr)\n    except OSError as e:\n        print('blocked', addr[0])\n"
    );
    let out = python(&sandbox, &script, &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::Exited { code: 0 }, "stderr: {}", out.stderr_text());
    assert_eq!(out.stdout_text(), "blocked 1.1.1.1\nblocked 127.0.0.1\n");
    assert!(listener.accept().is_err(), "the host's listener saw no connection");
}

async fn host_files_outside_the_workspace_are_invisible(sandbox: Arc<dyn Sandbox>) {
    let secrets = tempfile::tempdir().expect("temp dir");
    let secret = secrets.path().join("secret.txt");
    std::fs::write(&secret, "hunter2").expect("write secret");
    let script = format!(
        "for path in ['{}', '/etc/passwd', '/etc/shadow', '/root/.bashrc', '/proc/1/environ']:\n    try:\n        print(path, open(path).read())\n    except OSError as e:\n        print('denied', type(e).__name__)\n",
        secret.display()
    );
    let out = python(&sandbox, &script, &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::Exited { code: 0 }, "stderr: {}", out.stderr_text());
    assert!(!out.stdout_text().contains("hunter2"), "the secret leaked: {}", out.stdout_text());
    assert_eq!(out.stdout_text().matches("denied").count(), 4, "{}", out.stdout_text());
}

async fn only_the_workspace_outlives_the_run(sandbox: Arc<dyn Sandbox>) {
    let script = "for path in ['/usr/evil', '/evil', '/etc/evil', '/proc/evil']:\n    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n    except OSError:\n        print('denied', path)\nopen('/workspace/made.txt', 'w').write('made')\n";
    let workspace = workspace_with(&[("main.py", script)]);
    let out = run(&sandbox, workspace.path(), &Program::python("main.py"), &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::Exited { code: 0 }, "stderr: {}", out.stderr_text());
    assert!(!out.stdout_text().contains("wrote"), "{}", out.stdout_text());
    assert_eq!(std::fs::read_to_string(workspace.path().join("made.txt")).expect("made.txt"), "made");
    assert!(!Path::new("/usr/evil").exists());
}

async fn stdin_is_interactive(sandbox: Arc<dyn Sandbox>) {
    let workspace = workspace_with(&[("echo.py", "while True:\n    line = input()\n    print('echo:', line)\n")]);
    let mut execution = sandbox
        .start(workspace.path(), &SandboxCommand::new("/usr/bin/python3", ["echo.py"]), &Limits::default())
        .await
        .expect("the run starts");
    for word in ["ping", "pong"] {
        execution.stdin.send(Bytes::from(format!("{word}\n"))).await.expect("stdin");
        // Unbuffered python may write one line in several chunks.
        let mut echoed = Vec::new();
        while !echoed.ends_with(b"\n") {
            let event = tokio::time::timeout(PATIENCE, execution.events.recv()).await.expect("an echo in time");
            match event {
                Some(RunEvent::Output { stream: Stream::Stdout, bytes }) => echoed.extend_from_slice(&bytes),
                other => panic!("the echo should arrive while the program still runs, got {other:?}"),
            }
        }
        assert_eq!(String::from_utf8_lossy(&echoed), format!("echo: {word}\n"));
    }
    let out = tokio::time::timeout(PATIENCE, execution.collect()).await.expect("in time").expect("verdict");
    // Closing stdin ends the program: input() raises EOFError.
    assert_eq!(out.verdict, Verdict::Exited { code: 1 });
    assert!(out.stderr_text().contains("EOFError"), "{}", out.stderr_text());
}

/// Limits of a terminal as the bridge gives them: CPU time for a long session.
fn terminal_limits() -> Limits {
    Limits { cpu_time: Duration::from_secs(3600), ..Limits::default() }
}

const SIZE: TermSize = TermSize { cols: 80, rows: 24 };

/// A terminal and what it printed so far.
///
/// Markers the checks wait for are computed by the shell (`hi-$((6*7))` prints `hi-42`), so the
/// echo of the typed line never matches them.
struct Screen {
    terminal: Terminal,
    printed: Vec<u8>,
    /// Where the next search for a marker starts.
    seen: usize,
}

impl Screen {
    async fn open(sandbox: &Arc<dyn Sandbox>, workspace: &Path, size: TermSize) -> Screen {
        let terminal = sandbox.open_terminal(workspace, size, &terminal_limits()).await.expect("the terminal opens");
        Screen { terminal, printed: Vec::new(), seen: 0 }
    }

    async fn type_line(&self, line: &str) {
        self.terminal.input.send(Bytes::from(format!("{line}\n"))).await.expect("the terminal takes input");
    }

    /// Reads until `marker` is printed; returns what was printed since the previous marker.
    async fn wait_for(&mut self, marker: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let printed = &self.printed[self.seen..];
            if let Some(at) = printed.windows(marker.len()).position(|window| window == marker.as_bytes()) {
                let text = String::from_utf8_lossy(&printed[..at + marker.len()]).into_owned();
                self.seen += at + marker.len();
                return text;
            }
            let chunk = tokio::time::timeout_at(deadline.into(), self.terminal.output.recv()).await;
            match chunk {
                Ok(Some(chunk)) => {
                    assert!(chunk.len() <= TERM_CHUNK, "a chunk of {} bytes", chunk.len());
                    self.printed.extend_from_slice(&chunk);
                }
                Ok(None) => panic!("the terminal ended before printing {marker:?}: {}", self.transcript()),
                Err(_) => panic!("{marker:?} was not printed in time: {}", self.transcript()),
            }
        }
    }

    fn transcript(&self) -> String {
        let tail = self.printed.len().saturating_sub(4096);
        String::from_utf8_lossy(&self.printed[tail..]).into_owned()
    }
}

/// A number no other test (of this process or another) uses, to find a test's processes.
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").subsec_nanos();
    let next = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    u64::from(std::process::id()) * 1_000_000 + u64::from(nanos % 10_000) * 100 + next % 100
}

/// The host's processes (of every sandbox: the host sees into their pid namespaces) whose
/// command line is exactly `args`.
fn host_processes(args: &str) -> Vec<u32> {
    let ps = std::process::Command::new("ps").args(["-eo", "pid=,args="]).output().expect("ps runs");
    assert!(ps.status.success(), "ps failed");
    String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter_map(|line| {
            let (pid, command) = line.trim().split_once(' ')?;
            (command.trim() == args).then(|| pid.parse().ok()).flatten()
        })
        .collect()
}

/// Polls `condition` until it holds; panics with `what` after [`PATIENCE`].
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    wait::poll(what, PATIENCE, || std::future::ready(condition().then_some(())), String::new).await;
}

async fn a_terminal_runs_what_is_typed(sandbox: Arc<dyn Sandbox>) {
    let workspace = workspace_with(&[]);
    let mut screen = Screen::open(&sandbox, workspace.path(), SIZE).await;
    screen.type_line("echo hi-$((6*7))").await;
    screen.wait_for("hi-42").await;
    screen.type_line("echo $TERM-$((1+1)) in $PWD").await;
    screen.wait_for("xterm-256color-2 in /workspace").await;
}

async fn a_terminal_passes_every_byte_through(sandbox: Arc<dyn Sandbox>) {
    let workspace = workspace_with(&[]);
    let mut screen = Screen::open(&sandbox, workspace.path(), SIZE).await;
    // After a pause, so the bytes likely start a read of their own: what looks like the header
    // of one of Docker's multiplexed frames (stdout, 4 GiB long) must come through as it is.
    screen.type_line("sleep 0.5; printf '\\001\\000\\000\\000\\377\\377\\377\\377'; echo raw-$((3*3))").await;
    screen.wait_for("raw-9").await;
    let frame = b"\x01\x00\x00\x00\xff\xff\xff\xffraw-9";
    assert!(screen.printed.windows(frame.len()).any(|window| window == frame), "{:?}", screen.transcript());
    screen.type_line("echo still-$((2+3))").await;
    screen.wait_for("still-5").await;
}

async fn a_terminal_resizes_and_its_programs_are_told(sandbox: Arc<dyn Sandbox>) {
    let workspace = workspace_with(&[]);
    let mut screen = Screen::open(&sandbox, workspace.path(), SIZE).await;
    screen.type_line("stty size; echo sized-$((1+1))").await;
    assert!(screen.wait_for("sized-2").await.contains("24 80"), "{}", screen.transcript());
    screen.terminal.resize.send(TermSize { cols: 100, rows: 30 }).await.expect("resize");
    screen.type_line("stty size; echo sized-$((2+1))").await;
    assert!(screen.wait_for("sized-3").await.contains("30 100"), "{}", screen.transcript());
    // A program in the foreground gets SIGWINCH (it is in the terminal's foreground group).
    let script = "import signal, sys\nsignal.signal(signal.SIGWINCH, lambda *_: (print('winched-%d' % (2 * 2)), sys.exit(0)))\nprint('ready-%d' % (3 * 3), flush=True)\nsignal.pause()\n";
    std::fs::write(workspace.path().join("winch.py"), script).expect("write winch.py");
    screen.type_line("python3 winch.py").await;
    screen.wait_for("ready-9").await;
    screen.terminal.resize.send(TermSize { cols: 90, rows: 20 }).await.expect("resize");
    screen.wait_for("winched-4").await;
}

async fn a_terminal_has_no_network(sandbox: Arc<dyn Sandbox>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let workspace = workspace_with(&[]);
    let mut screen = Screen::open(&sandbox, workspace.path(), SIZE).await;
    screen
        .type_line(&format!(
            "for a in 1.1.1.1/53 127.0.0.1/{port}; do timeout 5 bash -c \"exec 3<>/dev/tcp/$a\" 2>/dev/null && echo open-$((0+1)) || echo shut-$((0+1)); done; echo net-$((9*9))"
        ))
        .await;
    let text = screen.wait_for("net-81").await;
    assert_eq!(text.matches("shut-1").count(), 2, "{text}");
    assert!(!text.contains("open-1"), "{text}");
    assert!(listener.accept().is_err(), "the host's listener saw no connection");
}

async fn a_terminal_is_unprivileged_and_writes_land_in_the_workspace(sandbox: Arc<dyn Sandbox>) {
    let workspace = workspace_with(&[("old.txt", "old\n")]);
    let mut screen = Screen::open(&sandbox, workspace.path(), SIZE).await;
    screen.type_line("echo typed > new.txt && echo more >> old.txt && echo wrote-$((5*5))").await;
    screen.wait_for("wrote-25").await;
    assert_eq!(std::fs::read_to_string(workspace.path().join("new.txt")).expect("new.txt"), "typed\n");
    assert_eq!(std::fs::read_to_string(workspace.path().join("old.txt")).expect("old.txt"), "old\nmore\n");
    screen.type_line("touch /usr/evil /evil 2>/dev/null || echo read-only-$((7*7))").await;
    screen.wait_for("read-only-49").await;
    screen.type_line("test \"$(id -u)\" -ne 0 && echo non-root-$((8*8))").await;
    screen.wait_for("non-root-64").await;
    assert!(!Path::new("/usr/evil").exists() && !Path::new("/evil").exists());
}

async fn the_shells_exit_code_arrives(sandbox: Arc<dyn Sandbox>) {
    let workspace = workspace_with(&[]);
    let mut screen = Screen::open(&sandbox, workspace.path(), SIZE).await;
    screen.type_line("echo up-$((1+1))").await;
    screen.wait_for("up-2").await;
    screen.type_line("exit 3").await;
    let code = tokio::time::timeout(PATIENCE, &mut screen.terminal.exited).await.expect("exits in time");
    assert_eq!(code, Ok(Some(3)));
    let ended = tokio::time::timeout(PATIENCE, async { while screen.terminal.output.recv().await.is_some() {} });
    ended.await.expect("the output ends once the shell has exited");
}

async fn dropping_the_output_ends_every_process_of_the_terminal(sandbox: Arc<dyn Sandbox>) {
    let workspace = workspace_with(&[]);
    let mut screen = Screen::open(&sandbox, workspace.path(), SIZE).await;
    let seconds = unique();
    // A background job, one in a session of its own, and one orphaned by its subshell.
    screen
        .type_line(&format!("sleep {seconds} & setsid sleep {seconds} & (sleep {seconds} &); echo bg-$((5*5))"))
        .await;
    screen.wait_for("bg-25").await;
    let sleeper = format!("sleep {seconds}");
    eventually("the three sleepers show in ps", || host_processes(&sleeper).len() == 3).await;
    let Terminal { input, resize, output, exited } = screen.terminal;
    drop(output);
    let code = tokio::time::timeout(PATIENCE, exited).await.expect("ends in time");
    assert_eq!(code, Ok(None), "a terminal killed by the sandbox has no exit code");
    eventually("no sleeper is left", || host_processes(&sleeper).is_empty()).await;
    assert!(input.send(Bytes::from_static(b"echo\n")).await.is_err(), "nobody takes input any more");
    drop(resize);
}

/// Field `index` (1-based, as in proc(5)) of `/proc/PID/stat`.
fn proc_stat(pid: u32, index: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the name, which is in parentheses, start with field 3.
    stat.rsplit_once(')')?.1.split_whitespace().nth(index - 3).map(str::to_owned)
}

fn cpu_ticks(pid: u32) -> u64 {
    let field = |index| proc_stat(pid, index).and_then(|value| value.parse::<u64>().ok()).unwrap_or(0);
    field(14) + field(15)
}

async fn a_terminal_nobody_reads_blocks_its_programs(sandbox: Arc<dyn Sandbox>) {
    let workspace = workspace_with(&[]);
    let mut screen = Screen::open(&sandbox, workspace.path(), SIZE).await;
    screen.type_line("echo ready-$((2+2))").await;
    screen.wait_for("ready-4").await;
    let token = unique();
    screen.type_line(&format!("yes flow-{token}")).await;
    let yes = format!("yes flow-{token}");
    eventually("`yes` runs", || host_processes(&yes).len() == 1).await;
    let pid = host_processes(&yes)[0];
    // Nobody reads: `yes` must end up blocked in a write (state S), using no CPU time.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (state, before) = (proc_stat(pid, 3), cpu_ticks(pid));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (state_after, after) = (proc_stat(pid, 3), cpu_ticks(pid));
        if state.as_deref() == Some("S") && state_after.as_deref() == Some("S") && after <= before + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "`yes` keeps running with nobody reading ({state_after:?}, {after} ticks)");
    }
    // What waits in the queue, the pty and the engine is bounded: far below what `yes` writes
    // in a second when it is read.
    screen.terminal.input.send(Bytes::from_static(b"\x03")).await.expect("Ctrl-C");
    screen.type_line("echo flow-done-$((4*4))").await;
    let backlog = screen.wait_for("flow-done-16").await.len();
    println!("backlog of a blocked terminal: {backlog} bytes");
    // Measured: about 70 KB locally, 1 to 2.5 MB through the Docker engine's pipes and sockets.
    assert!(backlog < 8 << 20, "{backlog} bytes were buffered for a terminal nobody read");
    eventually("`yes` is gone after Ctrl-C", || host_processes(&yes).is_empty()).await;
}

async fn a_run_does_not_end_an_open_terminal(sandbox: Arc<dyn Sandbox>) {
    let workspace = workspace_with(&[("main.py", "print('ran')\n")]);
    let mut screen = Screen::open(&sandbox, workspace.path(), SIZE).await;
    screen.type_line("echo before-$((3+3))").await;
    screen.wait_for("before-6").await;
    let out = run(&sandbox, workspace.path(), &Program::python("main.py"), &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::Exited { code: 0 }, "stderr: {}", out.stderr_text());
    screen.type_line("echo after-$((3+4))").await;
    screen.wait_for("after-7").await;
}

/// `python3 -m http.server PORT` as a run in `workspace`.
async fn serve(sandbox: &Arc<dyn Sandbox>, workspace: &Path, port: u16) -> Execution {
    let command =
        SandboxCommand::new("/usr/bin/python3", ["-m".to_owned(), "http.server".to_owned(), port.to_string()]);
    let limits = Limits { wall_time: PATIENCE * 2, ..Limits::default() };
    sandbox.start(workspace, &command, &limits).await.expect("the server starts")
}

/// A connection to `port` in `workspace`'s sandbox, once something listens there.
async fn connect_when_listening(sandbox: &Arc<dyn Sandbox>, workspace: &Path, port: u16) -> Box<dyn PortStream> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match sandbox.connect_port(workspace, port).await {
            Ok(stream) => return stream,
            Err(SandboxError::NotListening { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("connecting to port {port}: {err:?}"),
        }
    }
}

async fn http_get(stream: &mut Box<dyn PortStream>, path: &str) -> String {
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: preview\r\n\r\n").as_bytes()).await.expect("request");
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response)).await.expect("in time").expect("response");
    String::from_utf8_lossy(&response).into_owned()
}

fn assert_not_listening(result: Result<Box<dyn PortStream>, SandboxError>, port: u16) {
    match result {
        Err(SandboxError::NotListening { port: reported }) => assert_eq!(reported, port),
        Err(err) => panic!("expected NotListening, got {err:?}"),
        Ok(_) => panic!("connected to port {port}, where nothing should listen"),
    }
}

async fn a_preview_reaches_a_server_started_by_a_run(sandbox: Arc<dyn Sandbox>) {
    let workspace = workspace_with(&[("hello.txt", "hello from the sandbox\n")]);
    assert_not_listening(sandbox.connect_port(workspace.path(), 8123).await, 8123);
    let server = serve(&sandbox, workspace.path(), 8123).await;
    let mut stream = connect_when_listening(&sandbox, workspace.path(), 8123).await;
    let response = http_get(&mut stream, "/hello.txt").await;
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    assert!(response.ends_with("\r\n\r\nhello from the sandbox\n"), "{response}");
    let mut stream = connect_when_listening(&sandbox, workspace.path(), 8123).await;
    assert!(http_get(&mut stream, "/").await.contains("hello.txt"), "a directory listing");
    assert_not_listening(sandbox.connect_port(workspace.path(), 8124).await, 8124);
    drop(server);
}

async fn a_preview_reaches_a_server_started_in_a_terminal(sandbox: Arc<dyn Sandbox>) {
    let workspace = workspace_with(&[("page.html", "<p>from a terminal</p>\n")]);
    let mut screen = Screen::open(&sandbox, workspace.path(), SIZE).await;
    screen.type_line("python3 -m http.server 8125 2>/dev/null & echo serving-$((2*5))").await;
    screen.wait_for("serving-10").await;
    let mut stream = connect_when_listening(&sandbox, workspace.path(), 8125).await;
    let response = http_get(&mut stream, "/page.html").await;
    assert!(response.starts_with("HTTP/1.0 200") && response.ends_with("<p>from a terminal</p>\n"), "{response}");
}

async fn a_project_cannot_reach_another_projects_port(sandbox: Arc<dyn Sandbox>) {
    let a = workspace_with(&[("a.txt", "a")]);
    let b = workspace_with(&[("b.txt", "b")]);
    let server_a = serve(&sandbox, a.path(), 8131).await;
    let server_b = serve(&sandbox, b.path(), 8132).await;
    connect_when_listening(&sandbox, a.path(), 8131).await;
    connect_when_listening(&sandbox, b.path(), 8132).await;
    assert_not_listening(sandbox.connect_port(b.path(), 8131).await, 8131);
    assert_not_listening(sandbox.connect_port(a.path(), 8132).await, 8132);
    // Nor from inside: a terminal of b finds nothing on a's port.
    let mut screen = Screen::open(&sandbox, b.path(), SIZE).await;
    screen
        .type_line("timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/8131' 2>/dev/null && echo open-$((0+1)) || echo shut-$((0+1))")
        .await;
    let text = screen.wait_for("-1").await;
    assert!(text.ends_with("shut-1"), "{text}");
    drop((server_a, server_b));
}

/// A variable only the server's environment holds (the test process is the server here). It is
/// put there by running the check again in a child test process: setting a variable in a
/// running multi-threaded process is not sound.
const CANARY_VAR: &str = "EXEC_BRIDGE_TEST_SERVER_SECRET";
const CANARY_VALUE: &str = "canary-7d1e5a-the-server-database-password";

/// Runs the test `name` of this binary again, in a child process with the canary in its
/// environment; true when this process is that child.
async fn with_canary_in_the_environment(name: &str) -> bool {
    if std::env::var(CANARY_VAR).is_ok() {
        return true;
    }
    let binary = std::env::current_exe().expect("the test binary");
    let mut child = tokio::process::Command::new(binary);
    child.args(["--exact", name, "--nocapture"]).env(CANARY_VAR, CANARY_VALUE).kill_on_drop(true);
    let status = tokio::time::timeout(PATIENCE * 2, child.status()).await.expect("in time").expect("the child runs");
    assert!(status.success(), "{name} failed with the canary in the server's environment");
    false
}

/// Neither a run nor a terminal can read the server's environment: not in its own `env`, not
/// in `/proc/1/environ` (the sandbox's init), not in any `/proc/*/environ` it can read.
async fn no_server_secret_is_readable_inside(sandbox: Arc<dyn Sandbox>) {
    assert_eq!(std::env::var(CANARY_VAR).as_deref(), Ok(CANARY_VALUE), "the server holds the canary");
    let script = "import glob, os\nread = 0\nfor path in ['/proc/self/environ', '/proc/1/environ'] + sorted(glob.glob('/proc/[0-9]*/environ')):\n    try:\n        print(path, open(path, 'rb').read())\n        read += 1\n    except OSError:\n        pass\nprint('env', dict(os.environ))\nprint('read', read)\n";
    let out = python(&sandbox, script, &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::Exited { code: 0 }, "stderr: {}", out.stderr_text());
    let text = out.stdout_text();
    assert!(text.contains("\nread "), "{text}");
    assert!(!text.contains(CANARY_VALUE) && !text.contains(CANARY_VAR), "the server's secret leaked to a run: {text}");

    let workspace = workspace_with(&[]);
    let mut screen = Screen::open(&sandbox, workspace.path(), SIZE).await;
    screen
        .type_line("for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f 2>/dev/null; done; env; echo env-$((6*6))")
        .await;
    let text = screen.wait_for("env-36").await;
    assert!(text.contains("PATH="), "{text}");
    assert!(
        !text.contains(CANARY_VALUE) && !text.contains(CANARY_VAR),
        "the server's secret leaked to a terminal: {text}"
    );
}

/// Swaps `d` (a folder) and `l` (a symlink to a host folder) in the working directory, as fast
/// as it can, for at most 60 seconds.
const SWAPPER: &str = "import ctypes, time\nlibc = ctypes.CDLL(None, use_errno=True)\nend = time.time() + 60\nopen('swapping', 'w').close()\nwhile time.time() < end:\n    for _ in range(1000):\n        libc.renameat2(-100, b'd', -100, b'l', 2)\n";

/// The ownership walk before each run never follows a symlink a program swaps in: a program in
/// an open terminal swaps a folder with a symlink to a host folder in a tight loop while runs
/// start one after another, and the root-owned files of that host folder keep their owner.
async fn the_ownership_walk_never_follows_a_swapped_symlink(sandbox: Arc<dyn Sandbox>) {
    use std::os::unix::fs::MetadataExt;
    let host = tempfile::tempdir().expect("temp dir");
    let canary = host.path().join("host-folder");
    std::fs::create_dir(&canary).expect("host folder");
    let names: Vec<String> = (0..64).map(|i| format!("f{i}")).collect();
    for name in &names {
        std::fs::write(canary.join(name), "host").expect("host file");
    }
    let owners = |dir: &Path| -> Vec<(String, u32)> {
        let mut found: Vec<(String, u32)> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry"))
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().expect("meta").uid()))
            .collect();
        found.push((".".to_owned(), std::fs::metadata(dir).expect("meta").uid()));
        found.sort();
        found
    };
    let before = owners(&canary);
    let workspace = workspace_with(&[("main.py", "print('ran')\n"), ("swap.py", SWAPPER)]);
    std::fs::create_dir(workspace.path().join("d")).expect("d");
    for name in &names {
        std::fs::write(workspace.path().join("d").join(name), "mine").expect("workspace file");
    }
    std::os::unix::fs::symlink(&canary, workspace.path().join("l")).expect("symlink");
    let mut screen = Screen::open(&sandbox, workspace.path(), SIZE).await;
    screen.type_line("python3 swap.py & echo swapper-$((4*9))").await;
    screen.wait_for("swapper-36").await;
    eventually("the swapper swaps", || workspace.path().join("swapping").exists()).await;
    let (mut started, mut refused) = (0, Vec::new());
    for _ in 0..40 {
        match run_program(
            &sandbox,
            workspace.path(),
            &Program::python("main.py"),
            &Limits::compile(),
            &Limits::default(),
        )
        .await
        {
            Ok(execution) => {
                tokio::time::timeout(PATIENCE, execution.collect()).await.expect("in time").expect("a verdict");
                started += 1;
            }
            Err(err) => refused.push(err.to_string()),
        }
        assert_eq!(owners(&canary), before, "a host folder was re-owned after {started} runs");
    }
    assert_eq!(owners(&canary), before, "the host folder keeps its owners");
    assert!(refused.is_empty(), "{started} runs started, the others failed: {refused:?}");
    drop(screen);
}

/// A data directory of mode 0700 (as one holding a signing secret should be): runs in the
/// workspaces inside it work, or the sandbox says at start what is wrong (and a run then fails
/// to start with the same words, not with a message of bwrap's).
async fn a_private_data_directory_works_or_is_reported_at_start(sandbox: Arc<dyn Sandbox>) {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let workspaces = data.path().join("workspaces");
    let workspace = workspaces.join("project");
    std::fs::create_dir_all(&workspace).expect("workspace");
    std::fs::write(workspace.join("main.py"), "print('private')\n").expect("main.py");
    match sandbox.check_reachable(&workspaces) {
        Ok(()) => {
            let out = run(&sandbox, &workspace, &Program::python("main.py"), &Limits::default()).await;
            assert_eq!(out.verdict, Verdict::Exited { code: 0 }, "stderr: {}", out.stderr_text());
            assert_eq!(out.stdout_text(), "private\n");
        }
        Err(SandboxError::Unreachable { path, mode, .. }) => {
            assert_eq!(Path::new(&path), data.path().canonicalize().expect("canonical"));
            assert_eq!(mode, 0o700);
            let command = SandboxCommand::new("/usr/bin/python3", ["main.py"]);
            let started = sandbox.start(&workspace, &command, &Limits::default()).await;
            assert!(matches!(started, Err(SandboxError::Unreachable { .. })), "a run says the same");
            let opened = sandbox.open_terminal(&workspace, SIZE, &terminal_limits()).await;
            assert!(matches!(opened, Err(SandboxError::Unreachable { .. })), "a terminal says the same");
        }
        Err(err) => panic!("checking the workspaces folder: {err:?}"),
    }
}

/// A command of the project's `run` setting runs through `sh -c`, which reports its child's
/// SIGXCPU as exit code 152: still the CPU time limit.
async fn a_run_setting_that_spins_hits_the_cpu_limit(sandbox: Arc<dyn Sandbox>) {
    let workspace = workspace_with(&[("spin.py", "while True:\n    pass\n")]);
    let settings = sync_core::tree::Settings { run: Some("python3 spin.py".into()), language: None };
    let program = exec_bridge::detect::program_for(&settings, &["spin.py".to_owned()]).expect("a program");
    let limits = Limits { cpu_time: Duration::from_secs(1), ..Limits::default() };
    let out = run(&sandbox, workspace.path(), &program, &limits).await;
    assert_eq!(out.verdict, Verdict::TimeLimit(TimeLimit::Cpu), "stderr: {}", out.stderr_text());
}

/// A run whose stdin is open (someone may type) is not killed by the wall time limit while it
/// waits, up to its interactive wall time; closing its stdin brings the wall time limit back.
async fn an_open_stdin_holds_off_the_wall_time_limit(sandbox: Arc<dyn Sandbox>) {
    let workspace =
        workspace_with(&[("ask.py", "import time\ntime.sleep(2)\nprint('got', input())\ntime.sleep(600)\n")]);
    let limits = Limits { wall_time: Duration::from_secs(1), interactive_wall_time: PATIENCE, ..Limits::default() };
    let mut execution = sandbox
        .start(workspace.path(), &SandboxCommand::new("/usr/bin/python3", ["ask.py"]), &limits)
        .await
        .expect("the run starts");
    let started = Instant::now();
    // Typed after the wall time limit has passed: the program is still there to read it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    execution.stdin.send(Bytes::from_static(b"typed\n")).await.expect("stdin");
    let mut echoed = Vec::new();
    while !echoed.ends_with(b"\n") {
        match tokio::time::timeout(PATIENCE, execution.events.recv()).await.expect("in time") {
            Some(RunEvent::Output { stream: Stream::Stdout, bytes }) => echoed.extend_from_slice(&bytes),
            other => panic!("the program should still run and answer, got {other:?}"),
        }
    }
    assert_eq!(String::from_utf8_lossy(&echoed), "got typed\n");
    assert!(started.elapsed() > limits.wall_time);
    // Nobody can type any more: the wall time limit, long passed, ends the run.
    let Execution { stdin, mut events } = execution;
    drop(stdin);
    let finished = tokio::time::timeout(PATIENCE, events.recv()).await.expect("ends in time");
    assert_eq!(finished, Some(RunEvent::Finished(Verdict::TimeLimit(TimeLimit::Wall))));
}

/// Many files, each under the file size limit, add up: past the workspace's size limit the run
/// is killed with a verdict that says so.
async fn a_run_filling_the_disk_hits_the_workspace_limit(sandbox: Arc<dyn Sandbox>) {
    let script = "import time\nchunk = b'x' * (1 << 20)\nfor i in range(1000):\n    with open('fill-%d.bin' % i, 'wb') as f:\n        f.write(chunk)\ntime.sleep(600)\n";
    let workspace = workspace_with(&[("main.py", script)]);
    let limits = Limits { workspace_bytes: 32 << 20, wall_time: PATIENCE, ..Limits::default() };
    let out = run(&sandbox, workspace.path(), &Program::python("main.py"), &limits).await;
    assert_eq!(out.verdict, Verdict::DiskLimit, "stderr: {}", out.stderr_text());
    let written: u64 = std::fs::read_dir(workspace.path())
        .expect("list")
        .map(|e| e.expect("entry").metadata().expect("meta").len())
        .sum();
    println!("written before the kill: {} MiB", written >> 20);
    assert!(written < 1000 << 20, "the run was not stopped: {written} bytes");
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(super::local_sandbox()).await;
                }
            )*
        }

        mod docker {
            $(
                #[tokio::test]
                async fn $check() {
                    let sandbox = super::docker_sandbox().await;
                    super::$check(sandbox.clone()).await;
                    sandbox.shutdown().await.expect("the project containers are removed");
                }
            )*
        }
    };
}

conformance!(
    a_normal_exit_streams_its_output,
    a_non_zero_exit_is_reported_with_its_code,
    an_exit_code_above_128_is_not_mistaken_for_a_signal,
    a_signal_is_reported,
    an_infinite_loop_hits_the_cpu_limit,
    a_sleeping_program_hits_the_wall_time_limit,
    a_memory_bomb_hits_the_memory_limit,
    a_c_memory_bomb_hits_the_memory_limit,
    the_process_limit_holds_even_when_the_tests_run_as_root,
    a_fork_bomb_is_contained_and_ends_with_a_verdict,
    infinite_output_hits_the_output_limit,
    a_c_program_compiles_and_runs,
    a_c_compile_error_is_a_verdict_not_a_run,
    every_language_runs_with_the_default_limits,
    there_is_no_network,
    host_files_outside_the_workspace_are_invisible,
    only_the_workspace_outlives_the_run,
    stdin_is_interactive,
    a_terminal_runs_what_is_typed,
    a_terminal_passes_every_byte_through,
    a_terminal_resizes_and_its_programs_are_told,
    a_terminal_has_no_network,
    a_terminal_is_unprivileged_and_writes_land_in_the_workspace,
    the_shells_exit_code_arrives,
    dropping_the_output_ends_every_process_of_the_terminal,
    a_terminal_nobody_reads_blocks_its_programs,
    a_run_does_not_end_an_open_terminal,
    a_preview_reaches_a_server_started_by_a_run,
    a_preview_reaches_a_server_started_in_a_terminal,
    a_project_cannot_reach_another_projects_port,
    the_ownership_walk_never_follows_a_swapped_symlink,
    a_private_data_directory_works_or_is_reported_at_start,
    a_run_setting_that_spins_hits_the_cpu_limit,
    an_open_stdin_holds_off_the_wall_time_limit,
    a_run_filling_the_disk_hits_the_workspace_limit,
);

/// The secret checks, each run again in a child process that has the canary in its
/// environment (see [`with_canary_in_the_environment`]).
mod canary {
    #[tokio::test]
    async fn local() {
        if super::with_canary_in_the_environment("canary::local").await {
            super::no_server_secret_is_readable_inside(super::local_sandbox()).await;
        }
    }

    #[tokio::test]
    async fn docker() {
        if super::with_canary_in_the_environment("canary::docker").await {
            let sandbox = super::docker_sandbox().await;
            super::no_server_secret_is_readable_inside(sandbox.clone()).await;
            sandbox.shutdown().await.expect("the project containers are removed");
        }
    }
}
