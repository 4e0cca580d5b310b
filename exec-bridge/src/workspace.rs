//! The workspace folder on disk: atomic writes, deletes and scans that never leave its root.
//!
//! The root is opened once as a `cap_std::fs::Dir`, a capability: every later operation is
//! relative to that handle, and cap-std refuses `..`, absolute paths and symlinks that lead out
//! of it, even when a program in the sandbox swaps a folder for a symlink between two calls (a
//! plain `Path::join` plus checks cannot promise that without races). On top of that, this
//! module never follows a symlink at all, even one pointing inside the root: every folder on the
//! way is opened with `open_dir_nofollow` and every file with `O_NOFOLLOW` (cap-fs-ext), so a
//! symlink is simply not mirrored. Ignore patterns are `globset` globs (the matcher ripgrep
//! uses), matched against every component name and against the whole relative path.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions};
use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::paths::{PathError, SafePath};

/// Folders (or files) that are never mirrored unless the configuration says otherwise: build
/// output and dependencies, and what shells and interpreters keep in `HOME`, which is the
/// workspace in a sandbox (a terminal's `.bash_history` must not become a project file).
pub const DEFAULT_IGNORES: &[&str] = &[
    "node_modules",
    "__pycache__",
    ".git",
    "target",
    "build",
    "dist",
    ".venv",
    ".bash_history",
    ".python_history",
    ".node_repl_history",
    ".sqlite_history",
    ".lesshst",
    ".viminfo",
    ".wget-hsts",
    ".cache",
];
/// Largest mirrored file, in bytes.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Names of this module's temporary files start with this; scans skip them.
pub const TEMP_PREFIX: &str = ".exec-bridge-tmp-";

#[derive(Debug, Clone)]
pub struct WorkspaceConfig {
    /// Glob patterns; a path is ignored when one matches any of its components or the whole path.
    pub ignore: Vec<String>,
    /// Files larger than this are not mirrored.
    pub max_file_bytes: u64,
}

impl Default for WorkspaceConfig {
    fn default() -> Self {
        WorkspaceConfig {
            ignore: DEFAULT_IGNORES.iter().map(|s| (*s).to_owned()).collect(),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("invalid path: {0}")]
    Path(#[from] PathError),
    #[error("invalid ignore pattern: {0}")]
    Pattern(#[from] globset::Error),
    #[error("{0}: goes through a symbolic link, which is not mirrored")]
    Symlink(SafePath),
    #[error("{0}: a folder is in the way")]
    IsDir(SafePath),
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

fn io_err(path: impl ToString) -> impl FnOnce(io::Error) -> WorkspaceError {
    move |source| WorkspaceError::Io { path: path.to_string(), source }
}

/// What a file on disk holds, as far as mirroring cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    /// UTF-8 text without NUL bytes, within the size limit: the only state that is mirrored.
    Text(String),
    /// NUL bytes or invalid UTF-8.
    Binary,
    /// Larger than the limit (its size in bytes).
    TooLarge(u64),
    /// A symbolic link, whatever it points to; never read.
    Symlink,
    /// Present but could not be read (permissions, a FIFO, ...).
    Unreadable,
}

impl FileState {
    pub fn text(&self) -> Option<&str> {
        match self {
            FileState::Text(text) => Some(text),
            _ => None,
        }
    }
}

/// Every file a scan saw outside ignored folders, by path. A path missing here is not on disk.
pub type Scan = BTreeMap<SafePath, FileState>;

/// A workspace root with its ignore rules and size limit.
pub struct Workspace {
    root: Dir,
    ignore: GlobSet,
    max_file_bytes: u64,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace").field("max_file_bytes", &self.max_file_bytes).finish_non_exhaustive()
    }
}

impl Workspace {
    /// Opens an existing folder as the workspace root. This is the only place where an ambient
    /// path is used; everything after goes through the root handle.
    pub fn open(root: &Path, config: &WorkspaceConfig) -> Result<Workspace, WorkspaceError> {
        let dir = Dir::open_ambient_dir(root, ambient_authority()).map_err(io_err(root.display()))?;
        let mut builder = GlobSetBuilder::new();
        for pattern in &config.ignore {
            builder.add(Glob::new(pattern)?);
        }
        Ok(Workspace { root: dir, ignore: builder.build()?, max_file_bytes: config.max_file_bytes })
    }

    /// Whether a path is excluded from mirroring by the ignore patterns.
    pub fn is_ignored(&self, path: &SafePath) -> bool {
        self.ignore.is_match(path.as_str()) || path.components().any(|c| self.ignore.is_match(c))
    }

    /// Writes `text` to `path` atomically (a temporary file in the same folder, then a rename),
    /// creating missing folders. Refused when any folder on the way, or the file itself, is a
    /// symlink.
    pub fn write(&self, path: &SafePath, text: &str) -> Result<(), WorkspaceError> {
        let (folders, name) = path.split_parent();
        let dir = self.open_folders(path, &folders, true)?.ok_or_else(|| WorkspaceError::Symlink(path.clone()))?;
        match dir.symlink_metadata(name) {
            Ok(meta) if meta.is_symlink() => return Err(WorkspaceError::Symlink(path.clone())),
            Ok(meta) if meta.is_dir() => return Err(WorkspaceError::IsDir(path.clone())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path)(e)),
        }
        let temp = format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>());
        let mut options = OpenOptions::new();
        options.write(true).create_new(true).follow(FollowSymlinks::No);
        let written = dir.open_with(&temp, &options).and_then(|mut file| file.write_all(text.as_bytes()));
        // `rename` replaces the name itself and never follows a symlink that appeared meanwhile.
        let renamed = written.and_then(|()| dir.rename(&temp, &dir, name));
        if let Err(e) = renamed {
            let _ = dir.remove_file(&temp);
            return Err(io_err(path)(e));
        }
        Ok(())
    }

