//! Project archives: reading `.tar.gz` and `.zip` uploads defensively, and writing exports.
//!
//! An upload is hostile until proven otherwise: only regular files and folders are accepted,
//! paths must be relative and stay inside the project, and counts and sizes are bounded while
//! reading (so a compression bomb stops at the limit, not at the end of memory). Every header is
//! bounded before it is read: tar's GNU long-name and long-link entries and pax extensions
//! (the `tar` crate would read them whole, however large they claim to be), the whole
//! decompressed tar stream, and the zip central directory's entry and extra-field counts.
//!
//! Nothing read from an upload is echoed back: the `Display` of every [`ArchiveError`] is a
//! fixed phrase, and the details (the offending name, the parser's own error) go to the
//! server's log only.

use std::cell::Cell;
use std::collections::HashSet;
use std::io::{Cursor, Read, Write};
use std::rc::Rc;

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

/// Largest GNU long-name, long-link or pax extension entry read. A real one holds a path of at
/// most [`tree::MAX_PATH_LEN`] bytes and a few attributes; the bound leaves room for extended
/// attributes some tools add.
const MAX_EXTENSION_BYTES: u64 = 64 << 10;

/// Bytes of tar headers, padding and extension entries allowed per entry on top of the file
/// contents, when bounding the decompressed stream: a real entry needs 512 to 2048.
const ENTRY_OVERHEAD_BYTES: u64 = 16 << 10;

/// Most extra fields one zip central directory entry may have. The zip crate keeps each in
/// memory as an allocation of its own, so fields of four bytes packed by the thousand would
/// multiply an upload's size in memory; real entries have two or three.
const MAX_ZIP_EXTRA_FIELDS: usize = 32;

/// Why an archive was refused. The `Display` texts are what clients see: fixed phrases and our
/// own limits, never anything taken from the upload. The payloads are for the server's log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchiveError {
    #[error("not a .tar.gz or .zip archive")]
    NotAnArchive,
    /// The payload is the parser's own account of what is wrong.
    #[error("the archive is corrupt")]
    Corrupt(String),
    #[error("the archive has an unsafe path: paths must be relative and stay inside the project")]
    UnsafePath(String),
    #[error("the archive has an entry whose name or header is too long")]
    HeaderTooLong,
    #[error("the archive holds a link; links are not accepted")]
    Link(String),
    #[error("the archive holds an entry that is not a regular file or folder")]
    Special(String),
    #[error("more than {0} files")]
    TooManyFiles(usize),
    #[error("a file is larger than {limit} bytes")]
    FileTooLarge { path: String, limit: u64 },
    #[error("the files add up to more than {0} bytes")]
    TooLarge(u64),
    #[error("the archive unpacks to more than {0} bytes")]
    UnpackedTooLarge(u64),
    #[error("a file is not UTF-8 text; binary files are not supported yet")]
    Binary(String),
    #[error("a path appears twice")]
    Duplicate(String),
}

