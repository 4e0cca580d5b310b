//! The demo project created by `collab serve --demo`: a few files to edit together.

use doc_store::DocStore;
use sync_core::DocState;
use sync_core::tree::{self, EntryKind};
use yrs::{Text, Transact};

pub const PROJECT: &str = "demo";

const FILES: &[(&str, &str)] = &[
    ("README.md", "# Demo project\n\nOpen this page in two tabs and type in both.\n"),
    ("main.py", "def greet(name):\n    return f\"Hello, {name}!\"\n\n\nprint(greet(\"world\"))\n"),
    ("src/util.js", "export function add(a, b) {\n  return a + b;\n}\n"),
];

/// Creates the demo project unless its root document already has files.
pub async fn seed(store: &dyn DocStore) -> anyhow::Result<()> {
    let stored = store.load(PROJECT).await?;
    let parts = stored.snapshot.iter().chain(stored.updates.iter()).map(Vec::as_slice);
    let root = DocState::load(parts)?;
    if !tree::entries(&root.doc().transact()).is_empty() {
        return Ok(());
    }
    let mut contents = Vec::new();
    let root_update = {
        let mut txn = root.doc().transact_mut();
        tree::init(&mut txn);
        tree::set_setting(&mut txn, "run", "python3 main.py");
        tree::set_setting(&mut txn, "language", "python");
        for (path, text) in FILES {
            let id = tree::create(&mut txn, path, EntryKind::File)?;
            contents.push((tree::file_doc_name(PROJECT, &id), *text));
        }
        txn.encode_update_v1()
    };
    for (name, text) in contents {
        let file = yrs::Doc::new();
        let content = file.get_or_insert_text(tree::CONTENT);
        let mut txn = file.transact_mut();
        content.insert(&mut txn, 0, text);
        store.append(&name, &[txn.encode_update_v1()]).await?;
    }
    // The root goes last: a peer that sees a file in the tree finds its content saved.
    store.append(PROJECT, &[root_update]).await?;
    Ok(())
}
