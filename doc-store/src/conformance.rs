//! The conformance suite every [`DocStore`] implementation must pass, reusable from other crates.
//!
//! Call [`run_all`] with two handles to the *same* database opened separately (two pools,
//! standing for two server processes). Every case works under its own freshly made document
//! names, so the suite can run against a database other tests are using at the same time.
//! The cases panic on failure, like tests do.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{DocStore, NewCheckpoint, StoreError, StoredDoc};

/// Runs every case in turn; `a` and `b` must be two handles to one database.
pub async fn run_all(a: Arc<dyn DocStore>, b: Arc<dyn DocStore>) {
    macro_rules! run {
        ($($case:ident),* $(,)?) => {$(
            eprintln!("doc-store conformance: {}", stringify!($case));
            $case(a.clone(), b.clone()).await;
        )*};
    }
    run!(
        empty_document,
        append_then_load_in_order,
        large_batch_append,
        compaction_replaces_covered_updates,
        stale_compaction_is_refused,
        invalid_requests_are_rejected,
        concurrent_appends_get_distinct_increasing_seqs,
        concurrent_compaction_while_appending,
        load_sees_compaction_atomically,
        large_blobs,
        names_with_slashes_and_unicode,
        list_by_prefix,
        delete_removes_everything,
        checkpoints_round_trip,
        append_many_is_one_transaction,
    );
}

/// A document (or prefix) name no other case, run or process uses.
fn unique_name(case: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("conformance/{case}/{}-{nanos}-{n}", std::process::id())
}

fn blobs(items: &[&str]) -> Vec<Vec<u8>> {
    items.iter().map(|s| s.as_bytes().to_vec()).collect()
}

fn assert_invalid<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    match result {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("{what}: expected StoreError::Invalid, got {other:?}"),
    }
}

pub async fn empty_document(a: Arc<dyn DocStore>, _b: Arc<dyn DocStore>) {
    let doc = unique_name("empty");
    assert_eq!(a.load(&doc).await.unwrap(), StoredDoc::default());
    assert_eq!(a.log_len(&doc).await.unwrap(), 0);
    assert_eq!(a.append(&doc, &[]).await.unwrap(), 0, "empty append");
    assert!(!a.compact(&doc, b"nothing", 0).await.unwrap());
    assert!(a.list(&doc).await.unwrap().is_empty());
    a.delete(&doc).await.unwrap();
    assert_eq!(a.load(&doc).await.unwrap(), StoredDoc::default());
}

pub async fn append_then_load_in_order(a: Arc<dyn DocStore>, b: Arc<dyn DocStore>) {
    let doc = unique_name("append");
    assert_eq!(a.append(&doc, &blobs(&["one"])).await.unwrap(), 1);
    let batch = blobs(&["two", "three", "four"]);
    assert_eq!(a.append(&doc, &batch).await.unwrap(), 4);
    // The other handle continues the same sequence.
    assert_eq!(b.append(&doc, &blobs(&["five"])).await.unwrap(), 5);
    // An empty update is still an entry.
    assert_eq!(a.append(&doc, &[Vec::new()]).await.unwrap(), 6);
    assert_eq!(b.append(&doc, &[]).await.unwrap(), 6, "empty append");

    let mut expected = blobs(&["one", "two", "three", "four", "five"]);
    expected.push(Vec::new());
    let expected = StoredDoc { snapshot: None, updates: expected, last_seq: 6 };
    assert_eq!(a.load(&doc).await.unwrap(), expected);
    assert_eq!(b.load(&doc).await.unwrap(), expected);
    assert_eq!(a.log_len(&doc).await.unwrap(), 6);
}

/// More updates in one call than fit in one SQL statement's parameters on some backends.
pub async fn large_batch_append(a: Arc<dyn DocStore>, _b: Arc<dyn DocStore>) {
    let doc = unique_name("large-batch");
    let batch: Vec<Vec<u8>> = (0..2500u32).map(|i| i.to_le_bytes().to_vec()).collect();
    assert_eq!(a.append(&doc, &batch).await.unwrap(), 2500);
    let loaded = a.load(&doc).await.unwrap();
    assert_eq!(loaded.updates, batch);
    assert_eq!(loaded.last_seq, 2500);
    assert_eq!(a.append(&doc, &blobs(&["next"])).await.unwrap(), 2501);
    assert_eq!(a.log_len(&doc).await.unwrap(), 2501);
}

