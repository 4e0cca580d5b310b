//! `cargo xtask`: one command to run the server locally (`run`), one to run a local cluster behind
//! HAProxy (`cluster`), and one to run every check CI runs (`test`).

mod apt;
mod cluster;
mod cmd;
mod docker;
mod postgres;
mod redis;
mod steps;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use steps::Step;

#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "Development tasks of the collab workspace")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build the web front end and the server, then run `collab serve --demo` on 127.0.0.1:8080.
    Run {
        /// Extra arguments for `collab serve`, after `--`; a flag given here replaces xtask's default.
        #[arg(last = true)]
        serve_args: Vec<String>,
    },
    /// Build like `run`, then start a local cluster: the tests' throwaway PostgreSQL, a private
    /// Redis, N `collab serve` nodes on 127.0.0.1:8081.. (the first with `--demo`) sharing
    /// data/cluster, and HAProxy on 127.0.0.1:8080 routing each project to one node
    /// (deploy/haproxy.cfg). Ctrl-C stops everything.
    Cluster {
        /// Number of nodes.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
        nodes: u16,
    },
    /// Install and start the services the tests need, then run every check and test, stopping at
    /// the first failure.
    Test,
    /// Run the benchmarks (release build): document loading against SQLite and the throwaway
    /// PostgreSQL, the classroom on one node against two over Redis, every load scenario side by
    /// side with the reference Yjs servers, and the soak, printing the tables BENCHMARKS.md
    /// records and writing plots to target/bench.
    Bench {
        /// Runs of each side-by-side measurement (figures are medians).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Length of the soak; 0 skips it.
        #[arg(long, default_value_t = 30.0)]
        soak_minutes: f64,
        /// A few seconds per scenario, to try the command out.
        #[arg(long)]
        quick: bool,
    },
    /// Install Docker and debootstrap, start dockerd unless an engine answers, and build the
    /// exec-bridge Docker sandbox's runtime images from Debian packages (as `test` does).
    Images,
    /// Start or stop the tests' throwaway PostgreSQL cluster by hand, e.g. to run one test.
    Postgres {
        #[command(subcommand)]
        action: PostgresAction,
    },
}

#[derive(Debug, Subcommand)]
enum PostgresAction {
    /// Start the cluster (or reuse the running one) and print its `COLLAB_TEST_POSTGRES_URL`.
    Start,
    /// Stop the cluster if it runs.
    Stop,
}

const CHROMIUM: apt::Package = apt::Package { name: "chromium", needed_by: "browser tests in web/test" };
const POSTGRESQL: apt::Package =
    apt::Package { name: "postgresql", needed_by: "PostgreSQL store tests and cargo xtask cluster" };
// Debian's postinst may start a system redis-server on 6379; the tests and `cluster` start
// their own on free ports and never use it.
const REDIS: apt::Package =
    apt::Package { name: "redis-server", needed_by: "cluster tests (Redis bus) and cargo xtask cluster" };
const HAPROXY: apt::Package =
    apt::Package { name: "haproxy", needed_by: "the load-balancer test (deploy/haproxy.cfg) and cargo xtask cluster" };

const BUBBLEWRAP: apt::Package =
    apt::Package { name: "bubblewrap", needed_by: "exec-bridge sandbox tests (the local sandbox runs bwrap)" };
const GNU_TIME: apt::Package =
    apt::Package { name: "time", needed_by: "exec-bridge sandbox tests (GNU time reports each run's verdict)" };
const DOCKER: apt::Package =
    apt::Package { name: "docker.io", needed_by: "exec-bridge Docker sandbox tests (dockerd, the docker client)" };
const DEBOOTSTRAP: apt::Package =
    apt::Package { name: "debootstrap", needed_by: "the Docker sandbox's runtime images, built from Debian packages" };

const PYTHON: apt::Package =
    apt::Package { name: "python3", needed_by: "the demo project's run (python3 main.py) in the local sandbox" };

/// Packages `cargo xtask run` installs with apt: the embedded default's local sandbox.
const RUN_APT_PACKAGES: &[apt::Package] = &[BUBBLEWRAP, GNU_TIME, PYTHON];

/// Packages `cargo xtask images` installs with apt.
const DOCKER_APT_PACKAGES: &[apt::Package] = &[DOCKER, DEBOOTSTRAP];

/// Packages `cargo xtask test` installs with apt, each with the reason it is needed.
const APT_PACKAGES: &[apt::Package] =
    &[CHROMIUM, POSTGRESQL, REDIS, HAPROXY, BUBBLEWRAP, GNU_TIME, PYTHON, DOCKER, DEBOOTSTRAP];

/// Packages `cargo xtask cluster` installs with apt.
const CLUSTER_APT_PACKAGES: &[apt::Package] = &[POSTGRESQL, REDIS, HAPROXY];

