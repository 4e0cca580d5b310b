//! Seed inputs for every fuzz target, made with the crates' own encoders (written to `fuzz/corpus/` by the example).

use collab_server::archive::{self, ArchiveFile};
use sync_core::tree::{self, EntryKind};
use sync_core::wire::{self, HocusOut, MSG_AUTH, OutMsg};
use yrs::encoding::write::Write;
use yrs::sync::Awareness;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Array, Doc, Map, ReadTxn, StateVector, Text, Transact, WriteTxn};

use crate::update::{EDITOR_FRAME, EDITOR_UPDATE, SAME_BATCH, STEP2, VIEWER_FRAME, VIEWER_UPDATE, record};

/// One seed input: the target it is for, a file name, the bytes.
pub type Seed = (&'static str, String, Vec<u8>);

fn text_edits(client: u64) -> (Doc, Vec<Vec<u8>>) {
    let doc = Doc::with_client_id(client);
    let text = doc.get_or_insert_text(tree::CONTENT);
    let mut updates = Vec::new();
    for (at, s) in [(0, "hello"), (5, " world"), (0, "// ")] {
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, at, s);
        updates.push(txn.encode_update_v1());
    }
    let mut txn = doc.transact_mut();
    text.remove_range(&mut txn, 2, 4);
    updates.push(txn.encode_update_v1());
    drop(txn);
    (doc, updates)
}

