//! The steps `cargo xtask` runs: what each one does, running a plan of them, and the summary table.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow};

use crate::{apt, cmd, docker, postgres};

/// One unit of work with a header line and a row in the summary.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    AptPackages(&'static [apt::Package]),
    StartPostgres,
    /// Starts `dockerd` unless an engine answers already.
    StartDocker,
    /// Builds the Docker sandbox's runtime images that do not exist yet.
    RuntimeImages,
    Fmt,
    NpmInstall,
    /// `npm ci` in `loadtest/servers`: the reference Yjs servers the load tests compare against.
    NpmInstallReference,
    NpmLint,
    NpmTypecheck,
    NpmBuild,
    Clippy,
    BuildBins,
    BuildServer,
    RustTests,
    DocTests,
    PythonTests,
    NodeTests,
}

/// The step's name in its header line and in the summary.
fn name(step: Step) -> &'static str {
    match step {
        Step::AptPackages(_) => "apt packages",
        Step::StartPostgres => "start postgres",
        Step::StartDocker => "start dockerd",
        Step::RuntimeImages => "runtime images",
        Step::Fmt => "cargo fmt --check",
        Step::NpmInstall => "npm ci",
        Step::NpmInstallReference => "npm ci (reference servers)",
        Step::NpmLint => "npm run lint",
        Step::NpmTypecheck => "npm run typecheck",
        Step::NpmBuild => "npm run build",
        Step::Clippy => "cargo clippy",
        Step::BuildBins => "cargo build --bins",
        Step::BuildServer => "cargo build collab",
        Step::RustTests => "rust tests",
        Step::DocTests => "rust doc tests",
        Step::PythonTests => "python interop tests",
        Step::NodeTests => "npm test",
    }
}

/// What the steps share: where the workspace is, and variables for the test processes that
/// earlier steps (starting services) provide.
#[derive(Debug)]
pub struct Context {
    root: PathBuf,
    test_env: Vec<(&'static str, String)>,
}

impl Context {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf(), test_env: Vec::new() }
    }
}

/// The Cargo target directory: `$CARGO_TARGET_DIR` (relative to the workspace) or `target/`.
pub fn target_dir(root: &Path) -> PathBuf {
    target_dir_from(root, std::env::var_os("CARGO_TARGET_DIR"))
}

/// [`target_dir`] with the value of `CARGO_TARGET_DIR` given.
fn target_dir_from(root: &Path, cargo_target_dir: Option<std::ffi::OsString>) -> PathBuf {
    match cargo_target_dir {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// The dev build of the server binary.
pub fn collab_bin(root: &Path) -> PathBuf {
    target_dir(root).join("debug").join("collab")
}

/// Prints the step's header and runs it; returns a note for the summary.
pub fn run_step(step: Step, ctx: &mut Context) -> Result<String> {
    println!("\n==> {}", name(step));
    match step {
        Step::AptPackages(packages) => apt::ensure(packages),
        Step::StartPostgres => {
            let port = postgres::start(&target_dir(&ctx.root))?;
            ctx.test_env.push(("COLLAB_TEST_POSTGRES_URL", postgres::url(port)));
            Ok(format!("port {port}"))
        }
        Step::StartDocker => docker::ensure_engine(&target_dir(&ctx.root)),
        Step::RuntimeImages => docker::ensure_images(&target_dir(&ctx.root)),
        Step::Fmt => ran(cargo(ctx).args(["fmt", "--all", "--", "--check"]), ""),
        Step::NpmInstall => npm_install(&ctx.root.join("web"), &[]),
        Step::NpmInstallReference => reference_servers(&ctx.root),
        Step::NpmLint => ran(npm(ctx).args(["run", "lint"]), ""),
        Step::NpmTypecheck => ran(npm(ctx).args(["run", "typecheck"]), ""),
        Step::NpmBuild => ran(npm(ctx).args(["run", "build"]), ""),
        Step::Clippy => ran(cargo(ctx).args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]), ""),
        Step::BuildBins => ran(cargo(ctx).args(["build", "--workspace", "--bins"]), ""),
        Step::BuildServer => ran(cargo(ctx).args(["build", "-p", "collab-server", "--bin", "collab"]), ""),
        // Only nextest applies the kill timeouts of .config/nextest.toml, so it is installed
        // rather than done without.
        Step::RustTests => {
            if !has_nextest(ctx) {
                cmd::run(cargo(ctx).args(["install", "cargo-nextest", "--locked"]))?;
            }
            ran(
                cargo(ctx).args(["nextest", "run", "--workspace", "--no-fail-fast"]).envs(ctx.test_env.iter().cloned()),
                "cargo nextest",
            )
        }
        Step::DocTests => ran(cargo(ctx).args(["test", "--workspace", "--doc"]).envs(ctx.test_env.iter().cloned()), ""),
        Step::PythonTests => python_tests(ctx),
        Step::NodeTests => {
            ran(npm(ctx).arg("test").envs(ctx.test_env.iter().cloned()).env("COLLAB_BIN", collab_bin(&ctx.root)), "")
        }
    }
}

