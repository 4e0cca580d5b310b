//! Walks of a workspace made while its programs run: giving it to the uid they run as, and
//! measuring what it takes on disk, without ever following a symlink a program planted.
//!
//! The walk runs as root while a program of the project may be running (in an open terminal)
//! and changing the tree under it, e.g. swapping a folder with a symlink to a host folder in a
//! tight `renameat2(RENAME_EXCHANGE)` loop. A walk by path (`read_dir(path)`, then
//! `lchown(path/entry)`) resolves `path` again on every call and follows such a swap into the
//! host. So every step here is relative to a directory handle: folders are opened with
//! `O_NOFOLLOW | O_DIRECTORY` from their parent's handle (cap-std's `open_dir_nofollow`), and
//! each entry is re-owned with `fchownat(parent, name, AT_SYMLINK_NOFOLLOW)`, which changes a
//! symlink itself and never what it names. A name that changed kind between the listing and
//! the open (a folder that became a symlink, an entry that vanished) is skipped: it belongs to
//! the program, which can only withhold its own files from itself.

use std::ffi::OsStr;
use std::io;
use std::path::Path;

use cap_fs_ext::DirExt;
use cap_std::ambient_authority;
use cap_std::fs::Dir;
use rustix::fs::{AtFlags, FileType, Gid, Uid, chownat, statat};

/// Gives the workspace tree at `root` (canonical, in a folder of the bridge's that no program
/// can change) to `id`, so the sandboxed program can change the project's files.
pub(crate) fn give_workspace(root: &Path, id: u32) -> io::Result<()> {
    let (uid, gid) = (Some(Uid::from_raw(id)), Some(Gid::from_raw(id)));
    let top = Dir::open_ambient_dir(root, ambient_authority())?;
    // cap-std holds folders as `O_PATH` handles, which `fchown` refuses; `AT_EMPTY_PATH` names
    // the handle's own folder.
    chownat(&top, "", uid, gid, AtFlags::EMPTY_PATH)?;
    let mut folders = vec![top];
    while let Some(dir) = folders.pop() {
        for entry in dir.entries()? {
            let entry = entry?;
            let name = entry.file_name();
            if !chown_entry(&dir, &name, uid, gid)? {
                continue;
            }
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                match dir.open_dir_nofollow(&name) {
                    Ok(sub) => folders.push(sub),
                    Err(err) if swapped(&err) => {}
                    Err(err) => return Err(err),
                }
            }
        }
    }
    Ok(())
}

/// Re-owns `name` in `dir` itself (a symlink stays a symlink); false when it is gone.
fn chown_entry(dir: &Dir, name: &OsStr, uid: Option<Uid>, gid: Option<Gid>) -> io::Result<bool> {
    match chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(errno) => Err(errno.into()),
    }
}

/// Whether opening a folder failed because the program changed it meanwhile: it became a
/// symlink (`ELOOP`) or a file (`ENOTDIR`), or it is gone.
fn swapped(err: &io::Error) -> bool {
    let errno = err.raw_os_error().map(rustix::io::Errno::from_raw_os_error);
    matches!(errno, Some(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR | rustix::io::Errno::NOENT))
}

/// The bytes the workspace tree at `root` takes on disk (allocated blocks, so a sparse file
/// counts what it really uses), not following symlinks; entries that vanish meanwhile count 0.
pub(crate) fn disk_usage(root: &Path) -> io::Result<u64> {
    let mut used = 0u64;
    let mut folders = vec![Dir::open_ambient_dir(root, ambient_authority())?];
    while let Some(dir) = folders.pop() {
        for entry in dir.entries()? {
            let name = entry?.file_name();
            let stat = match statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(errno) => return Err(errno.into()),
            };
            used = used.saturating_add(u64::try_from(stat.st_blocks).unwrap_or(0).saturating_mul(512));
            if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
                match dir.open_dir_nofollow(&name) {
                    Ok(sub) => folders.push(sub),
                    Err(err) if swapped(&err) => {}
                    Err(err) => return Err(err),
                }
            }
        }
    }
    Ok(used)
}