impl ArchiveError {
    /// What the log may add to the fixed phrase: the payload, cut to a few hundred bytes.
    fn detail(&self) -> &str {
        let detail = match self {
            ArchiveError::Corrupt(s)
            | ArchiveError::UnsafePath(s)
            | ArchiveError::Link(s)
            | ArchiveError::Special(s)
            | ArchiveError::Binary(s)
            | ArchiveError::Duplicate(s)
            | ArchiveError::FileTooLarge { path: s, .. } => s.as_str(),
            _ => "",
        };
        let mut end = detail.len().min(256);
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        &detail[..end]
    }
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
    let result = match bytes {
        [0x1f, 0x8b, ..] => reader.tar_gz(bytes),
        [b'P', b'K', 3, 4, ..] | [b'P', b'K', 5, 6, ..] => reader.zip(bytes),
        _ => Err(ArchiveError::NotAnArchive),
    };
    if let Err(e) = &result {
        tracing::info!(reason = %e, detail = e.detail(), bytes = bytes.len(), "archive refused");
    }
    result.map(|()| reader.files)
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
    // A name this long is no project path; refused before it is copied anywhere.
    if raw.len() > tree::MAX_PATH_LEN + 64 {
        return Err(ArchiveError::HeaderTooLong);
    }
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

/// A reader that fails once `inner` yields more than `left` bytes, and says so in `exceeded`:
/// decompression stops at the bound instead of running through a bomb.
struct Budget<R> {
    inner: R,
    left: u64,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let max = buf.len().min(usize::try_from(self.left.saturating_add(1)).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        if n as u64 > self.left {
            self.exceeded.set(true);
            return Err(std::io::Error::other("the decompressed archive is over its bound"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The GNU long-name, long-link and pax entries that describe the next member of a tar.
#[derive(Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Extensions {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }

    fn add(&mut self, kind: tar::EntryType, data: Vec<u8>) -> Result<(), ArchiveError> {
        let slot = if kind.is_gnu_longname() {
            &mut self.long_name
        } else if kind.is_gnu_longlink() {
            &mut self.long_link
        } else if kind.is_pax_local_extensions() {
            &mut self.pax
        } else {
            // Global pax headers describe the whole archive; nothing in them matters here.
            return Ok(());
        };
        if slot.is_some() {
            return Err(corrupt("two extension entries of one kind describe the same member"));
        }
        *slot = Some(data);
        Ok(())
    }

    fn pax_value(&self, key: &str) -> Option<&[u8]> {
        let pax = self.pax.as_deref()?;
        tar::PaxExtensions::new(pax)
            .filter_map(Result::ok)
            .find(|ext| ext.key_bytes() == key.as_bytes())
            .map(|ext| ext.value_bytes())
    }

    /// The member's name as the `tar` crate reads it: the GNU long name (less one trailing
    /// NUL), else the pax `path`, else the header's own.
    fn path(&self, header: &tar::Header) -> String {
        let bytes: std::borrow::Cow<'_, [u8]> = match (&self.long_name, self.pax_value("path")) {
            (Some(name), _) => name.strip_suffix(&[0]).unwrap_or(name).into(),
            (None, Some(path)) => path.into(),
            (None, None) => header.path_bytes(),
        };
        String::from_utf8_lossy(&bytes).into_owned()
    }
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
        let overhead = (self.limits.max_files as u64).saturating_add(16).saturating_mul(ENTRY_OVERHEAD_BYTES);
        let bound = self.limits.max_total_bytes.saturating_add(overhead);
        let exceeded = Rc::new(Cell::new(false));
        let stream = Budget { inner: flate2::read::GzDecoder::new(bytes), left: bound, exceeded: exceeded.clone() };
        let result = self.tar(tar::Archive::new(stream));
        // Whatever failed after the bound was hit failed because of it.
        if exceeded.get() { Err(ArchiveError::UnpackedTooLarge(bound)) } else { result }
    }

    fn tar(&mut self, mut archive: tar::Archive<impl Read>) -> Result<(), ArchiveError> {
        let mut extensions = Extensions::default();
        // Raw entries: extension entries come to us unread, and are bounded before reading.
        for entry in archive.entries().map_err(corrupt)?.raw(true) {
            let mut entry = entry.map_err(corrupt)?;
            let kind = entry.header().entry_type();
            let size = entry.header().entry_size().map_err(corrupt)?;
            if kind.is_gnu_longname()
                || kind.is_gnu_longlink()
                || kind.is_pax_local_extensions()
                || kind.is_pax_global_extensions()
            {
                if size > MAX_EXTENSION_BYTES {
                    return Err(ArchiveError::HeaderTooLong);
                }
                let mut data = Vec::new();
                entry.read_to_end(&mut data).map_err(corrupt)?;
                extensions.add(kind, data)?;
                continue;
            }
            let member = std::mem::take(&mut extensions);
            // Raw entries are positioned by the header's size; a pax size that disagrees would
            // make other tools read a different archive.
            if let Some(pax_size) = member.pax_value("size") {
                if std::str::from_utf8(pax_size).ok().and_then(|s| s.parse::<u64>().ok()) != Some(size) {
                    return Err(corrupt("the pax size disagrees with the header"));
                }
            }
            let raw = member.path(entry.header());
            if kind.is_dir() {
                clean_path(&raw)?;
                continue;
            }
            if kind.is_symlink() || kind.is_hard_link() {
                return Err(ArchiveError::Link(raw));
            }
            if !kind.is_file() {
                return Err(ArchiveError::Special(raw));
            }
            self.add(&raw, size, &mut entry)?;
        }
        if !extensions.is_empty() {
            return Err(corrupt("extension entries describe no member"));
        }
        Ok(())
    }

    fn zip(&mut self, bytes: &[u8]) -> Result<(), ArchiveError> {
        check_zip_directory(bytes, self.limits)?;
        let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(corrupt)?;
        if archive.len() > self.limits.max_files * 2 {
            return Err(ArchiveError::TooManyFiles(self.limits.max_files));
        }
        for i in 0..archive.len() {
            let mut file = archive.by_index(i).map_err(corrupt)?;
            if file.name_raw().len() > tree::MAX_PATH_LEN + 64 {
                return Err(ArchiveError::HeaderTooLong);
            }
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

/// Looks at every central directory entry the zip crate could parse before it parses them (it
/// keeps all of them in memory at once): each begins with the signature `PK\x01\x02`, so their
/// number is at most the signature's count, and an entry packed with tiny extra fields is
/// refused. Signatures found inside file data only make the count larger.
fn check_zip_directory(bytes: &[u8], limits: ArchiveLimits) -> Result<(), ArchiveError> {
    const SIGNATURE: &[u8] = b"PK\x01\x02";
    const FIXED: usize = 46;
    let u16_at = |at: usize| bytes.get(at..at + 2).map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])));
    let mut count = 0usize;
    for start in bytes.windows(SIGNATURE.len()).enumerate().filter(|(_, w)| *w == SIGNATURE).map(|(i, _)| i) {
        count += 1;
        if count > limits.max_files * 2 {
            return Err(ArchiveError::TooManyFiles(limits.max_files));
        }
        let (name_len, extra_len) = (u16_at(start + 28), u16_at(start + 30));
        let extra_start = start + FIXED + name_len;
        let Some(mut extra) = bytes.get(extra_start..extra_start + extra_len) else { continue };
        let mut fields = 0;
        while extra.len() >= 4 {
            fields += 1;
            if fields > MAX_ZIP_EXTRA_FIELDS {
                return Err(ArchiveError::HeaderTooLong);
            }
            let len = usize::from(u16::from_le_bytes([extra[2], extra[3]]));
            extra = extra.get(4 + len..).unwrap_or_default();
        }
    }
    Ok(())
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

    /// A gzip'd tar of one extension entry of `kind` holding `data`, then a regular file `a`.
    fn tar_with_extension(kind: tar::EntryType, data: &[u8]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut builder = tar::Builder::new(gz);
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        header.set_size(data.len() as u64);
        header.set_entry_type(kind);
        header.set_cksum();
        builder.append(&header, data).unwrap();
        let mut header = tar::Header::new_gnu();
        header.set_path("a").unwrap();
        header.set_size(1);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, &b"x"[..]).unwrap();
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn round_trips() {
        let long = format!("{}/deep.txt", "d".repeat(300));
        let files = vec![file("a.txt", "alpha"), file("src/b.py", "print(1)\n"), file(&long, "long name")];
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

    #[test]
    fn extension_entries_are_bounded_and_applied() {
        use tar::EntryType::{GNULongLink, GNULongName, XHeader};
        for kind in [GNULongName, GNULongLink, XHeader] {
            let huge = vec![b'n'; (MAX_EXTENSION_BYTES + 1) as usize];
            check(&tar_with_extension(kind, &huge), Err(ArchiveError::HeaderTooLong));
        }
        check(&tar_with_extension(GNULongName, b"renamed.txt\0"), Ok(vec![file("renamed.txt", "x")]));
        check(&tar_with_extension(XHeader, b"16 path=pax.txt\n"), Ok(vec![file("pax.txt", "x")]));
        check(
            &tar_with_extension(XHeader, b"11 size=99\n"),
            Err(ArchiveError::Corrupt("the pax size disagrees with the header".into())),
        );
        let name = vec![b'n'; 2000];
        check(&tar_with_extension(GNULongName, &name), Err(ArchiveError::HeaderTooLong));
    }

    #[test]
    fn the_decompressed_stream_is_bounded() {
        // A folder entry claiming 8 MiB: its data is skipped, but still decompressed.
        let mut header = tar::Header::new_gnu();
        header.set_path("d/").unwrap();
        header.set_size(8 << 20);
        header.set_entry_type(tar::EntryType::Directory);
        header.set_cksum();
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        builder.append(&header, std::io::repeat(0).take(8 << 20)).unwrap();
        let bomb = builder.into_inner().unwrap().finish().unwrap();
        let limits = ArchiveLimits { max_files: 3, max_file_bytes: 100, max_total_bytes: 150 };
        let bound = 150 + 19 * ENTRY_OVERHEAD_BYTES;
        assert_eq!(read(&bomb, limits), Err(ArchiveError::UnpackedTooLarge(bound)));
        assert!(read(&bomb, ArchiveLimits::default()).is_ok(), "within the default bound");
    }

    #[test]
    fn refusals_never_quote_the_archive() {
        let name = "evil-name-".repeat(20);
        for err in [
            ArchiveError::UnsafePath(name.clone()),
            ArchiveError::Link(name.clone()),
            ArchiveError::Special(name.clone()),
            ArchiveError::Binary(name.clone()),
            ArchiveError::Duplicate(name.clone()),
            ArchiveError::Corrupt(name.clone()),
            ArchiveError::FileTooLarge { path: name.clone(), limit: 1 },
        ] {
            assert!(!err.to_string().contains("evil"), "{err}");
        }
    }

    #[test]
    fn zip_entries_packed_with_extra_fields_are_refused() {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let mut options = zip::write::FullFileOptions::default();
        for id in 0..40u16 {
            options.add_extra_field(0x7000 + id, Vec::<u8>::new(), true).unwrap();
        }
        writer.start_file("a.txt", options).unwrap();
        writer.write_all(b"x").unwrap();
        let zip = writer.finish().unwrap().into_inner();
        check(&zip, Err(ArchiveError::HeaderTooLong));
    }
}