pub async fn compaction_replaces_covered_updates(a: Arc<dyn DocStore>, b: Arc<dyn DocStore>) {
    let doc = unique_name("compact");
    for (i, update) in ["u1", "u2", "u3", "u4", "u5"].iter().enumerate() {
        let seq = a.append(&doc, &blobs(&[update])).await.unwrap();
        assert_eq!(seq, i64::try_from(i).unwrap() + 1);
    }
    assert!(a.compact(&doc, b"snap-3", 3).await.unwrap());
    let expected = StoredDoc { snapshot: Some(b"snap-3".to_vec()), updates: blobs(&["u4", "u5"]), last_seq: 5 };
    assert_eq!(a.load(&doc).await.unwrap(), expected);
    assert_eq!(b.load(&doc).await.unwrap(), expected);
    assert_eq!(a.log_len(&doc).await.unwrap(), 2);

    assert_eq!(b.append(&doc, &blobs(&["u6"])).await.unwrap(), 6);
    assert!(b.compact(&doc, b"snap-6", 6).await.unwrap());
    let expected = StoredDoc { snapshot: Some(b"snap-6".to_vec()), updates: Vec::new(), last_seq: 6 };
    assert_eq!(a.load(&doc).await.unwrap(), expected);
    assert_eq!(a.log_len(&doc).await.unwrap(), 0);

    // Seqs go on after the snapshot even though the log is now empty.
    assert_eq!(a.append(&doc, &blobs(&["u7"])).await.unwrap(), 7);
    assert_eq!(
        b.load(&doc).await.unwrap(),
        StoredDoc { snapshot: Some(b"snap-6".to_vec()), updates: blobs(&["u7"]), last_seq: 7 }
    );
    assert_eq!(b.log_len(&doc).await.unwrap(), 1);
}

pub async fn stale_compaction_is_refused(a: Arc<dyn DocStore>, b: Arc<dyn DocStore>) {
    let doc = unique_name("stale");
    let updates = blobs(&["u1", "u2", "u3", "u4", "u5", "u6"]);
    assert_eq!(a.append(&doc, &updates).await.unwrap(), 6);
    assert!(a.compact(&doc, b"snap-4", 4).await.unwrap());
    assert!(!b.compact(&doc, b"snap-2", 2).await.unwrap(), "lower upto_seq");
    assert!(!b.compact(&doc, b"other-4", 4).await.unwrap(), "equal upto_seq");
    assert!(!a.compact(&doc, b"other-4", 4).await.unwrap(), "same handle");
    let expected = StoredDoc { snapshot: Some(b"snap-4".to_vec()), updates: blobs(&["u5", "u6"]), last_seq: 6 };
    assert_eq!(a.load(&doc).await.unwrap(), expected);
    assert_eq!(b.log_len(&doc).await.unwrap(), 2);
}

pub async fn invalid_requests_are_rejected(a: Arc<dyn DocStore>, _b: Arc<dyn DocStore>) {
    for name in ["", "nul\0inside"] {
        assert_invalid(a.load(name).await, "load");
        assert_invalid(a.append(name, &blobs(&["x"])).await, "append");
        assert_invalid(a.compact(name, b"s", 1).await, "compact");
        assert_invalid(a.log_len(name).await, "log_len");
        assert_invalid(a.delete(name).await, "delete");
    }
    assert!(a.list("nul\0").await.unwrap().is_empty());

    let doc = unique_name("invalid");
    assert_eq!(a.append(&doc, &blobs(&["u1", "u2"])).await.unwrap(), 2);
    assert_invalid(a.compact(&doc, b"s", -1).await, "negative upto_seq");
    assert_invalid(a.compact(&doc, b"s", 3).await, "upto_seq past the log");
    let expected = StoredDoc { snapshot: None, updates: blobs(&["u1", "u2"]), last_seq: 2 };
    assert_eq!(a.load(&doc).await.unwrap(), expected);
}

