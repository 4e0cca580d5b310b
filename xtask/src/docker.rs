//! The Docker engine and runtime images of the Docker sandbox tests: `dockerd` started when it
//! does not answer (its log under the target directory), and the runtime images built from
//! Debian packages with `debootstrap` and `docker import`, never pulled.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// A runtime image: its name and the Debian packages on top of `debootstrap --variant=minbase`.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeImage {
    /// Bump the tag when the packages change: an existing image is never rebuilt.
    pub name: &'static str,
    pub packages: &'static [&'static str],
}

/// The images the exec-bridge Docker sandbox uses. `collab-runtime:2` must match
/// `exec_bridge::sandbox::docker::DEFAULT_IMAGE`. Python 3, C and C++ (gcc, g++), JavaScript
/// (Node.js) and Bash (in every Debian base).
pub const RUNTIME_IMAGES: &[RuntimeImage] =
    &[RuntimeImage { name: "collab-runtime:2", packages: &["python3", "gcc", "g++", "libc6-dev", "nodejs", "time"] }];

const SUITE: &str = "bookworm";
const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
const DOCKERD: &str = "dockerd";
const PID_FILE: &str = "/var/run/docker.pid";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Makes sure a Docker engine answers on the default socket, starting `dockerd` if none does:
/// first with its default storage driver, then with `vfs` if that one cannot start here.
pub fn ensure_engine(target_dir: &Path) -> Result<String> {
    if answers() {
        println!("dockerd answers already");
        return Ok("already running".to_owned());
    }
    if daemon_alive() {
        println!("dockerd runs but does not answer yet; waiting");
        if wait_until_answering(None)? {
            return Ok("was starting".to_owned());
        }
        bail!("dockerd (pid file {PID_FILE}) runs but does not answer on its socket");
    }
    let dir = target_dir.join("xtask");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log = dir.join("dockerd.log");
    for driver in [None, Some("vfs")] {
        let mut daemon = start_daemon(&log, driver)?;
        if wait_until_answering(Some(&mut daemon))? {
            let driver = driver.unwrap_or("default storage driver");
            return Ok(format!("started ({driver}), log {}", log.display()));
        }
        let _ = daemon.kill();
        let _ = daemon.wait();
        println!("dockerd did not come up (see {}); trying another storage driver", log.display());
    }
    bail!("dockerd does not start here; see {}", log.display())
}

/// `dockerd` in its own process group (so Ctrl-C on xtask leaves it running for the next run),
/// without iptables or a bridge: the sandbox's containers have no network at all.
fn start_daemon(log: &Path, storage_driver: Option<&str>) -> Result<std::process::Child> {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone().with_context(|| format!("cannot open {}", log.display()))?;
    let mut dockerd = Command::new(DOCKERD);
    dockerd.args(daemon_args(storage_driver));
    println!("$ {}  (log {})", cmd::describe(&dockerd), log.display());
    std::os::unix::process::CommandExt::process_group(&mut dockerd, 0);
    dockerd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start {DOCKERD} (Debian package docker.io)"))
}

fn daemon_args(storage_driver: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = ["--iptables=false", "--ip-masq=false", "--bridge=none"].map(str::to_owned).into();
    if let Some(driver) = storage_driver {
        args.push(format!("--storage-driver={driver}"));
    }
    args
}

