//! The sandbox conformance suite: every verdict and every isolation promise of [`Sandbox`], run
//! against each implementation (bubblewrap, Docker) with real python3 and gcc.
//!
//! Each check is an `async fn` taking the sandbox; the `conformance!` macro at the end makes a
//! test of it per implementation (`local::NAME`, `docker::NAME`).

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::workspace_with;
use exec_bridge::run::{Limits, Program, RunEvent, RunOutput, Stream, TimeLimit, Verdict, run_program};
use exec_bridge::sandbox::docker::{DockerSandbox, DockerSandboxConfig};
use exec_bridge::sandbox::local::{LocalSandbox, LocalSandboxConfig};
use exec_bridge::sandbox::{Sandbox, SandboxCommand};

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
    let workspace = workspace_with(&[("bomb.py", script)]);
    let execution = run_program(&sandbox, workspace.path(), &Program::python("bomb.py"), &Limits::compile(), &limits)
        .await
        .expect("the run starts");
    let collecting = tokio::spawn(execution.collect());
    tokio::time::sleep(Duration::from_millis(500)).await;
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
    there_is_no_network,
    host_files_outside_the_workspace_are_invisible,
    only_the_workspace_outlives_the_run,
    stdin_is_interactive,
);
