//! The project document tree, schema v1: the one module that reads and edits it.
//!
//! A project's root document `{project}` holds:
//! - `meta`: map `{ schema: 1 }`;
//! - `files`: map from file id (16 lowercase hex chars, random) to a map `{ path, kind }`, where
//!   `kind` is `"file"` or `"dir"` (dir entries exist only for empty folders);
//! - `chat`: array of plain objects `{ id, author, text, at }` (`at` in unix milliseconds);
//! - `settings`: map `{ run?, language? }`.
//!
//! Each file's text is the Y.Text `content` of document `{project}/{fileId}`. Entries are keyed by
//! id, so a rename only rewrites `path`. Two peers creating the same path at once make two entries;
//! readers resolve the clash the same way everywhere: the entry with the smallest id keeps the path,
//! each other one is shown as `<stem> (<first 6 chars of id>)<ext>` in the same folder.
//!
//! The web page reads the same tree (`web/src/tree.ts`): its types come from
//! `web/src/generated/tree-schema.ts`, rendered from the types and constants here by a test, and
//! both sides check the path and clash rules against `tests/fixtures/clash-rule.json`.

use std::collections::HashMap;

use yrs::types::ToJson;
use yrs::{Any, Array, ArrayRef, Map, MapPrelim, MapRef, Out, ReadTxn, TransactionMut, WriteTxn};

pub const SCHEMA_VERSION: i64 = 1;
pub const META: &str = "meta";
pub const FILES: &str = "files";
pub const CHAT: &str = "chat";
pub const SETTINGS: &str = "settings";
/// Name of the Y.Text holding a file's content in its own document.
pub const CONTENT: &str = "content";
/// Longest accepted path, in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// Most entries a project's tree holds: the server refuses updates that would add more, and
/// readers take the first this many by id.
pub const MAX_ENTRIES: usize = 10_000;
/// Deepest path readers take, in folders (`a/b/c` is 3).
pub const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("invalid path {0:?}: use relative '/'-separated names without '.', '..' or empty parts")]
    BadPath(String),
    #[error("a file already exists at {0:?}")]
    Exists(String),
    #[error("no file with id {0:?}")]
    NotFound(String),
}

/// An entry's `kind` as stored: `"file"` or `"dir"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(test, derive(ts_rs::TS), ts(rename_all = "lowercase"))]
pub enum EntryKind {
    File,
    Dir,
}

impl EntryKind {
    fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
        }
    }
}

/// One entry of the file tree, with its clash-resolved path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    /// The path to show and to materialize (clash-resolved).
    pub path: String,
    /// The path as stored in the entry.
    pub stored_path: String,
    pub kind: EntryKind,
}

/// A fresh random file id.
pub fn new_file_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The document holding a file's text.
pub fn file_doc_name(project: &str, file_id: &str) -> String {
    format!("{project}/{file_id}")
}

pub fn validate_path(path: &str) -> Result<(), TreeError> {
    let bad = path.is_empty()
        || path.len() > MAX_PATH_LEN
        || path.split('/').any(|seg| {
            seg.is_empty() || seg == "." || seg == ".." || seg.chars().any(char::is_control) || seg.contains('\\')
        });
    if bad { Err(TreeError::BadPath(path.to_owned())) } else { Ok(()) }
}

/// Writes the schema marker; idempotent.
pub fn init(txn: &mut TransactionMut) {
    let meta = txn.get_or_insert_map(META);
    meta.insert(txn, "schema", SCHEMA_VERSION);
    txn.get_or_insert_map(FILES);
    txn.get_or_insert_map(SETTINGS);
    txn.get_or_insert_array(CHAT);
}

/// The schema version a root document declares, if any.
pub fn schema_version<T: ReadTxn>(txn: &T) -> Option<i64> {
    let meta = txn.get_map(META)?;
    match meta.get(txn, "schema")? {
        Out::Any(Any::Number(n)) => n.as_i64(),
        _ => None,
    }
}