/// What `cargo xtask test` runs, in order.
const TEST_PLAN: &[Step] = &[
    Step::AptPackages(APT_PACKAGES),
    Step::StartPostgres,
    Step::StartDocker,
    Step::RuntimeImages,
    Step::Fmt,
    Step::NpmInstall,
    Step::NpmInstallReference,
    Step::NpmLint,
    Step::NpmTypecheck,
    Step::NpmBuild,
    Step::Clippy,
    Step::BuildBins,
    Step::RustTests,
    Step::DocTests,
    Step::PythonTests,
    Step::NodeTests,
];

/// What `cargo xtask images` runs.
const IMAGES_PLAN: &[Step] = &[Step::AptPackages(DOCKER_APT_PACKAGES), Step::StartDocker, Step::RuntimeImages];

/// What `cargo xtask run` builds before it starts the server.
const RUN_PLAN: &[Step] = &[Step::AptPackages(RUN_APT_PACKAGES), Step::NpmInstall, Step::NpmBuild, Step::BuildServer];

/// What `cargo xtask cluster` installs and builds before it starts the services.
const CLUSTER_PLAN: &[Step] =
    &[Step::AptPackages(CLUSTER_APT_PACKAGES), Step::NpmInstall, Step::NpmBuild, Step::BuildServer];

/// `collab serve` flags `cargo xtask run` passes unless the extra arguments give them.
const SERVE_DEFAULTS: &[(&str, Option<&str>)] = &[
    ("--listen", Some("127.0.0.1:8080")),
    ("--data-dir", Some("data")),
    ("--web-dir", Some("web/dist")),
    ("--demo", None),
    ("--sandbox", Some("local")),
    // Previews from origins of their own: another port, and a host name per project.
    ("--preview-listen", Some("127.0.0.1:8081")),
    ("--preview-url", Some("http://{project}.localhost:8081")),
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = workspace_root().and_then(|root| match cli.command {
        Task::Run { serve_args } => run(&root, &serve_args),
        Task::Cluster { nodes } => run_cluster(&root, nodes),
        Task::Test => test(&root),
        Task::Bench { runs, soak_minutes, quick } => bench(&root, runs, soak_minutes, quick),
        Task::Images => images(&root),
        Task::Postgres { action } => postgres_by_hand(&root, action),
    });
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().with_context(|| format!("{} has no parent directory", manifest_dir.display()))?;
    Ok(root.to_path_buf())
}

/// Builds what the server needs, then replaces this process with `collab serve`.
fn run(root: &Path, serve_args: &[String]) -> Result<ExitCode> {
    let mut ctx = steps::Context::new(root);
    for &step in RUN_PLAN {
        steps::run_step(step, &mut ctx)?;
    }
    let args = serve_command_args(serve_args);
    let mut serve = std::process::Command::new(steps::collab_bin(root));
    serve.args(&args).current_dir(root);
    let listen = flag_value(&args, "--listen").unwrap_or("127.0.0.1:8080");
    println!("\n==> starting the collab server on {listen}: {}", cmd::describe(&serve));
    // `exec` only returns on failure; the server then owns the terminal and gets Ctrl-C itself.
    let err = std::os::unix::process::CommandExt::exec(&mut serve);
    Err(err).with_context(|| format!("cannot start {}", cmd::describe(&serve)))
}

/// `serve` followed by the default flags the extra arguments do not override, then the extras.
fn serve_command_args(extra: &[String]) -> Vec<String> {
    let mut args = vec!["serve".to_owned()];
    for &(flag, value) in SERVE_DEFAULTS {
        if flag_value(extra, flag).is_some() {
            continue;
        }
        args.push(flag.to_owned());
        args.extend(value.map(str::to_owned));
    }
    args.extend(extra.iter().cloned());
    args
}

/// The value given to `flag` in `args` (`--flag value`, `--flag=value`, or "" for a bare `--flag`).
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == flag {
            let next = args.get(i + 1).map(String::as_str);
            return Some(next.filter(|v| !v.starts_with("--")).unwrap_or(""));
        }
        arg.strip_prefix(flag)?.strip_prefix('=')
    })
}

/// Installs and builds what the cluster needs, then runs it until Ctrl-C.
fn run_cluster(root: &Path, nodes: u16) -> Result<ExitCode> {
    let mut ctx = steps::Context::new(root);
    for &step in CLUSTER_PLAN {
        steps::run_step(step, &mut ctx)?;
    }
    cluster::run(root, nodes)
}

/// Runs `TEST_PLAN`, always stops PostgreSQL afterwards, and prints the summary.
fn test(root: &Path) -> Result<ExitCode> {
    steps::catch_ctrl_c()?;
    let mut ctx = steps::Context::new(root);
    let mut results = steps::run_plan(TEST_PLAN, &mut ctx);
    let target_dir = steps::target_dir(root);
    results.push(steps::run_cleanup("stop postgres", || postgres::stop(&target_dir)));
    Ok(steps::print_summary(&results))
}

