//! The workspace mirror on a real folder with real yrs documents: both directions, concurrent
//! edits, non-ASCII text, ignore rules and limits, symlinks and hostile paths.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use exec_bridge::mirror::{DocsToFiles, FileDocs, FilesToDocs, Mirror, MirrorError};
use exec_bridge::paths::SafePath;
use exec_bridge::workspace::{FileState, Workspace, WorkspaceConfig, WorkspaceError};
use sync_core::tree::{self, EntryKind};
use yrs::updates::decoder::Decode;
use yrs::{Any, Doc, GetString, Map, MapPrelim, OffsetKind, Options, ReadTxn, StateVector, Text, Transact, Update};

/// A project (root document and file documents), a workspace folder inside a scratch folder,
/// and the mirror between them.
struct Fixture {
    scratch: tempfile::TempDir,
    root: Doc,
    docs: HashMap<String, Doc>,
    ws: Workspace,
    mirror: Mirror,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with_config(&WorkspaceConfig::default())
    }

    fn with_config(config: &WorkspaceConfig) -> Fixture {
        let scratch = tempfile::tempdir().unwrap();
        fs::create_dir(scratch.path().join("ws")).unwrap();
        let ws = Workspace::open(&scratch.path().join("ws"), config).unwrap();
        let root = Doc::new();
        tree::init(&mut root.transact_mut());
        Fixture { scratch, root, docs: HashMap::new(), ws, mirror: Mirror::new() }
    }

    fn dir(&self) -> PathBuf {
        self.scratch.path().join("ws")
    }

    fn add_file(&mut self, path: &str, text: &str) -> String {
        let id = tree::create(&mut self.root.transact_mut(), path, EntryKind::File).unwrap();
        let doc = self.docs.create(&id);
        doc.get_or_insert_text(tree::CONTENT).insert(&mut doc.transact_mut(), 0, text);
        id
    }

    /// An entry written as a hostile peer could, without `tree::create`'s checks.
    fn add_raw_entry(&mut self, id: &str, path: &str) {
        let files = self.root.get_or_insert_map(tree::FILES);
        let entry = MapPrelim::from([("path".to_owned(), Any::from(path)), ("kind".to_owned(), Any::from("file"))]);
        files.insert(&mut self.root.transact_mut(), id, entry);
        let doc = self.docs.create(id);
        doc.get_or_insert_text(tree::CONTENT).insert(&mut doc.transact_mut(), 0, "pwned\n");
    }

    fn text(&self, id: &str) -> String {
        let doc = &self.docs[id];
        doc.get_or_insert_text(tree::CONTENT).get_string(&doc.transact())
    }

    fn disk(&self, path: &str) -> String {
        fs::read_to_string(self.dir().join(path)).unwrap()
    }

    fn push_docs_to_files(&mut self) -> DocsToFiles {
        self.mirror.docs_to_files(&self.ws, &self.root, &self.docs)
    }

    fn pull_files_into_docs(&mut self) -> FilesToDocs {
        let scan = self.ws.scan().unwrap();
        self.mirror.files_to_docs(&scan, &self.root, &mut self.docs)
    }

    fn paths(&self) -> Vec<String> {
        tree::entries(&self.root.transact()).into_iter().map(|e| e.path).collect()
    }
}

fn sync(a: &Doc, b: &Doc) {
    let from_a = a.transact().encode_state_as_update_v1(&b.transact().state_vector());
    let from_b = b.transact().encode_state_as_update_v1(&a.transact().state_vector());
    a.transact_mut().apply_update(Update::decode_v1(&from_b).unwrap()).unwrap();
    b.transact_mut().apply_update(Update::decode_v1(&from_a).unwrap()).unwrap();
}