const APPENDERS: u64 = 8;
const APPENDS_PER_TASK: u64 = 50;

/// Many tasks on both handles append to one document at once.
pub async fn concurrent_appends_get_distinct_increasing_seqs(a: Arc<dyn DocStore>, b: Arc<dyn DocStore>) {
    let doc: Arc<str> = unique_name("concurrent-append").into();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..APPENDERS {
        let store = if task % 2 == 0 { a.clone() } else { b.clone() };
        let doc = doc.clone();
        tasks.spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..APPENDS_PER_TASK {
                let update = format!("task {task} update {i}").into_bytes();
                let seq = store.append(&doc, std::slice::from_ref(&update)).await.unwrap();
                if let Some(&(previous, _)) = seqs.last() {
                    assert!(seq > previous, "seq {seq} after {previous} in task {task}");
                }
                seqs.push((seq, update));
            }
            seqs
        });
    }
    let mut by_seq = BTreeMap::new();
    while let Some(seqs) = tasks.join_next().await {
        for (seq, update) in seqs.unwrap() {
            assert!(by_seq.insert(seq, update).is_none(), "seq {seq} given twice");
        }
    }
    let total = APPENDERS * APPENDS_PER_TASK;
    let expected_seqs: Vec<i64> = (1..=i64::try_from(total).unwrap()).collect();
    assert_eq!(by_seq.keys().copied().collect::<Vec<_>>(), expected_seqs);

    let loaded = b.load(&doc).await.unwrap();
    assert_eq!(loaded.last_seq, i64::try_from(total).unwrap());
    assert_eq!(
        loaded.updates,
        by_seq.into_values().collect::<Vec<_>>(),
        "load must return each update at the seq its append returned"
    );
}

/// An update in the compaction race: the id it carries.
fn id_update(id: u64) -> Vec<u8> {
    id.to_le_bytes().to_vec()
}

/// Test stand-in for a CRDT merge: a snapshot is the sorted set of update ids it contains.
fn merged_ids(stored: &StoredDoc) -> BTreeSet<u64> {
    let snapshot = stored.snapshot.as_deref().unwrap_or_default();
    snapshot
        .chunks_exact(8)
        .chain(stored.updates.iter().map(Vec::as_slice))
        .map(|bytes| u64::from_le_bytes(bytes.try_into().expect("8-byte id")))
        .collect()
}

fn encode_ids(ids: &BTreeSet<u64>) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_le_bytes()).collect()
}