/// Runs `cmd` as the whole of a step; `note` goes to the summary.
fn ran(cmd: &mut Command, note: &str) -> Result<String> {
    cmd::run(cmd)?;
    Ok(note.to_owned())
}

/// `cargo` (the one running xtask, if known), in the workspace root.
fn cargo(ctx: &Context) -> Command {
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo.current_dir(&ctx.root);
    cargo
}

/// `npm`, in `web/`.
fn npm(ctx: &Context) -> Command {
    let mut npm = Command::new("npm");
    npm.current_dir(ctx.root.join("web"));
    npm
}

fn has_nextest(ctx: &Context) -> bool {
    cmd::succeeds(cargo(ctx).args(["nextest", "--version"]))
}

/// Runs the pycrdt interop tests in a virtualenv under the target directory, installing the
/// pinned requirements when they changed since the last install.
fn python_tests(ctx: &Context) -> Result<String> {
    let venv = target_dir(&ctx.root).join("xtask").join("venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        cmd::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let requirements = ctx.root.join("interop").join("python").join("requirements.txt");
    let marker = venv.join("installed-requirements.txt");
    let wanted =
        fs::read_to_string(&requirements).with_context(|| format!("cannot read {}", requirements.display()))?;
    if fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
        cmd::run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "-r"]).arg(&requirements))?;
        fs::write(&marker, &wanted).with_context(|| format!("cannot write {}", marker.display()))?;
    }
    let mut pytest = Command::new(&python);
    pytest
        .args(["-m", "pytest", "-q", "interop/python"])
        .current_dir(&ctx.root)
        .env("COLLAB_BIN", collab_bin(&ctx.root));
    ran(&mut pytest, "pycrdt peers")
}

/// Runs `npm ci` unless `web/node_modules` is at least as new as `web/package-lock.json`.
/// `npm ci` in `dir` unless its node_modules is newer than its lock file.
fn npm_install(dir: &Path, extra: &[&str]) -> Result<String> {
    // npm writes this file at the end of every install, so it dates the last complete one.
    let installed = modified(&dir.join("node_modules").join(".package-lock.json"))?;
    let lock = modified(&dir.join("package-lock.json"))?
        .with_context(|| format!("{} is missing", dir.join("package-lock.json").display()))?;
    if installed.is_some_and(|installed| installed >= lock) {
        println!("{}/node_modules is up to date with its package-lock.json", dir.display());
        return Ok("up to date".to_owned());
    }
    cmd::run(Command::new("npm").arg("ci").args(extra).current_dir(dir))?;
    Ok("installed".to_owned())
}

/// Installs the y-websocket reference server and Hocuspocus, without y-websocket's optional
/// LevelDB persistence (a native build the benchmarks do not use).
pub fn reference_servers(root: &Path) -> Result<String> {
    npm_install(&root.join("loadtest").join("servers"), &["--omit=optional", "--ignore-scripts"])
}