fn entry_field<T: ReadTxn>(txn: &T, entry: &MapRef, key: &str) -> Option<String> {
    match entry.get(txn, key)? {
        Out::Any(Any::String(s)) => Some(s.to_string()),
        _ => None,
    }
}

/// Every entry, clash-resolved and sorted by path. Malformed entries (wrong types, invalid
/// paths written by a buggy peer, paths deeper than [`MAX_DEPTH`]) are skipped, never fatal, and
/// at most [`MAX_ENTRIES`] are read.
pub fn entries<T: ReadTxn>(txn: &T) -> Vec<Entry> {
    let Some(files) = txn.get_map(FILES) else {
        return Vec::new();
    };
    let mut raw: Vec<(String, String, EntryKind)> = files
        .iter(txn)
        .filter_map(|(id, value)| {
            let Out::YMap(entry) = value else { return None };
            let path = entry_field(txn, &entry, "path")?;
            validate_path(&path).ok()?;
            if path.split('/').count() > MAX_DEPTH {
                return None;
            }
            let kind = match entry_field(txn, &entry, "kind").as_deref() {
                Some("dir") => EntryKind::Dir,
                _ => EntryKind::File,
            };
            Some((id.to_owned(), path, kind))
        })
        .collect();
    raw.sort_by(|a, b| a.0.cmp(&b.0));
    // A tree written past the bound (by an older server, or a store edited by hand) is read up to
    // it, the same entries by every reader.
    raw.truncate(MAX_ENTRIES);
    let mut taken: HashMap<String, ()> = HashMap::new();
    let mut out: Vec<Entry> = raw
        .into_iter()
        .map(|(id, stored_path, kind)| {
            let path =
                if taken.contains_key(&stored_path) { disambiguate(&stored_path, &id) } else { stored_path.clone() };
            taken.insert(stored_path.clone(), ());
            Entry { id, path, stored_path, kind }
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// `dir/name.ext` shown for a clashing entry with id `id`: `dir/name (abcdef).ext`.
pub fn disambiguate(path: &str, id: &str) -> String {
    // Six characters, not six bytes: ids are untrusted keys, and a byte cut inside a character
    // would panic.
    let tag = id.char_indices().nth(6).map_or(id, |(end, _)| &id[..end]);
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, path),
    };
    let renamed = match name.rfind('.') {
        Some(dot) if dot > 0 => format!("{} ({tag}){}", &name[..dot], &name[dot..]),
        _ => format!("{name} ({tag})"),
    };
    match dir {
        Some(d) => format!("{d}/{renamed}"),
        None => renamed,
    }
}

/// Looks an entry up by its resolved path.
pub fn find_by_path<T: ReadTxn>(txn: &T, path: &str) -> Option<Entry> {
    entries(txn).into_iter().find(|e| e.path == path)
}

/// Creates an entry and returns its id. Fails if the path is already shown in the tree.
pub fn create(txn: &mut TransactionMut, path: &str, kind: EntryKind) -> Result<String, TreeError> {
    validate_path(path)?;
    if find_by_path(txn, path).is_some() {
        return Err(TreeError::Exists(path.to_owned()));
    }
    let id = new_file_id();
    let files = txn.get_or_insert_map(FILES);
    files.insert(
        txn,
        id.clone(),
        MapPrelim::from([("path".to_owned(), Any::from(path)), ("kind".to_owned(), Any::from(kind.as_str()))]),
    );
    Ok(id)
}

/// Puts an entry back under a known id (restoring a checkpoint), replacing any entry with that id.
pub fn put_entry(txn: &mut TransactionMut, id: &str, path: &str, kind: EntryKind) -> Result<(), TreeError> {
    validate_path(path)?;
    let files = txn.get_or_insert_map(FILES);
    files.insert(
        txn,
        id.to_owned(),
        MapPrelim::from([("path".to_owned(), Any::from(path)), ("kind".to_owned(), Any::from(kind.as_str()))]),
    );
    Ok(())
}

fn entry_map<T: ReadTxn>(txn: &T, id: &str) -> Result<MapRef, TreeError> {
    let files = txn.get_map(FILES).ok_or_else(|| TreeError::NotFound(id.to_owned()))?;
    match files.get(txn, id) {
        Some(Out::YMap(m)) => Ok(m),
        _ => Err(TreeError::NotFound(id.to_owned())),
    }
}

/// Renames an entry: only its `path` changes, never its content document.
pub fn rename(txn: &mut TransactionMut, id: &str, new_path: &str) -> Result<(), TreeError> {
    validate_path(new_path)?;
    let entry = entry_map(txn, id)?;
    if find_by_path(txn, new_path).is_some_and(|e| e.id != id) {
        return Err(TreeError::Exists(new_path.to_owned()));
    }
    entry.insert(txn, "path", new_path);
    Ok(())
}

/// Removes an entry. Its content document is left to the store's garbage collection.
pub fn delete(txn: &mut TransactionMut, id: &str) -> Result<(), TreeError> {
    entry_map(txn, id)?;
    let files = txn.get_or_insert_map(FILES);
    files.remove(txn, id);
    Ok(())
}

/// The root document's `settings` map; both keys may be absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(ts_rs::TS), ts(optional_fields))]
pub struct Settings {
    pub run: Option<String>,
    pub language: Option<String>,
}

pub fn settings<T: ReadTxn>(txn: &T) -> Settings {
    let Some(map) = txn.get_map(SETTINGS) else {
        return Settings::default();
    };
    Settings { run: entry_field(txn, &map, "run"), language: entry_field(txn, &map, "language") }
}

pub fn set_setting(txn: &mut TransactionMut, key: &str, value: &str) {
    let map = txn.get_or_insert_map(SETTINGS);
    map.insert(txn, key, value);
}

/// One message of the root document's `chat` array (a plain object; `at` in unix milliseconds).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub struct ChatMessage {
    pub id: String,
    pub author: String,
    pub text: String,
    pub at: i64,
}