/// Two "processes" compact one document over and over while four tasks append to it: no
/// update may ever be missing from a load, and none may be lost at the end.
pub async fn concurrent_compaction_while_appending(a: Arc<dyn DocStore>, b: Arc<dyn DocStore>) {
    const TASKS: u64 = 4;
    const APPENDS: u64 = 40;
    let doc: Arc<str> = unique_name("compaction-race").into();
    // Ids whose append has returned: every load started afterwards must contain them.
    let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));

    let mut appenders = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let store = if task % 2 == 0 { a.clone() } else { b.clone() };
        let (doc, confirmed) = (doc.clone(), confirmed.clone());
        appenders.spawn(async move {
            for i in 0..APPENDS {
                let id = task * 1_000_000 + i * 10;
                // Every third append is a batch of two.
                let ids = if i % 3 == 0 { vec![id, id + 1] } else { vec![id] };
                let updates: Vec<Vec<u8>> = ids.iter().copied().map(id_update).collect();
                store.append(&doc, &updates).await.unwrap();
                confirmed.lock().unwrap().extend(ids);
            }
        });
    }

    let mut compactors = tokio::task::JoinSet::new();
    for store in [a.clone(), b.clone()] {
        let (doc, confirmed, stop) = (doc.clone(), confirmed.clone(), stop.clone());
        compactors.spawn(async move {
            let (mut applied, mut refused) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let before = confirmed.lock().unwrap().clone();
                let stored = store.load(&doc).await.unwrap();
                let ids = merged_ids(&stored);
                let missing: Vec<_> = before.difference(&ids).collect();
                assert!(missing.is_empty(), "load lost confirmed updates {missing:?}");
                if stored.last_seq == 0 {
                    tokio::task::yield_now().await;
                    continue;
                }
                let snapshot = encode_ids(&ids);
                if store.compact(&doc, &snapshot, stored.last_seq).await.unwrap() {
                    applied += 1;
                } else {
                    refused += 1;
                }
            }
            (applied, refused)
        });
    }

    while let Some(result) = appenders.join_next().await {
        result.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut applied = 0;
    while let Some(result) = compactors.join_next().await {
        applied += result.unwrap().0;
    }
    assert!(applied > 0, "no compaction was applied during the race");

    let expected = confirmed.lock().unwrap().clone();
    let expected_len = usize::try_from(TASKS * (APPENDS + APPENDS.div_ceil(3))).unwrap();
    assert_eq!(expected.len(), expected_len);
    let stored = a.load(&doc).await.unwrap();
    assert_eq!(merged_ids(&stored), expected);

    // A final compaction from the other handle leaves only the snapshot.
    let compacted = b.compact(&doc, &encode_ids(&expected), stored.last_seq).await.unwrap();
    assert_eq!(compacted, !stored.updates.is_empty());
    let stored = a.load(&doc).await.unwrap();
    assert!(stored.updates.is_empty());
    assert_eq!(merged_ids(&stored), expected);
    assert_eq!(a.log_len(&doc).await.unwrap(), 0);
}

/// One handle appends and compacts in a tight loop while the other loads: a load must never
/// pair an old snapshot with the log as it is after a newer compaction.
pub async fn load_sees_compaction_atomically(a: Arc<dyn DocStore>, b: Arc<dyn DocStore>) {
    const ROUNDS: u64 = 150;
    let doc: Arc<str> = unique_name("load-atomic").into();
    let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));

    let loader = {
        let (doc, confirmed, stop) = (doc.clone(), confirmed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut loads = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let before = confirmed.lock().unwrap().clone();
                let ids = merged_ids(&a.load(&doc).await.unwrap());
                let missing: Vec<_> = before.difference(&ids).collect();
                assert!(missing.is_empty(), "load lost confirmed updates {missing:?}");
                loads += 1;
            }
            loads
        })
    };
    for id in 0..ROUNDS {
        b.append(&doc, &[id_update(id)]).await.unwrap();
        confirmed.lock().unwrap().insert(id);
        let stored = b.load(&doc).await.unwrap();
        let compacted = b.compact(&doc, &encode_ids(&merged_ids(&stored)), stored.last_seq).await.unwrap();
        assert!(compacted, "uncontested compaction refused");
    }
    stop.store(true, Ordering::Relaxed);
    assert!(loader.await.unwrap() > 0);
    let expected: BTreeSet<u64> = (0..ROUNDS).collect();
    assert_eq!(merged_ids(&b.load(&doc).await.unwrap()), expected);
}

pub async fn large_blobs(a: Arc<dyn DocStore>, b: Arc<dyn DocStore>) {
    const SIZE: usize = 5 * 1024 * 1024;
    let pattern =
        |salt: usize| -> Vec<u8> { (0..SIZE).map(|i| u8::try_from((i * 31 + salt) % 251).unwrap()).collect() };
    let doc = unique_name("large");
    let (big1, big2, big_snapshot) = (pattern(1), pattern(2), pattern(3));
    assert_eq!(a.append(&doc, std::slice::from_ref(&big1)).await.unwrap(), 1);
    let batch = vec![big2.clone(), b"small".to_vec()];
    assert_eq!(a.append(&doc, &batch).await.unwrap(), 3);
    let loaded = b.load(&doc).await.unwrap();
    assert_eq!(loaded.updates.len(), 3);
    assert!(loaded.updates[0] == big1 && loaded.updates[1] == big2, "large updates differ");
    assert_eq!(loaded.updates[2], b"small");

    assert!(b.compact(&doc, &big_snapshot, 2).await.unwrap());
    let loaded = a.load(&doc).await.unwrap();
    assert!(loaded.snapshot.as_ref() == Some(&big_snapshot), "large snapshot differs");
    assert_eq!(loaded.updates, blobs(&["small"]));
    assert_eq!(loaded.last_seq, 3);
}

