//! Export and import of whole projects as `.tar.gz` and `.zip`, live to connected peers, and
//! refusal of hostile archives.

mod common;

use collab_server::archive::{self, ArchiveFile};
use common::{TestServer, WAIT, http};
use sync_core::Role;
use yrs::Transact;

fn files(list: &[(&str, &str)]) -> Vec<ArchiveFile> {
    list.iter().map(|(p, t)| ArchiveFile { path: (*p).into(), text: (*t).into() }).collect()
}

fn tree_paths(peer: &collab_client::DocPeer) -> Vec<String> {
    sync_core::tree::entries(&peer.doc().transact()).into_iter().map(|e| e.path).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_is_live_and_export_round_trips_in_both_formats() {
    let server = TestServer::start().await;
    let token = server.editor("io", "ed");
    let root = server.connect("io", "watcher").await;
    let upload = archive::write_tar_gz(&files(&[("main.py", "print('hi')\n"), ("src/lib.py", "x = 1\n")]), 0).unwrap();
    let (status, body) = http(&server, "POST", "/api/projects/io/import", &token, &upload).await;
    assert_eq!((status, String::from_utf8_lossy(&body).as_ref()), (200, "imported 2 files\n"));
    root.wait_until("tree updated live", WAIT, |p| tree_paths(p) == ["main.py", "src/lib.py"]).await.unwrap();

    // An open file changes live when an import replaces it.
    let id = sync_core::tree::find_by_path(&root.doc().transact(), "main.py").unwrap().id;
    let open = server.connect(&format!("io/{id}"), "reader").await;
    assert_eq!(open.text(), "print('hi')\n");
    let second = archive::write_zip(&files(&[("main.py", "print('hello')\n"), ("README.md", "# io\n")])).unwrap();
    let (status, _) = http(&server, "POST", "/api/projects/io/import", &token, &second).await;
    assert_eq!(status, 200);
    open.wait_text("print('hello')\n", WAIT).await.expect("open editor sees the new text");

    let expected = files(&[("README.md", "# io\n"), ("main.py", "print('hello')\n"), ("src/lib.py", "x = 1\n")]);
    for format in ["tar.gz", "zip"] {
        let (status, bytes) =
            http(&server, "GET", &format!("/api/projects/io/export?format={format}"), &token, b"").await;
        assert_eq!(status, 200, "{format}");
        let mut got = archive::read(&bytes, archive::ArchiveLimits::default()).expect("export reads back");
        got.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(got, expected, "{format}");
    }
    let viewer = server.token("io", Role::Viewer, "vi");
    let (status, _) = http(&server, "GET", "/api/projects/io/export?format=zip", &viewer, b"").await;
    assert_eq!(status, 200, "viewers may export");
    server.stop().await;
}

#[tokio::test]
async fn hostile_or_unauthorized_imports_are_refused_and_change_nothing() {
    let server = TestServer::start().await;
    let token = server.editor("safe", "ed");
    let good = archive::write_tar_gz(&files(&[("keep.txt", "kept")]), 0).unwrap();
    assert_eq!(http(&server, "POST", "/api/projects/safe/import", &token, &good).await.0, 200);

    let traversal = archive::write_zip(&files(&[("ok.txt", "fine"), ("../../etc/cron.d/x", "evil")])).unwrap();
    let too_many: Vec<ArchiveFile> =
        (0..1001).map(|i| ArchiveFile { path: format!("f{i}"), text: String::new() }).collect();
    let too_many = archive::write_tar_gz(&too_many, 0).unwrap();
    let too_big = archive::write_tar_gz(&files(&[("big.txt", &"x".repeat((1 << 20) + 1))]), 0).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str, u16)> = vec![
        ("traversal", traversal, "unsafe path", 400),
        ("too many files", too_many, "more than 1000 files", 400),
        ("too large", too_big, "larger than", 400),
        ("not an archive", b"just text".to_vec(), "not a .tar.gz or .zip archive", 400),
    ];
    for (what, body, message, status) in cases {
        let (got, text) = http(&server, "POST", "/api/projects/safe/import", &token, &body).await;
        let text = String::from_utf8_lossy(&text);
        assert_eq!(got, status, "{what}: {text}");
        assert!(text.contains(message), "{what}: {text}");
    }
    let viewer = server.token("safe", Role::Viewer, "vi");
    assert_eq!(http(&server, "POST", "/api/projects/safe/import", &viewer, &good).await.0, 403);
    assert_eq!(http(&server, "POST", "/api/projects/safe/import", "forged", &good).await.0, 401);
    let other = server.editor("other", "ed");
    assert_eq!(http(&server, "POST", "/api/projects/safe/import", &other, &good).await.0, 401);

    let root = server.connect("safe", "check").await;
    assert_eq!(tree_paths(&root), ["keep.txt"], "refused imports wrote nothing");
    server.stop().await;
}

