//! System packages the tests need, installed with apt only when dpkg says they are missing.

use std::process::Command;

use anyhow::{Result, bail};

use crate::cmd;

/// One Debian package and the reason the tests need it (printed when it is installed).
#[derive(Debug, Clone, Copy)]
pub struct Package {
    pub name: &'static str,
    pub needed_by: &'static str,
}

/// Installs whichever of `packages` are missing, with one `apt-get update` first; returns a note
/// for the summary.
pub fn ensure(packages: &[Package]) -> Result<String> {
    let missing: Vec<&Package> = packages.iter().filter(|p| !is_installed(p.name)).collect();
    if missing.is_empty() {
        let names: Vec<&str> = packages.iter().map(|p| p.name).collect();
        println!("already installed: {}", names.join(", "));
        return Ok("already installed".to_owned());
    }
    for package in &missing {
        println!("missing {} (needed by {})", package.name, package.needed_by);
    }
    let as_root = cmd::is_root()?;
    cmd::run(apt_get(as_root).arg("update"))?;
    cmd::run(apt_get(as_root).args(["install", "-y", "--no-install-recommends"]).args(missing.iter().map(|p| p.name)))?;
    let still_missing: Vec<&str> = missing.iter().map(|p| p.name).filter(|name| !is_installed(name)).collect();
    if !still_missing.is_empty() {
        bail!("apt-get finished but these are still not installed: {}", still_missing.join(", "));
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    Ok(format!("installed {}", names.join(", ")))
}

/// `apt-get`, through `sudo` unless we are root, never asking questions.
fn apt_get(as_root: bool) -> Command {
    let mut cmd = if as_root {
        Command::new("apt-get")
    } else {
        let mut sudo = Command::new("sudo");
        sudo.args(["--preserve-env=DEBIAN_FRONTEND", "apt-get"]);
        sudo
    };
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Whether dpkg reports `name` as fully installed (an unknown package is simply not installed).
fn is_installed(name: &str) -> bool {
    let status = cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", name]));
    status.is_ok_and(|status| is_installed_status(&status))
}

fn is_installed_status(status: &str) -> bool {
    status.trim() == "install ok installed"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_complete_install_counts() {
        assert!(is_installed_status("install ok installed"));
        assert!(!is_installed_status("deinstall ok config-files"));
        assert!(!is_installed_status("install ok half-configured"));
        assert!(!is_installed_status(""));
    }
}