pub fn post_chat(txn: &mut TransactionMut, author: &str, text: &str, at_ms: i64) -> String {
    let id = new_file_id();
    let chat: ArrayRef = txn.get_or_insert_array(CHAT);
    let msg = Any::from(HashMap::from([
        ("id".to_owned(), Any::from(id.as_str())),
        ("author".to_owned(), Any::from(author)),
        ("text".to_owned(), Any::from(text)),
        ("at".to_owned(), Any::from(at_ms as f64)),
    ]));
    chat.push_back(txn, msg);
    id
}

pub fn chat<T: ReadTxn>(txn: &T) -> Vec<ChatMessage> {
    let Some(chat) = txn.get_array(CHAT) else {
        return Vec::new();
    };
    chat.iter(txn)
        .filter_map(|v| {
            let Any::Map(m) = v.to_json(txn) else { return None };
            let s = |k: &str| match m.get(k) {
                Some(Any::String(s)) => Some(s.to_string()),
                _ => None,
            };
            let at = match m.get("at") {
                Some(Any::Number(n)) => n.as_i64().unwrap_or_default(),
                _ => 0,
            };
            Some(ChatMessage { id: s("id")?, author: s("author")?, text: s("text")?, at })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::updates::decoder::Decode;
    use yrs::{Doc, StateVector, Transact, Update};

    fn sync(a: &Doc, b: &Doc) {
        let ua = a.transact().encode_state_as_update_v1(&StateVector::default());
        let ub = b.transact().encode_state_as_update_v1(&StateVector::default());
        a.transact_mut().apply_update(Update::decode_v1(&ub).unwrap()).unwrap();
        b.transact_mut().apply_update(Update::decode_v1(&ua).unwrap()).unwrap();
    }

    #[test]
    fn create_rename_delete() {
        let doc = Doc::new();
        let mut txn = doc.transact_mut();
        init(&mut txn);
        let id = create(&mut txn, "src/main.py", EntryKind::File).unwrap();
        assert_eq!(create(&mut txn, "src/main.py", EntryKind::File), Err(TreeError::Exists("src/main.py".into())));
        assert!(matches!(create(&mut txn, "../etc/passwd", EntryKind::File), Err(TreeError::BadPath(_))));
        assert!(matches!(create(&mut txn, "/abs", EntryKind::File), Err(TreeError::BadPath(_))));
        rename(&mut txn, &id, "src/app.py").unwrap();
        let all = entries(&txn);
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].id.as_str(), all[0].path.as_str()), (id.as_str(), "src/app.py"));
        assert_eq!(schema_version(&txn), Some(SCHEMA_VERSION));
        delete(&mut txn, &id).unwrap();
        assert!(entries(&txn).is_empty());
        assert_eq!(delete(&mut txn, &id), Err(TreeError::NotFound(id)));
    }

    #[test]
    fn concurrent_creation_of_one_path_keeps_both_and_resolves_alike() {
        let (a, b) = (Doc::new(), Doc::new());
        let ida = create(&mut a.transact_mut(), "notes.md", EntryKind::File).unwrap();
        let idb = create(&mut b.transact_mut(), "notes.md", EntryKind::File).unwrap();
        sync(&a, &b);
        let ea = entries(&a.transact());
        let eb = entries(&b.transact());
        assert_eq!(ea, eb);
        assert_eq!(ea.len(), 2);
        let (first, second) = if ida < idb { (&ida, &idb) } else { (&idb, &ida) };
        let kept = ea.iter().find(|e| &e.id == first).unwrap();
        let renamed = ea.iter().find(|e| &e.id == second).unwrap();
        assert_eq!(kept.path, "notes.md");
        assert_eq!(renamed.path, format!("notes ({}).md", &second[..6]));
    }

    /// The cases the web page's reader is checked against too (`web/test/tree.test.mjs`).
    const FIXTURE: &str = include_str!("../tests/fixtures/clash-rule.json");

    fn json_any(value: &serde_json::Value) -> Any {
        match value {
            serde_json::Value::String(s) => Any::from(s.as_str()),
            serde_json::Value::Number(n) => Any::from(n.as_f64().expect("a number")),
            serde_json::Value::Bool(b) => Any::Bool(*b),
            other => panic!("no fixture value like {other}"),
        }
    }

    #[test]
    fn clash_rule_fixture() {
        let fixture: serde_json::Value = serde_json::from_str(FIXTURE).expect("clash-rule.json parses");
        let strs = |key: &str| -> Vec<String> {
            fixture[key].as_array().expect(key).iter().map(|v| v.as_str().expect(key).to_owned()).collect()
        };
        for case in fixture["display_names"].as_array().expect("display_names") {
            let field = |k: &str| case[k].as_str().expect(k);
            assert_eq!(disambiguate(field("path"), field("id")), field("shown"), "{case}");
        }
        for path in strs("valid_paths") {
            assert_eq!(validate_path(&path), Ok(()), "{path:?}");
        }
        for path in strs("invalid_paths") {
            assert!(validate_path(&path).is_err(), "{path:?} accepted");
        }
        for case in fixture["trees"].as_array().expect("trees") {
            let doc = Doc::new();
            {
                let mut txn = doc.transact_mut();
                let files = txn.get_or_insert_map(FILES);
                for (id, value) in case["files"].as_object().expect("files") {
                    match value.as_object() {
                        Some(fields) => {
                            let fields: MapPrelim = fields.iter().map(|(k, v)| (k.as_str(), json_any(v))).collect();
                            files.insert(&mut txn, id.as_str(), fields);
                        }
                        None => {
                            files.insert(&mut txn, id.as_str(), json_any(value));
                        }
                    }
                }
            }
            let shown: Vec<[String; 3]> =
                entries(&doc.transact()).into_iter().map(|e| [e.id, e.path, e.kind.as_str().to_owned()]).collect();
            let expected: Vec<[String; 3]> = serde_json::from_value(case["shown"].clone()).expect("shown");
            assert_eq!(shown, expected, "{}", case["what"]);
        }
    }

    /// The TypeScript the web page uses for the tree's stored shapes (`web/src/tree.ts` reads
    /// it) is rendered from these types and constants; a difference means it is stale.
    #[test]
    fn generated_typescript_is_current() {
        use ts_rs::TS;
        let cfg = ts_rs::Config::new().with_large_int("number");
        let mut text = String::from(
            "// The project tree's stored shapes (schema v1), generated from sync-core/src/tree.rs; do not edit.\n\
             // Regenerate with:\n\
             // UPDATE_GENERATED=1 cargo test -p sync-core -p exec-bridge --lib generated_typescript\n",
        );
        for (docs, decl) in [
            (EntryKind::docs(), EntryKind::decl(&cfg)),
            (Settings::docs(), Settings::decl(&cfg)),
            (ChatMessage::docs(), ChatMessage::decl(&cfg)),
        ] {
            text.push('\n');
            text.push_str(&docs.unwrap_or_default());
            text.push_str("export ");
            text.push_str(&decl);
            text.push('\n');
        }
        text.push_str(&format!(
            "\n/** The top-level shared types of a project's root document `{{project}}`. */\n\
             export type RootKey = \"{META}\" | \"{FILES}\" | \"{CHAT}\" | \"{SETTINGS}\";\n\
             \n/** `meta.schema` of a root document of this schema. */\n\
             export type SchemaVersion = {SCHEMA_VERSION};\n\
             \n/** The Y.Text holding a file's text in its document `{{project}}/{{fileId}}`. */\n\
             export type ContentKey = \"{CONTENT}\";\n\
             \n/** Longest accepted path, in UTF-8 bytes. */\n\
             export type MaxPathLen = {MAX_PATH_LEN};\n"
        ));
        check_generated("web/src/generated/tree-schema.ts", &text);
    }

    /// Compares `rendered` with the committed file at `relative` (from the workspace root), or
    /// writes it there when `UPDATE_GENERATED` is set.
    fn check_generated(relative: &str, rendered: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
        if std::env::var_os("UPDATE_GENERATED").is_some() {
            std::fs::write(&path, rendered).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == rendered,
            "{relative} is stale; regenerate it with\n  \
             UPDATE_GENERATED=1 cargo test -p sync-core -p exec-bridge --lib generated_typescript\n\
             --- expected ---\n{rendered}"
        );
    }

    #[test]
    fn readers_skip_paths_deeper_than_the_bound() {
        let doc = Doc::new();
        let mut txn = doc.transact_mut();
        init(&mut txn);
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        let ok = vec!["d"; MAX_DEPTH].join("/");
        for path in [&deep, &ok] {
            let files = txn.get_or_insert_map(FILES);
            let entry = MapPrelim::from([
                ("path".to_owned(), Any::from(path.as_str())),
                ("kind".to_owned(), Any::from("file")),
            ]);
            files.insert(&mut txn, new_file_id(), entry);
        }
        let read: Vec<String> = entries(&txn).into_iter().map(|e| e.path).collect();
        assert_eq!(read, vec![ok]);
    }

    #[test]
    fn settings_and_chat() {
        let doc = Doc::new();
        let mut txn = doc.transact_mut();
        set_setting(&mut txn, "run", "python3 main.py");
        post_chat(&mut txn, "ada", "hi", 1_700_000_000_000);
        assert_eq!(settings(&txn).run.as_deref(), Some("python3 main.py"));
        let msgs = chat(&txn);
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].author.as_str(), msgs[0].text.as_str(), msgs[0].at), ("ada", "hi", 1_700_000_000_000));
    }
}
