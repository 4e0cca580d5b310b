//! Child processes: run one with its output streamed to ours, capture one's output, describe one in messages.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `cmd` with inherited stdio after printing it; fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    println!("$ {}", describe(cmd));
    let status = cmd.status().with_context(|| format!("cannot start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` with its output captured; fails, quoting its stderr, unless it exits successfully.
pub fn output(cmd: &mut Command) -> Result<String> {
    let Output { status, stdout, stderr } =
        cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status}): {}", describe(cmd), String::from_utf8_lossy(&stderr).trim());
    }
    String::from_utf8(stdout).with_context(|| format!("{} printed invalid UTF-8", describe(cmd)))
}

/// Whether `cmd` runs and exits successfully, with all its output discarded.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|status| status.success())
}

/// `cmd` as a shell-like line for messages: `COLLAB_*` variables it sets, the program's file name,
/// its arguments, and the directory it runs in. Other variables (passwords) are left out.
pub fn describe(cmd: &Command) -> String {
    let mut words: Vec<String> = cmd
        .get_envs()
        .filter(|(key, _)| key.to_string_lossy().starts_with("COLLAB_"))
        .filter_map(|(key, value)| Some(format!("{}={}", key.to_string_lossy(), value?.to_string_lossy())))
        .collect();
    let program = Path::new(cmd.get_program());
    words.push(program.file_name().unwrap_or(program.as_os_str()).to_string_lossy().into_owned());
    words.extend(cmd.get_args().map(quote));
    let mut line = words.join(" ");
    if let Some(dir) = cmd.get_current_dir() {
        line.push_str(&format!("  (in {})", dir.display()));
    }
    line
}

/// `arg`, single-quoted if it holds anything a shell would split or expand.
fn quote(arg: &OsStr) -> String {
    let arg = arg.to_string_lossy();
    let plain = !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
    if plain { arg.into_owned() } else { format!("'{}'", arg.replace('\'', r"'\''")) }
}

/// Whether this process runs as root.
pub fn is_root() -> Result<bool> {
    Ok(numeric_id(&["-u"])? == 0)
}

/// The user and group ids of the system user `name`.
pub fn user_ids(name: &str) -> Result<(u32, u32)> {
    let uid = numeric_id(&["-u", name]).with_context(|| format!("no system user `{name}`"))?;
    let gid = numeric_id(&["-g", name]).with_context(|| format!("no system user `{name}`"))?;
    Ok((uid, gid))
}

/// The number `id ARGS` prints.
fn numeric_id(args: &[&str]) -> Result<u32> {
    let text = output(Command::new("id").args(args))?;
    text.trim().parse().with_context(|| format!("`id {}` printed {text:?}", args.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_shows_collab_variables_arguments_and_directory() {
        let mut cmd = Command::new("/usr/bin/npm");
        cmd.args(["run", "a b"]).env("COLLAB_BIN", "/x/collab").env("PGPASSWORD", "secret").current_dir("/w/web");
        assert_eq!(describe(&cmd), "COLLAB_BIN=/x/collab npm run 'a b'  (in /w/web)");
    }

    #[test]
    fn quote_leaves_plain_words_alone() {
        assert_eq!(quote(OsStr::new("--listen=127.0.0.1:8080")), "--listen=127.0.0.1:8080");
        assert_eq!(quote(OsStr::new("")), "''");
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
    }
}
