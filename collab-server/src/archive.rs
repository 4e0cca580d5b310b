//! Project archives: reading `.tar.gz` and `.zip` uploads defensively, and writing exports.
//!
//! An upload is hostile until proven otherwise: only regular files and folders are accepted,
//! paths must be relative and stay inside the project, and counts and sizes are bounded while
//! reading (so a compression bomb stops at the limit, not at the end of memory).

use std::collections::HashSet;
use std::io::{Cursor, Read, Write};

use sync_core::tree;

/// Bounds on what one import may contain.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveLimits {
    pub max_files: usize,
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        ArchiveLimits { max_files: 1000, max_file_bytes: 1 << 20, max_total_bytes: 32 << 20 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchiveError {
    #[error("not a .tar.gz or .zip archive")]
    NotAnArchive,
    #[error("the archive is corrupt: {0}")]
    Corrupt(String),
    #[error("unsafe path {0:?}: paths must be relative and stay inside the project")]
    UnsafePath(String),
    #[error("{0:?} is a link; links are not accepted")]
    Link(String),
    #[error("{0:?} is not a regular file or folder")]
    Special(String),
    #[error("more than {0} files")]
    TooManyFiles(usize),
    #[error("{path:?} is larger than {limit} bytes")]
    FileTooLarge { path: String, limit: u64 },
    #[error("the files add up to more than {0} bytes")]
    TooLarge(u64),
    #[error("{0:?} is not UTF-8 text; binary files are not supported yet")]
    Binary(String),
    #[error("{0:?} appears twice")]
    Duplicate(String),
}

/// A text file read from an archive, with a validated project path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveFile {
    pub path: String,
    pub text: String,
}

/// Reads an uploaded archive, detecting its format from its first bytes.
pub fn read(bytes: &[u8], limits: ArchiveLimits) -> Result<Vec<ArchiveFile>, ArchiveError> {
    let mut reader = Reader { limits, files: Vec::new(), seen: HashSet::new(), total: 0 };
    match bytes {
        [0x1f, 0x8b, ..] => reader.tar_gz(bytes)?,
        [b'P', b'K', 3, 4, ..] | [b'P', b'K', 5, 6, ..] => reader.zip(bytes)?,
        _ => return Err(ArchiveError::NotAnArchive),
    }
    Ok(reader.files)
}

struct Reader {
    limits: ArchiveLimits,
    files: Vec<ArchiveFile>,
    seen: HashSet<String>,
    total: u64,
}

fn corrupt(e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Corrupt(e.to_string())
}

/// A project path from an archive entry name: `./` prefixes and a trailing `/` are dropped.
fn clean_path(raw: &str) -> Result<String, ArchiveError> {
    let unsafe_path = || ArchiveError::UnsafePath(raw.to_owned());
    let mut path = raw;
    while let Some(rest) = path.strip_prefix("./") {
        path = rest;
    }
    let path = path.trim_end_matches('/');
    if raw.starts_with('/') || raw.contains('\\') || path.split('/').next().is_some_and(|s| s.ends_with(':')) {
        return Err(unsafe_path());
    }
    tree::validate_path(path).map_err(|_| unsafe_path())?;
    Ok(path.to_owned())
}

impl Reader {
    fn add(&mut self, raw_path: &str, size: u64, content: &mut dyn Read) -> Result<(), ArchiveError> {
        let path = clean_path(raw_path)?;
        if self.files.len() >= self.limits.max_files {
            return Err(ArchiveError::TooManyFiles(self.limits.max_files));
        }
        let too_large = || ArchiveError::FileTooLarge { path: path.clone(), limit: self.limits.max_file_bytes };
        if size > self.limits.max_file_bytes {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        // Declared sizes can lie: read one byte past the limit to notice.
        content.take(self.limits.max_file_bytes + 1).read_to_end(&mut bytes).map_err(corrupt)?;
        if bytes.len() as u64 > self.limits.max_file_bytes {
            return Err(too_large());
        }
        self.total += bytes.len() as u64;
        if self.total > self.limits.max_total_bytes {
            return Err(ArchiveError::TooLarge(self.limits.max_total_bytes));
        }
        let text = String::from_utf8(bytes).map_err(|_| ArchiveError::Binary(path.clone()))?;
        if !self.seen.insert(path.clone()) {
            return Err(ArchiveError::Duplicate(path));
        }
        self.files.push(ArchiveFile { path, text });
        Ok(())
    }

    fn tar_gz(&mut self, bytes: &[u8]) -> Result<(), ArchiveError> {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
        for entry in archive.entries().map_err(corrupt)? {
            let mut entry = entry.map_err(corrupt)?;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let kind = entry.header().entry_type();
            if kind.is_dir() {
                clean_path(&raw)?;
                continue;
            }
            if kind.is_symlink() || kind.is_hard_link() {
                return Err(ArchiveError::Link(raw));
            }
            if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() || kind.is_gnu_longname() {
                continue;
            }
            if !kind.is_file() {
                return Err(ArchiveError::Special(raw));
            }
            let size = entry.header().size().map_err(corrupt)?;
            self.add(&raw, size, &mut entry)?;
        }
        Ok(())
    }

    fn zip(&mut self, bytes: &[u8]) -> Result<(), ArchiveError> {
        let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(corrupt)?;
        if archive.len() > self.limits.max_files * 2 {
            return Err(ArchiveError::TooManyFiles(self.limits.max_files));
        }
        for i in 0..archive.len() {
            let mut file = archive.by_index(i).map_err(corrupt)?;
            let raw = file.name().map_err(corrupt)?.into_owned();
            if file.is_symlink() {
                return Err(ArchiveError::Link(raw));
            }
            if file.is_dir() {
                clean_path(&raw)?;
                continue;
            }
            let size = file.size();
            self.add(&raw, size, &mut file)?;
        }
        Ok(())
    }
}

/// Writes files as a `.tar.gz`, each with mode 0644 and the given modification time.
pub fn write_tar_gz(files: &[ArchiveFile], mtime: u64) -> std::io::Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut builder = tar::Builder::new(gz);
    for file in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(file.text.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, &file.path, file.text.as_bytes())?;
    }
    builder.into_inner()?.finish()
}