pub async fn names_with_slashes_and_unicode(a: Arc<dyn DocStore>, b: Arc<dyn DocStore>) {
    let base = unique_name("names");
    let names: Vec<String> = [
        "/proj/sub/doc",
        "/proj/sub/doc/",
        "/proj/ドキュメント 📝",
        "/proj/Émoji 🚀/ünïcödé",
        "/proj/quotes ' \" and wildcards % _ * ?",
        "/proj/back\\slash",
    ]
    .iter()
    .map(|suffix| format!("{base}{suffix}"))
    .collect();
    for name in &names {
        a.append(name, &[name.as_bytes().to_vec()]).await.unwrap();
    }
    for name in &names {
        let loaded = b.load(name).await.unwrap();
        assert_eq!(loaded.updates, vec![name.as_bytes().to_vec()], "doc {name:?}");
        assert_eq!(loaded.last_seq, 1, "doc {name:?}");
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(b.list(&base).await.unwrap(), sorted);
}

pub async fn list_by_prefix(a: Arc<dyn DocStore>, b: Arc<dyn DocStore>) {
    let base = unique_name("list");
    let suffixes = ["/p/a", "/p/b/c", "/p/B", "/p/é", "/p/Z", "/pz", "/P/x", "/p%/lit", "/p_/lit", "/q/a"];
    let names: Vec<String> = suffixes.iter().map(|s| format!("{base}{s}")).collect();
    for name in &names {
        a.append(name, &blobs(&["x"])).await.unwrap();
    }
    // A document whose log was compacted away entirely is still listed.
    let snapshot_only = format!("{base}/p/snapshot-only");
    assert_eq!(b.append(&snapshot_only, &blobs(&["x"])).await.unwrap(), 1);
    assert!(b.compact(&snapshot_only, b"snap", 1).await.unwrap());
    assert_eq!(b.log_len(&snapshot_only).await.unwrap(), 0);

    let mut all = names.clone();
    all.push(snapshot_only);
    all.sort();
    let expect =
        |prefix: &str| -> Vec<String> { all.iter().filter(|name| name.starts_with(prefix)).cloned().collect() };
    for prefix in ["/p/", "/p", "/P", "/p%", "/p_", "/p/b", "/nothing"] {
        let prefix = format!("{base}{prefix}");
        let expected = expect(&prefix);
        assert_eq!(a.list(&prefix).await.unwrap(), expected, "prefix {prefix:?}");
        assert_eq!(b.list(&prefix).await.unwrap(), expected, "prefix {prefix:?}");
    }
    assert_eq!(a.list(&base).await.unwrap(), all);
    assert_eq!(expect(&format!("{base}/p%")).len(), 1, "% is not a wildcard");
}

pub async fn delete_removes_everything(a: Arc<dyn DocStore>, b: Arc<dyn DocStore>) {
    let base = unique_name("delete");
    let (doomed, kept) = (format!("{base}/doomed"), format!("{base}/kept"));
    a.append(&doomed, &blobs(&["d1", "d2", "d3"])).await.unwrap();
    assert!(a.compact(&doomed, b"snap", 2).await.unwrap());
    a.append(&kept, &blobs(&["k1"])).await.unwrap();

    b.delete(&doomed).await.unwrap();
    assert_eq!(a.load(&doomed).await.unwrap(), StoredDoc::default());
    assert_eq!(a.log_len(&doomed).await.unwrap(), 0);
    assert_eq!(a.list(&base).await.unwrap(), vec![kept.clone()]);
    assert_eq!(a.load(&kept).await.unwrap().updates, blobs(&["k1"]));

    // Deleting again is fine, and a recreated document starts over.
    a.delete(&doomed).await.unwrap();
    assert_eq!(b.append(&doomed, &blobs(&["new"])).await.unwrap(), 1);
    assert_eq!(a.load(&doomed).await.unwrap(), StoredDoc { snapshot: None, updates: blobs(&["new"]), last_seq: 1 });
}

pub async fn checkpoints_round_trip(a: Arc<dyn DocStore>, b: Arc<dyn DocStore>) {
    let project = unique_name("checkpoints").replace('/', "-");
    let docs = vec![(project.clone(), b"root".to_vec()), (format!("{project}/f1"), vec![0u8, 1, 2, 255])];
    let first = a
        .create_checkpoint(&NewCheckpoint {
            project: &project,
            name: "before lunch",
            author: "ada",
            created_at: 1_000,
            docs: &docs,
        })
        .await
        .expect("create");
    let second = b
        .create_checkpoint(&NewCheckpoint {
            project: &project,
            name: "auto",
            author: "server",
            created_at: 2_000,
            docs: &docs[..1],
        })
        .await
        .expect("create from the other handle");
    assert!(second > first, "ids increase");
    let listed = a.list_checkpoints(&project).await.expect("list");
    let summary: Vec<(i64, &str, &str, i64, i64)> =
        listed.iter().map(|c| (c.id, c.name.as_str(), c.author.as_str(), c.created_at, c.docs)).collect();
    assert_eq!(summary, vec![(first, "before lunch", "ada", 1_000, 2), (second, "auto", "server", 2_000, 1)]);
    assert_eq!(b.load_checkpoint(&project, first).await.expect("load"), Some(docs.clone()));
    assert_eq!(a.load_checkpoint("another-project", first).await.expect("load"), None, "scoped to its project");
    assert_eq!(a.load_checkpoint(&project, second + 1000).await.expect("load"), None);
    a.delete_checkpoint("another-project", first).await.expect("delete elsewhere is a no-op");
    assert_eq!(a.list_checkpoints(&project).await.expect("list").len(), 2);
    b.delete_checkpoint(&project, first).await.expect("delete");
    assert_eq!(a.load_checkpoint(&project, first).await.expect("load"), None);
    assert_eq!(a.list_checkpoints(&project).await.expect("list").len(), 1);
    let bad = vec![(String::new(), Vec::new())];
    assert_invalid(
        a.create_checkpoint(&NewCheckpoint { project: &project, name: "x", author: "y", created_at: 0, docs: &bad })
            .await,
        "empty document name in a checkpoint",
    );
}

pub async fn append_many_is_one_transaction(a: Arc<dyn DocStore>, b: Arc<dyn DocStore>) {
    let (x, y) = (unique_name("group-x"), unique_name("group-y"));
    a.append(&x, &blobs(&["x1"])).await.expect("append");
    let (x23, y1, x4) = (blobs(&["x2", "x3"]), blobs(&["y1"]), blobs(&["x4"]));
    let batch = [(x.as_str(), x23.as_slice()), (y.as_str(), y1.as_slice()), (x.as_str(), x4.as_slice())];
    assert_eq!(b.append_many(&batch).await.expect("group"), vec![3, 1, 4]);
    assert_eq!(a.load(&x).await.expect("load").updates, blobs(&["x1", "x2", "x3", "x4"]));
    assert_eq!(a.load(&y).await.expect("load").updates, blobs(&["y1"]));
    let z = unique_name("group-z");
    let (z1, never) = (blobs(&["z1"]), blobs(&["never"]));
    let bad = [(z.as_str(), z1.as_slice()), ("", never.as_slice())];
    assert_invalid(a.append_many(&bad).await, "a group with an empty name");
    assert_eq!(a.load(&z).await.expect("load"), StoredDoc::default(), "all or nothing");
    assert_eq!(a.append_many(&[]).await.expect("empty group"), Vec::<i64>::new());
}