fn awareness_update(client: u64) -> Vec<u8> {
    let mut aw = Awareness::new(Doc::with_client_id(client));
    aw.set_local_state_raw(r##"{"user":{"name":"Ada","color":"#f80"},"cursor":{"anchor":3,"head":5}}"##);
    aw.update().expect("awareness encodes").encode_v1()
}

fn full_state(doc: &Doc) -> Vec<u8> {
    doc.transact().encode_state_as_update_v1(&StateVector::default())
}

fn wire_seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (doc, updates) = text_edits(11);
    let sv = doc.transact().state_vector();
    let state = full_state(&doc);
    let aw = awareness_update(11);
    let msgs = [
        OutMsg::SyncStep1(&StateVector::default()),
        OutMsg::SyncStep1(&sv),
        OutMsg::SyncStep2(&state),
        OutMsg::Update(&updates[0]),
        OutMsg::Update(&updates[3]),
        OutMsg::Awareness(&aw),
    ];
    let mut yws: Vec<Vec<u8>> = msgs.iter().map(|m| wire::encode_ywebsocket(*m)).collect();
    let mut several = wire::encode_ywebsocket(OutMsg::Update(&updates[1]));
    several.extend(wire::encode_ywebsocket(OutMsg::SyncStep1(&sv)));
    several.push(wire::MSG_QUERY_AWARENESS as u8);
    several.extend(wire::encode_ywebsocket_permission_denied("read-only"));
    yws.push(several);

    let key = "demo/0123456789abcdef";
    let mut hocus: Vec<Vec<u8>> = msgs.iter().map(|m| wire::encode_hocus_client(key, *m)).collect();
    hocus.push(wire::encode_hocus(&format!("{key}\0session-1"), HocusOut::Doc(OutMsg::Update(&updates[2]))));
    let mut token = wire::encode_hocus_token("demo", "eyJhbGciOiJIUzI1NiJ9.e30.sig");
    token.write_string("4.8.0");
    hocus.push(token);
    hocus.push(wire::encode_hocus_close(key));
    hocus.push(wire::encode_hocus("demo", HocusOut::Authenticated { read_write: true }));
    hocus.push(wire::encode_hocus("demo", HocusOut::Authenticated { read_write: false }));
    hocus.push(wire::encode_hocus("demo", HocusOut::PermissionDenied("permission-denied")));
    hocus.push(wire::encode_hocus(key, HocusOut::SyncStatus(true)));
    hocus.push(wire::encode_hocus(key, HocusOut::Close("unauthorized")));
    let mut stateless = Vec::new();
    stateless.write_string(key);
    stateless.write_var(wire::HOCUS_STATELESS);
    stateless.write_string(r#"{"kind":"hello"}"#);
    hocus.push(stateless);
    let mut query = Vec::new();
    query.write_string(key);
    query.write_var(wire::MSG_QUERY_AWARENESS);
    hocus.push(query);
    let mut bare_auth = Vec::new();
    bare_auth.write_string(key);
    bare_auth.write_var(MSG_AUTH);
    bare_auth.write_var(7u64);
    hocus.push(bare_auth);
    hocus.push(wire::hocus_ping());
    hocus.push(wire::hocus_pong());
    (yws, hocus)
}

/// What a peer that has `client`'s first two clock ticks and nothing else is missing.
fn from_clock_2(doc: &Doc, client: u64) -> Vec<u8> {
    let mut sv = StateVector::default();
    sv.set_max(yrs::block::ClientID::new(client), 2);
    doc.transact().encode_state_as_update_v1(&sv)
}

fn update_apply_seeds() -> Vec<Vec<u8>> {
    let (doc, updates) = text_edits(21);
    let (_, other) = text_edits(22);
    let state = full_state(&doc);
    let frame = wire::encode_ywebsocket;
    let mut step1_and_update = frame(OutMsg::SyncStep1(&StateVector::default()));
    step1_and_update.extend(frame(OutMsg::Update(&updates[0])));
    vec![
        // Edits in order, one per batch.
        updates.iter().flat_map(|u| record(EDITOR_UPDATE, u)).collect(),
        // Edits out of order: the later ones wait for their dependencies.
        [record(EDITOR_UPDATE, &updates[2]), record(EDITOR_UPDATE, &updates[0]), record(EDITOR_UPDATE, &updates[1])]
            .concat(),
        // Two writers' edits in one batch, then a viewer's refused edit and an empty step 2.
        [
            record(EDITOR_UPDATE, &updates[0]),
            record(EDITOR_UPDATE | SAME_BATCH, &other[0]),
            record(VIEWER_UPDATE, &updates[1]),
            record(VIEWER_UPDATE | STEP2, &[0, 0]),
        ]
        .concat(),
        // Whole frames: a full step 2, the viewer's step 1, awareness, a query.
        [
            record(EDITOR_UPDATE | STEP2, &state),
            record(VIEWER_FRAME, &frame(OutMsg::SyncStep1(&StateVector::default()))),
            record(EDITOR_FRAME, &frame(OutMsg::Awareness(&awareness_update(21)))),
            record(VIEWER_FRAME, &[wire::MSG_QUERY_AWARENESS as u8]),
            record(EDITOR_FRAME, &step1_and_update),
        ]
        .concat(),
        // A deletion of content the room does not have yet.
        [record(EDITOR_UPDATE, &updates[3]), record(EDITOR_UPDATE, &state)].concat(),
        // A resend that overlaps what is pending: everything from clock 2 on, then the first edit.
        [record(EDITOR_UPDATE | STEP2, &from_clock_2(&doc, 21)), record(EDITOR_UPDATE, &updates[0])].concat(),
    ]
}

/// Updates against the seeded tree (and two hostile documents) for the `tree_reader` target.
fn tree_seeds() -> Vec<Vec<u8>> {
    let seed = crate::tree::seed_doc();
    let base = seed.transact().state_vector();
    let mut out = vec![full_state(&seed)];

    let edited = Doc::with_client_id(3);
    edited.transact_mut().apply_update(yrs::Update::decode_v1(&out[0]).expect("seed")).expect("seed applies");
    {
        let mut txn = edited.transact_mut();
        tree::rename(&mut txn, crate::tree::SEED_IDS[2], "docs/README.md").expect("rename");
        tree::put_entry(&mut txn, "1111111111111111", "src/main.py", EntryKind::File).expect("put");
        tree::put_entry(&mut txn, "2222222222222222", "src/util.py", EntryKind::File).expect("put");
        tree::delete(&mut txn, crate::tree::SEED_IDS[3]).expect("delete");
        tree::set_setting(&mut txn, "language", "rust");
        let files = txn.get_or_insert_map(tree::FILES);
        // Malformed entries a buggy peer could write: a path that is a number, a plain string.
        files.insert(&mut txn, "3333333333333333", yrs::MapPrelim::from([("path".to_owned(), yrs::Any::from(42.0))]));
        files.insert(&mut txn, "4444444444444444", "not a map");
        let chat = txn.get_or_insert_array(tree::CHAT);
        chat.push_back(&mut txn, "not an object");
    }
    out.push(edited.transact().encode_state_as_update_v1(&base));

    // Root types of the wrong kind.
    let wrong = Doc::with_client_id(4);
    {
        let mut txn = wrong.transact_mut();
        txn.get_or_insert_array(tree::FILES).push_back(&mut txn, "x");
        txn.get_or_insert_map(tree::CHAT).insert(&mut txn, "a", 1.0);
        txn.get_or_insert_text(tree::SETTINGS).push(&mut txn, "run");
        txn.get_or_insert_text(tree::META).push(&mut txn, "schema");
    }
    out.push(full_state(&wrong));
    out
}

fn archive_seeds() -> Vec<Vec<u8>> {
    let file = |path: &str, text: &str| ArchiveFile { path: path.into(), text: text.into() };
    let files = vec![file("main.py", "print('hi')\n"), file("src/util.py", "def f():\n    return 1\n")];
    let one = vec![file("README.md", "# demo\n")];
    vec![
        archive::write_tar_gz(&files, 1_700_000_000).expect("tar.gz"),
        archive::write_zip(&files).expect("zip"),
        archive::write_tar_gz(&one, 0).expect("tar.gz"),
        archive::write_zip(&one).expect("zip"),
    ]
}

/// Every seed input of every target.
pub fn corpus() -> Vec<Seed> {
    let (yws, hocus) = wire_seeds();
    let named = |target: &'static str, inputs: Vec<Vec<u8>>| -> Vec<Seed> {
        inputs.into_iter().enumerate().map(|(i, bytes)| (target, format!("seed-{i:02}"), bytes)).collect()
    };
    [
        named("wire_ywebsocket", yws),
        named("wire_hocus", hocus),
        named("update_apply", update_apply_seeds()),
        named("tree_reader", tree_seeds()),
        named("archive_import", archive_seeds()),
    ]
    .concat()
}