/// Writes files as a `.zip` (deflated).
pub fn write_zip(files: &[ArchiveFile]) -> zip::result::ZipResult<Vec<u8>> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(0o644);
    for file in files {
        writer.start_file(file.path.as_str(), options)?;
        writer.write_all(file.text.as_bytes())?;
    }
    Ok(writer.finish()?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, text: &str) -> ArchiveFile {
        ArchiveFile { path: path.into(), text: text.into() }
    }

    fn raw_tar(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut builder = tar::Builder::new(gz);
        for (path, kind, data) in entries {
            let mut header = tar::Header::new_old();
            // Written by hand so hostile names reach the bytes unchanged.
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_size(data.len() as u64);
            header.set_entry_type(*kind);
            if kind.is_symlink() {
                header.set_link_name("/etc/passwd").unwrap();
            }
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    fn check(bytes: &[u8], expected: Result<Vec<ArchiveFile>, ArchiveError>) {
        assert_eq!(read(bytes, ArchiveLimits { max_files: 3, max_file_bytes: 100, max_total_bytes: 150 }), expected);
    }

    #[test]
    fn round_trips() {
        let files = vec![file("a.txt", "alpha"), file("src/b.py", "print(1)\n")];
        check(&write_tar_gz(&files, 0).unwrap(), Ok(files.clone()));
        check(&write_zip(&files).unwrap(), Ok(files));
    }

    #[test]
    fn hostile_archives_are_refused() {
        use tar::EntryType::{Regular, Symlink};
        check(&raw_tar(&[("../evil", Regular, b"x")]), Err(ArchiveError::UnsafePath("../evil".into())));
        check(&raw_tar(&[("/etc/passwd", Regular, b"x")]), Err(ArchiveError::UnsafePath("/etc/passwd".into())));
        check(&raw_tar(&[("a/../../b", Regular, b"x")]), Err(ArchiveError::UnsafePath("a/../../b".into())));
        check(&raw_tar(&[("link", Symlink, b"")]), Err(ArchiveError::Link("link".into())));
        check(&raw_tar(&[("fifo", tar::EntryType::Fifo, b"")]), Err(ArchiveError::Special("fifo".into())));
        let many: Vec<(String, tar::EntryType, &[u8])> =
            (0..4).map(|i| (format!("f{i}"), Regular, &b"x"[..])).collect();
        let many: Vec<(&str, tar::EntryType, &[u8])> = many.iter().map(|(p, k, d)| (p.as_str(), *k, *d)).collect();
        check(&raw_tar(&many), Err(ArchiveError::TooManyFiles(3)));
        check(
            &raw_tar(&[("big", Regular, &[b'x'; 101])]),
            Err(ArchiveError::FileTooLarge { path: "big".into(), limit: 100 }),
        );
        check(&raw_tar(&[("a", Regular, &[b'x'; 80]), ("b", Regular, &[b'x'; 80])]), Err(ArchiveError::TooLarge(150)));
        check(&raw_tar(&[("bin", Regular, &[0xff, 0xfe])]), Err(ArchiveError::Binary("bin".into())));
        check(b"hello", Err(ArchiveError::NotAnArchive));
        assert!(matches!(read(&[0x1f, 0x8b, 0, 0], ArchiveLimits::default()), Err(ArchiveError::Corrupt(_))));
        let zip_traversal = write_zip(&[file("../../x", "y")]).unwrap();
        check(&zip_traversal, Err(ArchiveError::UnsafePath("../../x".into())));
    }
}
