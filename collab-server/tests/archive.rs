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