    /// Creates a folder (and its parents), as for an empty-folder entry of the tree.
    pub fn create_dir(&self, path: &SafePath) -> Result<(), WorkspaceError> {
        let folders: Vec<&str> = path.components().collect();
        self.open_folders(path, &folders, true)?.ok_or_else(|| WorkspaceError::Symlink(path.clone()))?;
        Ok(())
    }

    /// Deletes the file at `path`; a file that is already gone is fine. A symlink is left alone.
    pub fn remove(&self, path: &SafePath) -> Result<(), WorkspaceError> {
        let (folders, name) = path.split_parent();
        let Some(dir) = self.open_folders(path, &folders, false)? else { return Ok(()) };
        match dir.symlink_metadata(name) {
            Ok(meta) if meta.is_symlink() => Err(WorkspaceError::Symlink(path.clone())),
            Ok(meta) if meta.is_dir() => Err(WorkspaceError::IsDir(path.clone())),
            Ok(_) => match dir.remove_file(name) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
                _ => Ok(()),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// What the file at `path` holds, or `None` when there is none. A path through a symlinked
    /// folder reads as [`FileState::Symlink`].
    pub fn read(&self, path: &SafePath) -> Result<Option<FileState>, WorkspaceError> {
        let (folders, name) = path.split_parent();
        match self.open_folders(path, &folders, false) {
            Ok(Some(dir)) => Ok(self.read_in(&dir, name)),
            Ok(None) => Ok(None),
            Err(WorkspaceError::Symlink(_)) => Ok(Some(FileState::Symlink)),
            Err(e) => Err(e),
        }
    }

    /// Every file under the root outside ignored paths, with what it holds. Symlinks are listed
    /// as such and not followed; names that are not valid [`SafePath`] components (non-UTF-8,
    /// control characters, backslashes) are skipped, as are this module's temporary files. A
    /// folder that cannot be listed fails the whole scan: a partial scan would look like
    /// deletions.
    pub fn scan(&self) -> Result<Scan, WorkspaceError> {
        let mut found = Scan::new();
        let mut stack: Vec<(Option<SafePath>, Dir)> =
            vec![(None, self.root.try_clone().map_err(io_err("workspace root"))?)];
        while let Some((prefix, dir)) = stack.pop() {
            let shown = prefix.as_ref().map_or("workspace root", SafePath::as_str).to_owned();
            for entry in dir.entries().map_err(io_err(&shown))? {
                let entry = entry.map_err(io_err(&shown))?;
                let Ok(name) = entry.file_name().into_string() else { continue };
                if name.starts_with(TEMP_PREFIX) {
                    continue;
                }
                let joined = match &prefix {
                    Some(p) => format!("{p}/{name}"),
                    None => name.clone(),
                };
                let Ok(path) = SafePath::new(&joined) else { continue };
                if self.is_ignored(&path) {
                    continue;
                }
                let Ok(kind) = entry.file_type() else {
                    found.insert(path, FileState::Unreadable);
                    continue;
                };
                if kind.is_symlink() {
                    found.insert(path, FileState::Symlink);
                } else if kind.is_dir() {
                    let sub = dir.open_dir_nofollow(&name).map_err(io_err(&path))?;
                    stack.push((Some(path), sub));
                } else if kind.is_file() {
                    if let Some(state) = self.read_in(&dir, &name) {
                        found.insert(path, state);
                    }
                } else {
                    found.insert(path, FileState::Unreadable);
                }
            }
        }
        Ok(found)
    }

    /// Opens the folders of `path` one by one without following symlinks. `Ok(None)` when one
    /// is missing (and `create` is false); `Symlink` when one is a symlink.
    fn open_folders(&self, path: &SafePath, folders: &[&str], create: bool) -> Result<Option<Dir>, WorkspaceError> {
        let mut dir = self.root.try_clone().map_err(io_err(path))?;
        for folder in folders {
            match dir.symlink_metadata(folder) {
                Ok(meta) if meta.is_symlink() => return Err(WorkspaceError::Symlink(path.clone())),
                Ok(meta) if !meta.is_dir() => {
                    return Err(io_err(path)(io::Error::new(io::ErrorKind::NotADirectory, "a file is in the way")));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => match dir.create_dir(folder) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_err(path)(e)),
                    _ => {}
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err(path)(e)),
            }
            // Checked above, but a program may swap the folder for a symlink meanwhile: the
            // no-follow open is what really guarantees it.
            dir = dir.open_dir_nofollow(folder).map_err(|e| match e.raw_os_error() {
                Some(_) if dir.symlink_metadata(folder).is_ok_and(|m| m.is_symlink()) => {
                    WorkspaceError::Symlink(path.clone())
                }
                _ => io_err(path)(e),
            })?;
        }
        Ok(Some(dir))
    }

    /// Reads one file of `dir` without following a symlink. `None` when it is gone.
    fn read_in(&self, dir: &Dir, name: &str) -> Option<FileState> {
        // Opening a FIFO for reading would block: look before opening.
        match dir.symlink_metadata(name) {
            Ok(meta) if meta.is_symlink() => return Some(FileState::Symlink),
            Ok(meta) if !meta.is_file() => return Some(FileState::Unreadable),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(_) => return Some(FileState::Unreadable),
        }
        let mut options = OpenOptions::new();
        options.read(true).follow(FollowSymlinks::No);
        let file = match dir.open_with(name, &options) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(_) if dir.symlink_metadata(name).is_ok_and(|m| m.is_symlink()) => return Some(FileState::Symlink),
            Err(_) => return Some(FileState::Unreadable),
        };
        let Ok(meta) = file.metadata() else { return Some(FileState::Unreadable) };
        if !meta.is_file() {
            return Some(FileState::Unreadable);
        }
        if meta.len() > self.max_file_bytes {
            return Some(FileState::TooLarge(meta.len()));
        }
        let mut bytes = Vec::new();
        // The file may grow between `metadata` and the read: never read past the limit.
        if file.take(self.max_file_bytes + 1).read_to_end(&mut bytes).is_err() {
            return Some(FileState::Unreadable);
        }
        if bytes.len() as u64 > self.max_file_bytes {
            return Some(FileState::TooLarge(bytes.len() as u64));
        }
        if bytes.contains(&0) {
            return Some(FileState::Binary);
        }
        Some(String::from_utf8(bytes).map_or(FileState::Binary, FileState::Text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_and_interpreter_history_never_enters_the_project() {
        let dir = tempfile::tempdir().unwrap();
        for name in [".bash_history", ".python_history", ".node_repl_history", ".lesshst", "main.py"] {
            std::fs::write(dir.path().join(name), "ls\n").unwrap();
        }
        std::fs::create_dir(dir.path().join(".cache")).unwrap();
        std::fs::write(dir.path().join(".cache/pip.log"), "x").unwrap();
        let ws = Workspace::open(dir.path(), &WorkspaceConfig::default()).unwrap();
        let found: Vec<String> = ws.scan().unwrap().keys().map(|p| p.as_str().to_owned()).collect();
        assert_eq!(found, ["main.py"]);
    }
}
