//! Check for the archive reader: hostile `.tar.gz` and `.zip` uploads respect the limits and never panic.

use std::collections::HashSet;

use collab_server::archive::{self, ArchiveLimits};
use sync_core::tree;

/// Small limits, so the fuzzer reaches every limit with small inputs.
pub const LIMITS: ArchiveLimits = ArchiveLimits { max_files: 4, max_file_bytes: 256, max_total_bytes: 512 };

/// `collab_server::archive::read` on arbitrary bytes (tar.gz or zip, told apart by magic bytes).
///
/// Properties: no panic; what is accepted stays within [`LIMITS`] (file count, each file's size,
/// the total); every path is a valid project path and appears once; what is accepted, written
/// back with `write_tar_gz` and `write_zip`, reads back to the same files.
pub fn archive_import(data: &[u8]) {
    let Ok(files) = archive::read(data, LIMITS) else {
        return;
    };
    assert!(files.len() <= LIMITS.max_files, "{} files accepted", files.len());
    let mut total = 0u64;
    let mut seen = HashSet::new();
    for file in &files {
        let size = file.text.len() as u64;
        assert!(size <= LIMITS.max_file_bytes, "{:?} has {size} bytes", file.path);
        total += size;
        assert!(tree::validate_path(&file.path).is_ok(), "unsafe path accepted: {:?}", file.path);
        assert!(seen.insert(file.path.as_str()), "{:?} accepted twice", file.path);
    }
    assert!(total <= LIMITS.max_total_bytes, "{total} bytes accepted in all");

    let tar = archive::write_tar_gz(&files, 0).expect("accepted files write as tar.gz");
    assert_eq!(archive::read(&tar, LIMITS).as_ref(), Ok(&files), "tar.gz export does not read back");
    let zip = archive::write_zip(&files).expect("accepted files write as zip");
    assert_eq!(archive::read(&zip, LIMITS).as_ref(), Ok(&files), "zip export does not read back");
}
