//! Giving a workspace to the uid its sandboxed programs run as.

use std::path::Path;

/// Gives the workspace tree to `id` (not following symlinks), so the sandboxed program can
/// change the project's files.
pub(crate) fn give_workspace(dir: &Path, id: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(id), Some(id))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            give_workspace(&path, id)?;
        } else {
            std::os::unix::fs::lchown(&path, Some(id), Some(id))?;
        }
    }
    Ok(())
}
