//! Check for the project tree readers: a hostile root document never makes `sync_core::tree` panic.

use std::sync::OnceLock;

use sync_core::tree::{self, EntryKind};
use sync_core::untrusted;
use yrs::updates::decoder::Decode;
use yrs::{Any, Array, ArrayRef, Doc, Options, ReadTxn, StateVector, Transact, Update, WriteTxn};

/// Client id of the seeded tree, so corpus updates can build on its items.
pub const SEED_CLIENT: u64 = 1;
/// Client id the check writes with after applying the input.
const CHECK_CLIENT: u64 = 2;

/// Ids of the seeded entries; the first two share a path, so the clash rule is exercised.
pub const SEED_IDS: [&str; 4] = ["0123456789abcdef", "fedcba9876543210", "00000000000000aa", "a1b2c3d4e5f60718"];

/// A realistic project root: schema marker, two files that clash, a nested file, an empty
/// folder, settings and two chat messages. Deterministic, so fuzz runs are reproducible.
pub fn seed_doc() -> Doc {
    let doc = Doc::with_client_id(SEED_CLIENT);
    {
        let mut txn = doc.transact_mut();
        tree::init(&mut txn);
        let entries = [
            (SEED_IDS[0], "src/main.py", EntryKind::File),
            (SEED_IDS[1], "src/main.py", EntryKind::File),
            (SEED_IDS[2], "README.md", EntryKind::File),
            (SEED_IDS[3], "assets", EntryKind::Dir),
        ];
        for (id, path, kind) in entries {
            tree::put_entry(&mut txn, id, path, kind).expect("valid seed path");
        }
        tree::set_setting(&mut txn, "run", "python3 src/main.py");
        tree::set_setting(&mut txn, "language", "python");
        let chat: ArrayRef = txn.get_or_insert_array(tree::CHAT);
        for (id, author, text, at) in [("c0", "ada", "hello", 1_700_000_000_000.0), ("c1", "bob", "hi ✓", 1.5)] {
            let msg = Any::from(std::collections::HashMap::from([
                ("id".to_owned(), Any::from(id)),
                ("author".to_owned(), Any::from(author)),
                ("text".to_owned(), Any::from(text)),
                ("at".to_owned(), Any::from(at)),
            ]));
            chat.push_back(&mut txn, msg);
        }
    }
    doc
}

fn seed_update() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| seed_doc().transact().encode_state_as_update_v1(&StateVector::default()))
}

fn read_everything<T: ReadTxn>(txn: &T) -> Vec<tree::Entry> {
    let entries = tree::entries(txn);
    assert!(entries.windows(2).all(|w| w[0].path <= w[1].path), "entries are not sorted by path");
    for entry in &entries {
        assert!(tree::validate_path(&entry.stored_path).is_ok(), "an invalid stored path was listed: {entry:?}");
        let found = tree::find_by_path(txn, &entry.path).expect("a listed path is found");
        assert_eq!(found.path, entry.path);
    }
    tree::find_by_path(txn, "src/main.py");
    tree::settings(txn);
    tree::chat(txn);
    tree::schema_version(txn);
    entries
}

/// Applies `data` as a yrs v1 update (when it decodes) to the seeded project root, then runs every
/// reader of `sync_core::tree` and a few edits.
///
/// Properties: no reader or edit panics on a hostile document; entries come sorted by their shown
/// path, each with a valid stored path, and `find_by_path` finds every path `entries` shows.
pub fn tree_reader(data: &[u8]) {
    let doc = Doc::with_options(Options::with_client_id(yrs::block::ClientID::new(CHECK_CLIENT)));
    {
        let mut txn = doc.transact_mut();
        txn.apply_update(Update::decode_v1(seed_update()).expect("seed decodes")).expect("seed applies");
        // Updates reach a root document only through the wire decoder, which checks them first,
        // and the room, which lets in only updates that fit whole (`room::admit`); this harness
        // keeps the part of that gate that matters for reading: nothing past the document's state.
        let update = untrusted::decode_update_v1(data).ok();
        if let Some(update) = update.filter(|u| !untrusted::has_gap(u, &txn.state_vector())) {
            // An update that does not apply is refused; the readers still see whatever it left.
            let _ = txn.apply_update(update);
        }
    }
    let entries = read_everything(&doc.transact());

    let mut txn = doc.transact_mut();
    if let Some(first) = entries.first() {
        let _ = tree::rename(&mut txn, &first.id, "renamed/by-check.txt");
    }
    if let Some(last) = entries.last() {
        let _ = tree::delete(&mut txn, &last.id);
    }
    let _ = tree::put_entry(&mut txn, "ffffffffffffff00", "src/main.py", EntryKind::File);
    tree::set_setting(&mut txn, "run", "make");
    read_everything(&txn);
}