/// The modification time of `path`, or `None` if it does not exist.
fn modified(path: &Path) -> Result<Option<SystemTime>> {
    match fs::metadata(path) {
        Ok(meta) => Ok(Some(meta.modified().with_context(|| format!("no mtime for {}", path.display()))?)),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// How a step ended.
#[derive(Debug)]
enum Outcome {
    Passed(String),
    Failed,
    NotRun,
}

/// One row of the summary.
#[derive(Debug)]
pub struct StepResult {
    name: &'static str,
    outcome: Outcome,
    elapsed: Duration,
}

/// Set once Ctrl-C is pressed; the plan stops after the step that is running.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// From now on, Ctrl-C no longer kills xtask: the running child (which gets the signal too) ends,
/// the plan stops, and the cleanup still runs.
pub fn catch_ctrl_c() -> Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = ready_tx.send(Err(err));
                    return;
                }
            };
            runtime.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let mut interrupts = match signal(SignalKind::interrupt()) {
                    Ok(interrupts) => interrupts,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while interrupts.recv().await.is_some() {
                    INTERRUPTED.store(true, Ordering::SeqCst);
                    eprintln!("\nxtask: interrupted; stopping after the current step");
                }
            });
        })
        .context("cannot start the Ctrl-C thread")?;
    ready_rx.recv().context("the Ctrl-C thread ended early")?.context("cannot catch Ctrl-C")
}

/// Whether Ctrl-C was pressed since `catch_ctrl_c`.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Runs `plan` in order, stopping at the first failure (or Ctrl-C); later steps are not run.
pub fn run_plan(plan: &[Step], ctx: &mut Context) -> Vec<StepResult> {
    let mut results = Vec::new();
    let mut failed = false;
    for &step in plan {
        if failed {
            results.push(StepResult { name: name(step), outcome: Outcome::NotRun, elapsed: Duration::ZERO });
            continue;
        }
        let started = Instant::now();
        let mut outcome = run_step(step, ctx);
        if outcome.is_ok() && interrupted() {
            outcome = Err(anyhow!("interrupted"));
        }
        failed = outcome.is_err();
        results.push(finish(name(step), outcome, started));
    }
    results
}

/// Runs a step that must happen whatever happened before (stopping services).
pub fn run_cleanup(name: &'static str, f: impl FnOnce() -> Result<String>) -> StepResult {
    println!("\n==> {name}");
    let started = Instant::now();
    finish(name, f(), started)
}

/// Records how a step ended, announcing a failure right away.
fn finish(name: &'static str, outcome: Result<String>, started: Instant) -> StepResult {
    let elapsed = started.elapsed();
    let outcome = match outcome {
        Ok(note) => Outcome::Passed(note),
        Err(err) => {
            eprintln!("\nxtask: step `{name}` failed: {err:#}");
            Outcome::Failed
        }
    };
    StepResult { name, outcome, elapsed }
}

/// Prints the table of steps and the final count; success only if every step passed.
pub fn print_summary(results: &[StepResult]) -> ExitCode {
    let width = results.iter().map(|r| r.name.len()).max().unwrap_or(0);
    println!("\n==> summary");
    for result in results {
        let (status, note) = match &result.outcome {
            Outcome::Passed(note) => ("ok", note.as_str()),
            Outcome::Failed => ("FAILED", ""),
            Outcome::NotRun => ("not run", ""),
        };
        let time = match result.outcome {
            Outcome::NotRun => String::new(),
            _ => format_duration(result.elapsed),
        };
        let line = format!("  {:<width$}  {status:<7}  {time:>7}  {note}", result.name);
        println!("{}", line.trim_end());
    }
    let passed = results.iter().filter(|r| matches!(r.outcome, Outcome::Passed(_))).count();
    let failed = results.iter().filter(|r| matches!(r.outcome, Outcome::Failed)).count();
    println!("xtask: {passed} passed, {failed} failed");
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// `4.2s`, or `3m07s` from a minute on.
fn format_duration(elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = elapsed.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(Duration::from_millis(4_240)), "4.2s");
        assert_eq!(format_duration(Duration::from_secs(187)), "3m07s");
    }

    #[test]
    fn a_relative_target_dir_is_taken_from_the_workspace_root() {
        let root = Path::new("/w");
        assert_eq!(target_dir_from(root, Some("out/t".into())), Path::new("/w/out/t"));
        assert_eq!(target_dir_from(root, Some("/abs/t".into())), Path::new("/abs/t"));
        assert_eq!(target_dir_from(root, Some("".into())), Path::new("/w/target"));
        assert_eq!(target_dir_from(root, None), Path::new("/w/target"));
    }
}