/// Builds the release binaries and installs the reference servers, then runs `collab-bench
/// load` against SQLite and the throwaway PostgreSQL (stopped again whatever happened), and
/// `collab-bench compare` and `soak` with the servers pinned to core 0 and the generator to core 1.
/// Packages `cargo xtask bench` installs with apt.
const BENCH_APT_PACKAGES: &[apt::Package] = &[POSTGRESQL, REDIS, BUBBLEWRAP, GNU_TIME, DOCKER, DEBOOTSTRAP];

fn bench(root: &Path, runs: usize, soak_minutes: f64, quick: bool) -> Result<ExitCode> {
    apt::ensure(BENCH_APT_PACKAGES)?;
    let cargo = || std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "collab-server",
        "--bin",
        "collab",
        "-p",
        "loadtest",
        "--bin",
        "collab-bench",
        "-p",
        "exec-bridge",
        "--bin",
        "exec-bench",
    ]);
    cmd::run(build.current_dir(root))?;
    steps::reference_servers(root)?;
    let release = steps::target_dir(root).join("release");
    let target_dir = steps::target_dir(root);
    let out = target_dir.join("bench");
    let pinned = |what: &str| {
        let mut c = std::process::Command::new("taskset");
        c.args(["-c", "1"]).arg(release.join("collab-bench")).arg(what);
        c.arg("--collab").arg(release.join("collab")).arg("--reference").arg(root.join("loadtest/servers"));
        c.arg("--core").arg("0").current_dir(root);
        c
    };
    let port = postgres::start(&target_dir)?;
    let mut load = std::process::Command::new(release.join("collab-bench"));
    load.arg("load").arg(postgres::url(port)).current_dir(root);
    let loaded = cmd::run(&mut load).and_then(|_| {
        // One node against two over Redis, both on the PostgreSQL store.
        let mut cluster = pinned("cluster");
        cluster.arg("--database-url").arg(postgres::url(port)).arg("--runs").arg(runs.to_string());
        if quick {
            cluster.arg("--quick");
        }
        cmd::run(&mut cluster)
    });
    postgres::stop(&target_dir)?;
    loaded?;
    // Run start latency of the sandboxes, against plain docker and bwrap.
    docker::ensure_engine(&target_dir)?;
    docker::ensure_images(&target_dir)?;
    cmd::run(std::process::Command::new(release.join("exec-bench")).current_dir(root))?;
    let mut compare = pinned("compare");
    compare.arg("--out").arg(&out).arg("--runs").arg(runs.to_string());
    if quick {
        compare.arg("--quick");
    }
    cmd::run(&mut compare)?;
    if soak_minutes > 0.0 {
        let minutes = if quick { soak_minutes.min(0.5) } else { soak_minutes };
        cmd::run(pinned("soak").arg("--out").arg(&out).arg("--minutes").arg(minutes.to_string()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `IMAGES_PLAN` and prints its summary.
fn images(root: &Path) -> Result<ExitCode> {
    let mut ctx = steps::Context::new(root);
    let results = steps::run_plan(IMAGES_PLAN, &mut ctx);
    Ok(steps::print_summary(&results))
}

fn postgres_by_hand(root: &Path, action: PostgresAction) -> Result<ExitCode> {
    let target_dir = steps::target_dir(root);
    match action {
        PostgresAction::Start => {
            let port = postgres::start(&target_dir)?;
            println!("export COLLAB_TEST_POSTGRES_URL={}", postgres::url(port));
        }
        PostgresAction::Stop => println!("{}", postgres::stop(&target_dir)?),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn extra_serve_args_replace_the_defaults_they_name() {
        let extra = strings(&["--listen=0.0.0.0:9000", "--data-dir", "/tmp/d", "--allow-anonymous"]);
        assert_eq!(
            serve_command_args(&extra),
            strings(&[
                "serve",
                "--web-dir",
                "web/dist",
                "--demo",
                "--sandbox",
                "local",
                "--preview-listen",
                "127.0.0.1:8081",
                "--preview-url",
                "http://{project}.localhost:8081",
                "--listen=0.0.0.0:9000",
                "--data-dir",
                "/tmp/d",
                "--allow-anonymous"
            ])
        );
    }

    #[test]
    fn flag_values_are_found_in_both_spellings() {
        let args = strings(&["--listen", "1.2.3.4:5", "--demo", "--web-dir=x"]);
        assert_eq!(flag_value(&args, "--listen"), Some("1.2.3.4:5"));
        assert_eq!(flag_value(&args, "--demo"), Some(""));
        assert_eq!(flag_value(&args, "--web-dir"), Some("x"));
        assert_eq!(flag_value(&args, "--data-dir"), None);
    }
}