/// Resident memory of this process (the server under test runs in it), from `/proc/self/status`:
/// `VmRSS` now, or `VmHWM`, the peak since [`reset_peak_memory`].
fn memory_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

fn reset_peak_memory() {
    // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0 and later).
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
}

/// Tar bytes for a GNU header of `kind` named `name` declaring `size` bytes.
fn tar_header(name: &[u8], kind: tar::EntryType, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.as_gnu_mut().expect("gnu").name[..name.len()].copy_from_slice(name);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(kind);
    header.set_cksum();
    header
}

/// A gzip'd tar that opens with one member of `kind` (named `name`) whose data is `prefix`, then
/// `fill` bytes of `byte`, then `suffix`, followed by a small regular file. The data is streamed
/// into the compressor in chunks, so building hundreds of MiB costs no memory.
fn crafted_tar_gz(kind: tar::EntryType, name: &[u8], prefix: &[u8], byte: u8, fill: u64, suffix: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let size = prefix.len() as u64 + fill + suffix.len() as u64;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar_header(name, kind, size).as_bytes()).unwrap();
    gz.write_all(prefix).unwrap();
    std::io::copy(&mut std::io::repeat(byte).take(fill), &mut gz).unwrap();
    gz.write_all(suffix).unwrap();
    gz.write_all(&vec![0; (512 - size % 512) as usize % 512]).unwrap();
    let follower = if kind.is_gnu_longlink() { tar::EntryType::Symlink } else { tar::EntryType::Regular };
    gz.write_all(tar_header(b"a.txt", follower, 1).as_bytes()).unwrap();
    gz.write_all(&[b'x'; 512]).unwrap();
    gz.write_all(&[0; 1024]).unwrap();
    gz.finish().unwrap()
}

/// A pax record `"<len> <key>=<value>\n"` whose value is `fill` bytes: its length prefix.
fn pax_prefix(key: &str, fill: u64) -> Vec<u8> {
    let rest = key.len() as u64 + 1 + fill + 1;
    let mut len = rest + 1;
    while len != rest + 1 + len.to_string().len() as u64 {
        len = rest + 1 + len.to_string().len() as u64;
    }
    format!("{len} {key}=").into_bytes()
}

/// A zip of one file whose name is `len` bytes of `byte` (a zip header holds at most 64 KiB).
fn zip_with_name(byte: u8, len: usize) -> Vec<u8> {
    use std::io::Write;
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let name = String::from_utf8(vec![byte; len]).unwrap();
    writer.start_file(name, zip::write::SimpleFileOptions::default()).unwrap();
    writer.write_all(b"x").unwrap();
    writer.finish().unwrap().into_inner()
}