/// Hand-made hostile inputs, one set per target, kept in `fuzz/regressions/` beside the crashes
/// the fuzzer found: truncations, overlong varints, garbage updates, a corrupt gzip, a traversal.
pub fn hostile() -> Vec<Seed> {
    let (_, updates) = text_edits(31);
    let update_frame = wire::encode_ywebsocket(OutMsg::Update(&updates[0]));
    let truncated = update_frame[..update_frame.len() - 1].to_vec();
    let overlong_varint = vec![0xff; 11];
    let hocus_frame = wire::encode_hocus_client("demo", OutMsg::Update(&updates[0]));
    let garbage_update = vec![1, 2, 3, 200, 200, 200];
    let file = |path: &str, text: &str| ArchiveFile { path: path.into(), text: text.into() };
    let traversal = archive::write_zip(&[file("../../x", "y")]).expect("zip");
    let seeds: Vec<(&'static str, &str, Vec<u8>)> = vec![
        ("wire_ywebsocket", "hostile-truncated-update", truncated),
        ("wire_ywebsocket", "hostile-overlong-varint", overlong_varint.clone()),
        ("wire_ywebsocket", "hostile-denied-without-reason", vec![wire::MSG_AUTH as u8, 0]),
        ("wire_hocus", "hostile-truncated-update", hocus_frame[..hocus_frame.len() - 1].to_vec()),
        ("wire_hocus", "hostile-key-not-utf8", vec![2, 0xff, 0xfe, 0]),
        ("wire_hocus", "hostile-overlong-varint", overlong_varint),
        ("update_apply", "hostile-garbage-update", [record(EDITOR_UPDATE, &garbage_update)].concat()),
        (
            "update_apply",
            "hostile-viewer-garbage-and-editor-edit",
            [record(VIEWER_UPDATE, &garbage_update), record(EDITOR_UPDATE | SAME_BATCH, &updates[0])].concat(),
        ),
        ("tree_reader", "hostile-garbage-update", garbage_update),
        ("archive_import", "hostile-corrupt-gzip", vec![0x1f, 0x8b, 0, 0]),
        ("archive_import", "hostile-zip-traversal", traversal),
    ];
    seeds.into_iter().map(|(target, name, bytes)| (target, name.to_owned(), bytes)).collect()
}
