//! Checkpoints: create and list, diff against now, restore live while peers edit (and undo the
//! restore), automatic checkpoints with retention, and roles.

mod common;

use std::time::Duration;

use collab_server::archive::{self, ArchiveFile};
use collab_test_support::wait;
use common::{TestServer, WAIT, http, until};
use sync_core::Role;
use yrs::Transact;

fn upload(list: &[(&str, &str)]) -> Vec<u8> {
    let files: Vec<ArchiveFile> =
        list.iter().map(|(p, t)| ArchiveFile { path: (*p).into(), text: (*t).into() }).collect();
    archive::write_tar_gz(&files, 0).unwrap()
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

fn paths(peer: &collab_client::DocPeer) -> Vec<String> {
    sync_core::tree::entries(&peer.doc().transact()).into_iter().map(|e| e.path).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_diff_and_restore_live_while_two_clients_edit() {
    let server = TestServer::start().await;
    let ada = server.editor("cp", "ada");
    let (status, _) =
        http(&server, "POST", "/api/projects/cp/import", &ada, &upload(&[("main.py", "v1\n"), ("notes.md", "n1\n")]))
            .await;
    assert_eq!(status, 200);
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let (status, body) = http(&server, "POST", "/api/projects/cp/checkpoints?name=first", &ada, b"").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let first = json(&body)["id"].as_i64().unwrap();

    let (status, body) = http(&server, "GET", "/api/projects/cp/checkpoints", &ada, b"").await;
    assert_eq!(status, 200);
    let list = json(&body);
    assert_eq!(list[0]["id"], first);
    assert_eq!(list[0]["name"], "first");
    assert_eq!(list[0]["author"], "ADA");
    assert_eq!(list[0]["documents"], 3, "root and two files");
    assert!((list[0]["created_at"].as_i64().unwrap() - started).abs() < 60_000);

    // Two people edit main.py, and a new file appears.
    let root = server.connect("cp", "watcher").await;
    let main_id = sync_core::tree::find_by_path(&root.doc().transact(), "main.py").unwrap().id;
    let doc = format!("cp/{main_id}");
    let a = server.connect(&doc, "a").await;
    let b = server.connect(&doc, "b").await;
    a.insert(0, "# by a\n");
    b.wait_text("# by a\nv1\n", WAIT).await.unwrap();
    b.insert(10, "print('b')\n");
    a.wait_text("# by a\nv1\nprint('b')\n", WAIT).await.unwrap();
    assert_eq!(http(&server, "POST", "/api/projects/cp/import", &ada, &upload(&[("extra.txt", "x")])).await.0, 200);
    root.wait_until("extra.txt appears", WAIT, |p| paths(p).contains(&"extra.txt".to_string())).await.unwrap();

    let (status, diff) =
        http(&server, "GET", &format!("/api/projects/cp/checkpoints/{first}/diff?path=main.py"), &ada, b"").await;
    let diff = String::from_utf8_lossy(&diff);
    assert_eq!(status, 200);
    assert!(diff.contains("--- a/main.py") && diff.contains("+++ b/main.py"), "{diff}");
    assert!(diff.contains("+# by a") && diff.contains("+print('b')") && diff.contains(" v1"), "{diff}");
    let (_, new_file) =
        http(&server, "GET", &format!("/api/projects/cp/checkpoints/{first}/diff?path=extra.txt"), &ada, b"").await;
    assert!(String::from_utf8_lossy(&new_file).contains("--- /dev/null"));
    let (status, _) =
        http(&server, "GET", &format!("/api/projects/cp/checkpoints/{first}/diff?path=nope"), &ada, b"").await;
    assert_eq!(status, 404);

    // Export at the checkpoint: the files as they were, whatever happened since.
    let (status, bytes) =
        http(&server, "GET", &format!("/api/projects/cp/export?format=zip&checkpoint={first}"), &ada, b"").await;
    assert_eq!(status, 200);
    let mut at = archive::read(&bytes, archive::ArchiveLimits::default()).unwrap();
    at.sort_by(|a, b| a.path.cmp(&b.path));
    let expected: Vec<ArchiveFile> = [("main.py", "v1\n"), ("notes.md", "n1\n")]
        .iter()
        .map(|(p, t)| ArchiveFile { path: (*p).into(), text: (*t).into() })
        .collect();
    assert_eq!(at, expected);

    // Restore: both editors see main.py revert live, the watcher sees extra.txt go.
    let (status, body) =
        http(&server, "POST", &format!("/api/projects/cp/checkpoints/{first}/restore"), &ada, b"").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let before_restore = json(&body)["saved_before"].as_i64().unwrap();
    a.wait_text("v1\n", WAIT).await.expect("a sees the revert");
    b.wait_text("v1\n", WAIT).await.expect("b sees the revert");
    root.wait_until("extra.txt removed", WAIT, |p| paths(p) == ["main.py", "notes.md"]).await.unwrap();

    // The restore is a new change, not a rewrite: the state it replaced can be restored in turn.
    let (status, _) =
        http(&server, "POST", &format!("/api/projects/cp/checkpoints/{before_restore}/restore"), &ada, b"").await;
    assert_eq!(status, 200);
    a.wait_text("# by a\nv1\nprint('b')\n", WAIT).await.expect("undo of the restore");
    until("extra.txt back", || paths(&root).contains(&"extra.txt".to_string())).await;

    let viewer = server.token("cp", Role::Viewer, "vi");
    assert_eq!(http(&server, "POST", "/api/projects/cp/checkpoints?name=v", &viewer, b"").await.0, 403);
    assert_eq!(
        http(&server, "POST", &format!("/api/projects/cp/checkpoints/{first}/restore"), &viewer, b"").await.0,
        403
    );
    assert_eq!(http(&server, "GET", "/api/projects/cp/checkpoints", &viewer, b"").await.0, 200);
    let other = server.editor("other", "x");
    assert_eq!(
        http(&server, "POST", &format!("/api/projects/other/checkpoints/{first}/restore"), &other, b"").await.0,
        404
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_checkpoints_follow_activity_and_are_pruned() {
    let server = TestServer::start_with(|c| {
        c.auto_checkpoint_interval = Duration::from_millis(150);
        c.auto_checkpoints_kept = 2;
    })
    .await;
    let token = server.editor("auto", "ed");
    let autos = |body: &[u8]| -> Vec<i64> {
        let list = json(body);
        list.as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"].as_str().unwrap().starts_with("auto:"))
            .map(|c| c["id"].as_i64().unwrap())
            .collect()
    };
    let mut seen = Vec::new();
    for round in 0..4 {
        let files = upload(&[("f.txt", &format!("round {round}"))]);
        assert_eq!(http(&server, "POST", "/api/projects/auto/import", &token, &files).await.0, 200);
        // A new automatic checkpoint, with the older ones pruned (pruning follows creation, so
        // for a moment there may be one too many).
        let what = format!("a new automatic checkpoint with retention applied after round {round}");
        let newest = wait::poll(
            &what,
            WAIT,
            || async {
                let ids = autos(&http(&server, "GET", "/api/projects/auto/checkpoints", &token, b"").await.1);
                ids.last().copied().filter(|last| !seen.contains(last) && ids.len() <= 2)
            },
            String::new,
        )
        .await;
        seen.push(newest);
    }
    let (_, body) = http(&server, "GET", "/api/projects/auto/checkpoints", &token, b"").await;
    assert_eq!(autos(&body).len(), 2, "older automatic checkpoints were pruned");
    // What the AI peer asks for before each turn: automatic, and pruned like the others.
    for _ in 0..3 {
        let (status, _) =
            http(&server, "POST", "/api/projects/auto/checkpoints?auto=before-ai-turn", &token, b"").await;
        assert_eq!(status, 200);
    }
    let (_, body) = http(&server, "GET", "/api/projects/auto/checkpoints", &token, b"").await;
    let list = json(&body);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["auto: before AI turn", "auto: before AI turn"], "only the newest automatic ones are kept");
    let (status, _) = http(&server, "POST", "/api/projects/auto/checkpoints?name=auto:%20sneaky", &token, b"").await;
    assert_eq!(status, 400, "named checkpoints cannot pose as automatic ones");
    server.stop().await;
}