fn replica_of(doc: &Doc) -> Doc {
    let replica = Doc::with_options(Options { offset_kind: doc.offset_kind(), ..Options::default() });
    let state = doc.transact().encode_state_as_update_v1(&StateVector::default());
    replica.transact_mut().apply_update(Update::decode_v1(&state).unwrap()).unwrap();
    replica
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn doc_edits_renames_and_deletions_reach_the_files() {
    let mut fx = Fixture::new();
    let main = fx.add_file("src/main.py", "print('hi')\n");
    let other = fx.add_file("README.md", "# demo\n");
    let report = fx.push_docs_to_files();
    assert_eq!(report.written.len(), 2);
    assert_eq!(fx.disk("src/main.py"), "print('hi')\n");
    assert_eq!(fx.disk("README.md"), "# demo\n");

    // Only the changed file is written again.
    let doc = fx.docs[&main].clone();
    doc.get_or_insert_text(tree::CONTENT).insert(&mut doc.transact_mut(), 0, "import os\n");
    let report = fx.push_docs_to_files();
    assert_eq!(report.written, vec![SafePath::new("src/main.py").unwrap()]);
    assert_eq!(fx.disk("src/main.py"), "import os\nprint('hi')\n");
    assert!(fx.push_docs_to_files().written.is_empty());

    // What the mirror wrote does not come back as an edit.
    let echo = fx.pull_files_into_docs();
    assert!(echo.edited.is_empty() && echo.created.is_empty() && echo.deleted.is_empty(), "{echo:?}");

    tree::rename(&mut fx.root.transact_mut(), &main, "app/main.py").unwrap();
    let report = fx.push_docs_to_files();
    assert_eq!(report.written, vec![SafePath::new("app/main.py").unwrap()]);
    assert_eq!(report.removed, vec![SafePath::new("src/main.py").unwrap()]);
    assert_eq!(fx.disk("app/main.py"), "import os\nprint('hi')\n");
    assert!(!fx.dir().join("src/main.py").exists());

    tree::delete(&mut fx.root.transact_mut(), &other).unwrap();
    let report = fx.push_docs_to_files();
    assert_eq!(report.removed, vec![SafePath::new("README.md").unwrap()]);
    assert!(!fx.dir().join("README.md").exists());
    assert!(fx.pull_files_into_docs().deleted.is_empty());
    assert_eq!(fx.paths(), vec!["app/main.py"]);
}

#[test]
fn program_writes_merge_with_concurrent_typing_in_the_same_file() {
    let mut fx = Fixture::new();
    let id = fx.add_file("main.py", "def main():\n    print('hi')\n\nmain()\n");
    fx.push_docs_to_files();
    let human = replica_of(&fx.docs[&id]);
    let human_text = human.get_or_insert_text(tree::CONTENT);

    // The person types at the top while a program rewrites one line, before either saw the other.
    human_text.insert(&mut human.transact_mut(), 0, "# typed by a person\n");
    fs::write(fx.dir().join("main.py"), "def main():\n    print('hello, world')\n\nmain()\n").unwrap();
    let report = fx.pull_files_into_docs();
    assert_eq!(report.edited, vec![id.clone()]);
    assert_eq!(fx.text(&id), "def main():\n    print('hello, world')\n\nmain()\n");
    sync(&fx.docs[&id], &human);
    let merged = "# typed by a person\ndef main():\n    print('hello, world')\n\nmain()\n";
    assert_eq!(fx.text(&id), merged);
    assert_eq!(human_text.get_string(&human.transact()), merged);

    // The merged text goes to disk; the program's change is already there, so it is written once.
    assert_eq!(fx.push_docs_to_files().written.len(), 1);
    assert_eq!(fx.disk("main.py"), merged);

    // This time the person's edit reaches the mirror's replica before the file change is seen:
    // a three-way merge keeps it.
    let len = human_text.len(&human.transact());
    human_text.insert(&mut human.transact_mut(), len, "# footer\n");
    sync(&fx.docs[&id], &human);
    fs::write(fx.dir().join("main.py"), merged.replace("main()\n", "run()\n")).unwrap();
    // The document changed too, but the disk has news: it is not overwritten.
    assert_eq!(fx.push_docs_to_files().deferred, vec![SafePath::new("main.py").unwrap()]);
    fx.pull_files_into_docs();
    let expected = "# typed by a person\ndef main():\n    print('hello, world')\n\nrun()\n# footer\n";
    assert_eq!(fx.text(&id), expected);
    fx.push_docs_to_files();
    assert_eq!(fx.disk("main.py"), expected);
    sync(&fx.docs[&id], &human);
    assert_eq!(human_text.get_string(&human.transact()), expected);
}

#[test]
fn new_and_deleted_files_on_disk_change_the_tree() {
    let mut fx = Fixture::new();
    let old = fx.add_file("old.txt", "bye\n");
    fx.push_docs_to_files();
    fs::create_dir_all(fx.dir().join("out/deep")).unwrap();
    fs::write(fx.dir().join("out/deep/result.csv"), "a,b\n1,2\n").unwrap();
    fs::remove_file(fx.dir().join("old.txt")).unwrap();
    let report = fx.pull_files_into_docs();
    assert_eq!(report.deleted, vec![old]);
    assert_eq!(report.created.len(), 1);
    let (id, path) = &report.created[0];
    assert_eq!(path.as_str(), "out/deep/result.csv");
    assert_eq!(fx.text(id), "a,b\n1,2\n");
    assert_eq!(fx.paths(), vec!["out/deep/result.csv"]);
    // Nothing to write back: the file is where it came from.
    let report = fx.push_docs_to_files();
    assert!(report.written.is_empty() && report.removed.is_empty(), "{report:?}");
}

#[test]
fn non_ascii_text_round_trips_with_either_offset_kind() {
    for kind in [OffsetKind::Bytes, OffsetKind::Utf16] {
        let mut fx = Fixture::new();
        let id = tree::create(&mut fx.root.transact_mut(), "i18n.txt", EntryKind::File).unwrap();
        let doc = Doc::with_options(Options { offset_kind: kind, ..Options::default() });
        doc.get_or_insert_text(tree::CONTENT).insert(&mut doc.transact_mut(), 0, "héllo wörld 🎉\n日本語のテキスト\n");
        fx.docs.insert(id.clone(), doc.clone());
        fx.push_docs_to_files();
        assert_eq!(fx.disk("i18n.txt"), "héllo wörld 🎉\n日本語のテキスト\n");

        let human = replica_of(&doc);
        let human_text = human.get_or_insert_text(tree::CONTENT);
        // "ñ🎈" after "héllo" in the person's replica (offsets in the document's own units).
        let after_hello = match kind {
            OffsetKind::Bytes => "héllo".len(),
            OffsetKind::Utf16 => "héllo".encode_utf16().count(),
        } as u32;
        human_text.insert(&mut human.transact_mut(), after_hello, "ñ🎈");
        fs::write(fx.dir().join("i18n.txt"), "héllo wörld 🎊!\n日本人のテキスト\n").unwrap();
        fx.pull_files_into_docs();
        assert_eq!(fx.text(&id), "héllo wörld 🎊!\n日本人のテキスト\n", "{kind:?}");
        sync(&doc, &human);
        let merged = "hélloñ🎈 wörld 🎊!\n日本人のテキスト\n";
        assert_eq!(fx.text(&id), merged, "{kind:?}");
        fx.push_docs_to_files();
        assert_eq!(fx.disk("i18n.txt"), merged, "{kind:?}");
    }
}

#[test]
fn ignored_large_and_binary_files_are_not_mirrored() {
    let config = WorkspaceConfig { ignore: vec!["node_modules".into(), "*.log".into()], max_file_bytes: 1024 };
    let mut fx = Fixture::with_config(&config);
    let tracked = fx.add_file("data.txt", "small\n");
    let ignored_in_docs = fx.add_file("node_modules/pkg/index.js", "doc side\n");
    fx.push_docs_to_files();
    assert!(!fx.dir().join("node_modules").exists(), "an ignored entry is not written");
    let dir = fx.dir();
    fs::create_dir_all(dir.join("node_modules/left-pad")).unwrap();
    fs::write(dir.join("node_modules/left-pad/index.js"), "module.exports = 1\n").unwrap();
    fs::write(dir.join("run.log"), "log line\n").unwrap();
    fs::write(dir.join("big.txt"), "x".repeat(2048)).unwrap();
    fs::write(dir.join("nul.bin"), b"text\0more").unwrap();
    fs::write(dir.join("latin1.txt"), b"caf\xe9\n").unwrap();
    fs::write(dir.join("ok.txt"), "fine\n").unwrap();
    // A tracked file that becomes binary is neither edited nor deleted.
    fs::write(dir.join("data.txt"), b"\0\0\0").unwrap();
    let report = fx.pull_files_into_docs();
    assert!(report.edited.is_empty() && report.deleted.is_empty(), "{report:?}");
    let mut paths = fx.paths();
    paths.sort();
    assert_eq!(paths, vec!["data.txt", "node_modules/pkg/index.js", "ok.txt"]);
    assert_eq!(fx.text(&tracked), "small\n");
    assert_eq!(fx.text(&ignored_in_docs), "doc side\n");

    let scan = fx.ws.scan().unwrap();
    let state = |p: &str| scan.get(&SafePath::new(p).unwrap()).cloned();
    assert_eq!(state("big.txt"), Some(FileState::TooLarge(2048)));
    assert_eq!(state("nul.bin"), Some(FileState::Binary));
    assert_eq!(state("latin1.txt"), Some(FileState::Binary));
    assert_eq!(state("run.log"), None);
    assert_eq!(state("node_modules/left-pad/index.js"), None);

    // The defaults ignore the usual build and tool folders.
    let mut fx = Fixture::new();
    for folder in ["node_modules", "__pycache__", ".git", "target", "build", "dist", ".venv"] {
        fs::create_dir_all(fx.dir().join(folder).join("sub")).unwrap();
        fs::write(fx.dir().join(folder).join("sub/file.txt"), "generated\n").unwrap();
    }
    fs::write(fx.dir().join("kept.txt"), "kept\n").unwrap();
    fx.pull_files_into_docs();
    assert_eq!(fx.paths(), vec!["kept.txt"]);
}

#[test]
fn symlinks_are_never_followed() {
    let mut fx = Fixture::new();
    let outside = fx.scratch.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret.txt"), "outside secret\n").unwrap();
    let dir = fx.dir();
    symlink("/etc/passwd", dir.join("passwd")).unwrap();
    symlink("/", dir.join("rootfs")).unwrap();
    symlink(&outside, dir.join("outdir")).unwrap();
    symlink(outside.join("secret.txt"), dir.join("secret.txt")).unwrap();
    fs::write(dir.join("real.txt"), "real\n").unwrap();
    symlink("real.txt", dir.join("alias.txt")).unwrap();

    let report = fx.pull_files_into_docs();
    assert_eq!(report.created.len(), 1, "{report:?}");
    assert_eq!(fx.paths(), vec!["real.txt"]);
    for doc in fx.docs.values() {
        let text = doc.get_or_insert_text(tree::CONTENT).get_string(&doc.transact());
        assert!(!text.contains("root:") && !text.contains("secret"), "{text:?}");
    }
    let scan = fx.ws.scan().unwrap();
    for link in ["passwd", "rootfs", "outdir", "secret.txt", "alias.txt"] {
        assert_eq!(scan.get(&SafePath::new(link).unwrap()), Some(&FileState::Symlink), "{link}");
    }
    assert!(scan.keys().all(|p| !p.as_str().starts_with("rootfs/") && !p.as_str().starts_with("outdir/")));

    // Documents whose paths lead through or onto a symlink are refused and write nothing.
    let marker = format!("exec-bridge-mirror-test-{:016x}", rand::random::<u64>());
    fx.add_file(&format!("rootfs/tmp/{marker}"), "escaped\n");
    fx.add_file("outdir/planted.txt", "escaped\n");
    fx.add_file("secret.txt", "overwritten\n");
    let report = fx.push_docs_to_files();
    assert!(report.written.is_empty(), "{report:?}");
    assert_eq!(report.refused.len(), 3, "{report:?}");
    assert!(report.refused.iter().all(|e| matches!(e, MirrorError::Workspace(WorkspaceError::Symlink(_)))));
    assert!(!Path::new("/tmp").join(&marker).exists());
    assert_eq!(names_in(&outside), vec!["secret.txt"]);
    assert_eq!(fs::read_to_string(outside.join("secret.txt")).unwrap(), "outside secret\n");
    assert!(fs::symlink_metadata(dir.join("secret.txt")).unwrap().is_symlink());

    // Reads through the workspace API do not follow them either.
    assert_eq!(fx.ws.read(&SafePath::new("passwd").unwrap()).unwrap(), Some(FileState::Symlink));
    assert_eq!(fx.ws.read(&SafePath::new("rootfs/etc/passwd").unwrap()).unwrap(), Some(FileState::Symlink));
    assert!(fx.ws.remove(&SafePath::new("outdir/secret.txt").unwrap()).is_err());
    assert!(outside.join("secret.txt").exists());
}

#[test]
fn hostile_paths_from_documents_write_nothing_outside_the_root() {
    let mut fx = Fixture::new();
    let long_component = "n".repeat(300);
    let hostile = [
        "../escape.txt".to_owned(),
        "../../escape.txt".to_owned(),
        "/tmp/exec-bridge-absolute.txt".to_owned(),
        "a/../../escape.txt".to_owned(),
        "nul\0byte.txt".to_owned(),
        "x".repeat(10_000),
        format!("dir/{long_component}"),
        "back\\..\\slash.txt".to_owned(),
    ];
    for (i, path) in hostile.iter().enumerate() {
        fx.add_raw_entry(&format!("{i:016x}"), path);
    }
    let report = fx.push_docs_to_files();
    assert!(report.written.is_empty(), "{report:?}");
    // The tree reader already skips most of them; what it lets through, the mirror refuses.
    assert!(
        report.refused.iter().any(|e| matches!(e, MirrorError::Path { path, .. } if path.ends_with(&long_component))),
        "{report:?}"
    );
    assert!(names_in(&fx.dir()).is_empty());
    assert_eq!(names_in(fx.scratch.path()), vec!["ws"]);
    assert!(!Path::new("/tmp/exec-bridge-absolute.txt").exists());

    // The workspace API refuses them too, before touching the disk.
    for path in &hostile {
        assert!(SafePath::new(path).is_err(), "{path:?}");
    }
    assert!(names_in(&fx.dir()).is_empty());
}