/// A zip whose central directory lists `entries` files (all pointing at one stored local file),
/// each with as many empty extra fields as a header holds: 16383 of four bytes. The zip crate
/// keeps every parsed extra field in memory, tens of bytes apiece.
fn zip_packed_with_extra_fields(entries: u16) -> Vec<u8> {
    let le16 = |v: u16| v.to_le_bytes();
    let le32 = |v: u32| v.to_le_bytes();
    let crc = 0x8cdc_1683_u32; // CRC-32 of "x"
    let mut zip = Vec::new();
    zip.extend_from_slice(b"PK\x03\x04");
    zip.extend_from_slice(&le16(10)); // version needed
    zip.extend_from_slice(&[0; 8]); // flags, method (stored), time, date
    zip.extend_from_slice(&le32(crc));
    zip.extend_from_slice(&le32(1));
    zip.extend_from_slice(&le32(1));
    zip.extend_from_slice(&le16(5));
    zip.extend_from_slice(&le16(0));
    zip.extend_from_slice(b"a.txt");
    zip.push(b'x');
    let directory_start = zip.len() as u32;
    let extra: Vec<u8> = (0..16383u16).flat_map(|_| [0x34, 0x12, 0, 0]).collect();
    for i in 0..entries {
        let name = format!("f{i:05}");
        zip.extend_from_slice(b"PK\x01\x02");
        zip.extend_from_slice(&le16(20)); // version made by
        zip.extend_from_slice(&le16(10)); // version needed
        zip.extend_from_slice(&[0; 8]);
        zip.extend_from_slice(&le32(crc));
        zip.extend_from_slice(&le32(1));
        zip.extend_from_slice(&le32(1));
        zip.extend_from_slice(&le16(name.len() as u16));
        zip.extend_from_slice(&le16(extra.len() as u16));
        zip.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
        zip.extend_from_slice(&le32(0)); // external attributes
        zip.extend_from_slice(&le32(0)); // local header offset
        zip.extend_from_slice(name.as_bytes());
        zip.extend_from_slice(&extra);
    }
    let directory_size = zip.len() as u32 - directory_start;
    zip.extend_from_slice(b"PK\x05\x06");
    zip.extend_from_slice(&[0; 4]);
    zip.extend_from_slice(&le16(entries));
    zip.extend_from_slice(&le16(entries));
    zip.extend_from_slice(&le32(directory_size));
    zip.extend_from_slice(&le32(directory_start));
    zip.extend_from_slice(&le16(0));
    zip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_headers_and_bombs_are_refused_without_memory_or_echo() {
    const MIB: u64 = 1 << 20;
    let server = TestServer::start().await;
    let token = server.editor("bombs", "ed");
    let name = 512 * MIB;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "GNU long name of 512 MiB",
            crafted_tar_gz(tar::EntryType::GNULongName, b"././@LongLink", b"", b'q', name, b"\0"),
            "name or header is too long",
        ),
        (
            "GNU long link of 512 MiB",
            crafted_tar_gz(tar::EntryType::GNULongLink, b"././@LongLink", b"", b'q', name, b"\0"),
            "name or header is too long",
        ),
        (
            "pax path of 512 MiB",
            crafted_tar_gz(tar::EntryType::XHeader, b"PaxHeaders/a.txt", &pax_prefix("path", name), b'q', name, b"\n"),
            "name or header is too long",
        ),
        (
            "regular file declaring and holding 64 MiB of zeros",
            crafted_tar_gz(tar::EntryType::Regular, b"qqqq-bomb.txt", b"", 0, 64 * MIB, b""),
            "a file is larger than 1048576 bytes",
        ),
        (
            "folder entry carrying 256 MiB of zeros",
            crafted_tar_gz(tar::EntryType::Directory, b"qqqq-dir/", b"", 0, 256 * MIB, b""),
            "the archive unpacks to more than",
        ),
        ("zip with a 64 KiB file name", zip_with_name(b'q', 65_000), "name or header is too long"),
        (
            "zip of 480 entries with 16383 extra fields each",
            zip_packed_with_extra_fields(480),
            "name or header is too long",
        ),
    ];
    for (what, upload, phrase) in cases {
        assert!(upload.len() < (32 << 20), "{what}: the upload is {} bytes", upload.len());
        // The body itself is buffered whole before it is read (twice while it is collected).
        let allowed_mib = 64 + 2 * upload.len() as u64 / MIB;
        reset_peak_memory();
        let before = memory_kib("VmRSS");
        let (status, body) =
            tokio::time::timeout(WAIT, http(&server, "POST", "/api/projects/bombs/import", &token, &upload))
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer within {WAIT:?}"));
        let grown_mib = memory_kib("VmHWM").saturating_sub(before) / 1024;
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        eprintln!("{what}: {status} {text:?}, {} body bytes, peak RSS +{grown_mib} MiB", body.len());
        assert_eq!(status, 400, "{what}: {text}");
        assert!(body.len() < 200, "{what}: a {} byte answer", body.len());
        assert!(text.contains(phrase), "{what}: {text}");
        assert!(!text.contains("qqqq"), "{what}: the answer quotes the upload: {text}");
        assert!(grown_mib < allowed_mib, "{what}: the server's peak RSS grew by {grown_mib} MiB");
    }

    // The server keeps serving.
    let (status, body) = http(&server, "GET", "/healthz", "", b"").await;
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    let good = archive::write_tar_gz(&files(&[("still.txt", "works")]), 0).unwrap();
    let (status, body) = http(&server, "POST", "/api/projects/bombs/import", &token, &good).await;
    assert_eq!((status, String::from_utf8_lossy(&body).as_ref()), (200, "imported 1 files\n"));
    server.stop().await;
}