/// Waits until the engine answers; `false` if `daemon` (when given) exited or time ran out.
fn wait_until_answering(mut daemon: Option<&mut std::process::Child>) -> Result<bool> {
    let started = Instant::now();
    while started.elapsed() < READY_TIMEOUT {
        if answers() {
            return Ok(true);
        }
        if let Some(daemon) = daemon.as_deref_mut()
            && let Some(status) = daemon.try_wait().context("cannot wait for dockerd")?
        {
            println!("dockerd exited ({status})");
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(false)
}

/// Whether the engine answers on its socket (the client asks for the server's version).
fn answers() -> bool {
    cmd::succeeds(Command::new("docker").args(["version", "--format", "{{.Server.Version}}"]))
}

/// Whether the pid in dockerd's pid file is a live process.
fn daemon_alive() -> bool {
    let Ok(pid) = fs::read_to_string(PID_FILE) else { return false };
    let pid = pid.trim();
    !pid.is_empty() && Path::new("/proc").join(pid).exists()
}

/// Builds each of [`RUNTIME_IMAGES`] that the engine does not have yet.
pub fn ensure_images(target_dir: &Path) -> Result<String> {
    let mut built = Vec::new();
    for image in RUNTIME_IMAGES {
        if cmd::succeeds(Command::new("docker").args(["image", "inspect", image.name])) {
            println!("image {} exists", image.name);
            continue;
        }
        let mirror = apt_mirror();
        build_image(target_dir, image, &mirror)?;
        built.push(image.name);
    }
    Ok(if built.is_empty() { "already built".to_owned() } else { format!("built {}", built.join(", ")) })
}

/// `debootstrap --variant=minbase` into a folder under the target directory, then
/// `tar -c . | docker import`; the folder is removed afterwards.
fn build_image(target_dir: &Path, image: &RuntimeImage, mirror: &str) -> Result<()> {
    let rootfs = target_dir.join("xtask").join(format!("rootfs-{}", image.name.replace([':', '/'], "-")));
    remove_dir(&rootfs)?;
    let started = Instant::now();
    let mut debootstrap = Command::new("debootstrap");
    debootstrap
        .args(["--variant=minbase", &format!("--include={}", image.packages.join(","))])
        .args([SUITE])
        .arg(&rootfs)
        .arg(mirror);
    cmd::run(&mut debootstrap)?;
    // Nothing of the build host's apt state is needed inside.
    for cache in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        clear_dir(&rootfs.join(cache))?;
    }
    let mut tar = Command::new("tar");
    tar.arg("-C").arg(&rootfs).args(["-c", "."]).stdout(Stdio::piped());
    println!("$ {} | docker import - {}", cmd::describe(&tar), image.name);
    let mut tar = tar.spawn().context("cannot start tar")?;
    let archive = tar.stdout.take().context("tar has no stdout")?;
    let imported = Command::new("docker")
        .args(["import", "-", image.name])
        .stdin(archive)
        .status()
        .context("cannot start docker import")?;
    let tarred = tar.wait().context("cannot wait for tar")?;
    if !tarred.success() || !imported.success() {
        bail!("importing {} failed (tar {tarred}, docker import {imported})", image.name);
    }
    remove_dir(&rootfs)?;
    println!("built {} in {:.0?}", image.name, started.elapsed());
    Ok(())
}

fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn clear_dir(dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(()) };
    for entry in entries {
        let path: PathBuf = entry.with_context(|| format!("cannot list {}", dir.display()))?.path();
        if path.is_dir() {
            remove_dir(&path)?;
        } else {
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// The Debian mirror apt uses on this machine (deb822 `URIs:` or one-line `deb` entries), so
/// debootstrap downloads from where apt can; Debian's CDN if none is found.
fn apt_mirror() -> String {
    let mut texts = Vec::new();
    for file in ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"] {
        texts.extend(fs::read_to_string(file).ok());
    }
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "sources" || ext == "list") {
                texts.extend(fs::read_to_string(path).ok());
            }
        }
    }
    texts.iter().find_map(|text| mirror_in(text)).unwrap_or_else(|| FALLBACK_MIRROR.to_owned())
}

/// The first Debian main-archive URI in a sources file (not the security archive).
fn mirror_in(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .flat_map(|line| {
            let uris = line.strip_prefix("URIs:").map(str::split_whitespace);
            let deb = line.strip_prefix("deb ").and_then(|rest| {
                rest.split_whitespace().find(|word| word.starts_with("http://") || word.starts_with("https://"))
            });
            uris.into_iter().flatten().chain(deb)
        })
        .find(|uri| uri.trim_end_matches('/').ends_with("/debian"))
        .map(|uri| uri.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_main_archive_is_found_in_both_formats() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian/2025\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\n";
        assert_eq!(mirror_in(deb822).as_deref(), Some("http://deb.debian.org/debian"));
        let one_line = "deb http://security.debian.org/debian-security bookworm-security main\ndeb [arch=amd64] http://ftp.fr.debian.org/debian/ bookworm main\n";
        assert_eq!(mirror_in(one_line).as_deref(), Some("http://ftp.fr.debian.org/debian"));
        assert_eq!(mirror_in("deb https://packages.cloud.google.com/apt cloud-sdk main\n"), None);
    }

    #[test]
    fn a_storage_driver_is_passed_after_the_fixed_flags() {
        let fixed = daemon_args(None);
        assert_eq!(daemon_args(Some("vfs")), [fixed, vec!["--storage-driver=vfs".to_owned()]].concat());
    }
}
