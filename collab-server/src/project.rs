//! Whole-project operations done by the server itself, through the same room actors as every
//! peer: reading all files of a project, and writing files as live CRDT edits.
//!
//! A whole-project write (an import, a checkpoint restore) runs to its end on a task of its own
//! and is waited for at most [`SAVE_WAIT`]: while the store is down or stalled, the request is
//! answered 503 within that bound, and the write completes once the store answers again (file
//! contents first, the tree last, each applied once the one before is saved), so it is never
//! left half done by a caller that stopped waiting. Sending the same import again changes
//! nothing more: files get the smallest edit to their new text, which is then none.

use std::future::Future;
use std::time::Duration;

use sync_core::DocName;
use sync_core::tree::{self, EntryKind};
use tokio::sync::oneshot;
use tracing::warn;
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, ReadTxn, Text, Transact, Update};

use crate::archive::ArchiveFile;
use crate::sync::rooms::{RoomCmd, Rooms};

#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error("document unavailable, try again")]
    Unavailable,
    #[error("invalid document name")]
    BadName,
    #[error("{0}")]
    Tree(#[from] tree::TreeError),
}

/// The current state of a document, loading it if needed.
pub async fn snapshot(rooms: &Rooms, name: &DocName) -> Result<Doc, ProjectError> {
    let lease = rooms.lease(name);
    let (reply, rx) = oneshot::channel();
    lease.send(RoomCmd::Snapshot { reply }).await.map_err(|_| ProjectError::Unavailable)?;
    let bytes = rx.await.map_err(|_| ProjectError::Unavailable)?;
    // Decoding a big document is CPU work: off the runtime's workers.
    let decoded = rooms.tasks().blocking("snapshot decode", move || {
        let doc = Doc::new();
        let update = Update::decode_v1(&bytes).map_err(|_| ProjectError::Unavailable)?;
        doc.transact_mut().apply_update(update).map_err(|_| ProjectError::Unavailable)?;
        Ok(doc)
    });
    decoded.await.map_err(|_| ProjectError::Unavailable)?
}

/// Applies an update as the server's own edit; returns once it is committed to the store.
pub async fn apply(rooms: &Rooms, name: &DocName, update: Vec<u8>) -> Result<(), ProjectError> {
    let lease = rooms.lease(name);
    let (done, rx) = oneshot::channel();
    lease.send(RoomCmd::Apply { update, done }).await.map_err(|_| ProjectError::Unavailable)?;
    rx.await.map_err(|_| ProjectError::Unavailable)
}

/// How long an import or a restore waits for its edits to be saved before answering that the
/// store is unavailable (it carries on, and completes once the store is back).
pub const SAVE_WAIT: Duration = Duration::from_secs(10);

/// Runs a whole-project write to its end on a task of its own and waits for it at most
/// [`SAVE_WAIT`]; past that, answers `unavailable` while the write goes on.
pub async fn to_completion<T, E>(
    rooms: &Rooms,
    what: &'static str,
    job: impl Future<Output = Result<T, E>> + Send + 'static,
    unavailable: impl FnOnce() -> E,
) -> Result<T, E>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    rooms.tasks().spawn(what, async move {
        let result = job.await;
        if let Err(Err(e)) = tx.send(result) {
            warn!(error = %e, job = what, "a project write nobody waits for any more failed");
        }
    });
    match tokio::time::timeout(SAVE_WAIT, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(unavailable()),
        Err(_) => {
            warn!(job = what, "store slow: answered unavailable, the write completes once it is saved");
            Err(unavailable())
        }
    }
}

fn doc_name(name: &str) -> Result<DocName, ProjectError> {
    DocName::parse(name).map_err(|_| ProjectError::BadName)
}

/// Every file of a project with its text, by resolved path.
pub async fn read_files(rooms: &Rooms, project: &str) -> Result<Vec<ArchiveFile>, ProjectError> {
    let root = snapshot(rooms, &doc_name(project)?).await?;
    let entries = tree::entries(&root.transact());
    let mut files = Vec::new();
    for entry in entries.into_iter().filter(|e| e.kind == EntryKind::File) {
        let doc = snapshot(rooms, &doc_name(&tree::file_doc_name(project, &entry.id))?).await?;
        let text = doc.get_or_insert_text(tree::CONTENT);
        let text = text.get_string(&doc.transact());
        files.push(ArchiveFile { path: entry.path, text });
    }
    Ok(files)
}

/// Writes files into a project as live edits: new paths become new entries, existing ones get
/// their text replaced by the smallest edit that trims the common prefix and suffix. Contents are
/// committed before the tree, so a peer that sees a new entry finds its text. Waits at most
/// [`SAVE_WAIT`] (see the module's documentation).
pub async fn write_files(rooms: &Rooms, project: &str, files: &[ArchiveFile]) -> Result<usize, ProjectError> {
    let (owned_rooms, project, files) = (rooms.clone(), project.to_owned(), files.to_vec());
    let job = async move { write_files_now(&owned_rooms, &project, &files).await };
    to_completion(rooms, "import", job, || ProjectError::Unavailable).await
}

async fn write_files_now(rooms: &Rooms, project: &str, files: &[ArchiveFile]) -> Result<usize, ProjectError> {
    let root_name = doc_name(project)?;
    let root = snapshot(rooms, &root_name).await?;
    let before = root.transact().state_vector();
    let mut targets = Vec::new();
    {
        let mut txn = root.transact_mut();
        if tree::schema_version(&txn).is_none() {
            tree::init(&mut txn);
        }
        for file in files {
            let id = match tree::find_by_path(&txn, &file.path) {
                Some(entry) => entry.id,
                None => tree::create(&mut txn, &file.path, EntryKind::File)?,
            };
            targets.push((id, file));
        }
    }
    for (id, file) in &targets {
        let name = doc_name(&tree::file_doc_name(project, id))?;
        let doc = snapshot(rooms, &name).await?;
        let sv = doc.transact().state_vector();
        replace_text(&doc, &file.text);
        let update = doc.transact().encode_state_as_update_v1(&sv);
        apply(rooms, &name, update).await?;
    }
    let update = root.transact().encode_state_as_update_v1(&before);
    apply(rooms, &root_name, update).await?;
    Ok(targets.len())
}

/// Replaces a document's `content` with `new`, touching only the part that differs.
pub fn replace_text(doc: &Doc, new: &str) {
    let text = doc.get_or_insert_text(tree::CONTENT);
    let mut txn = doc.transact_mut();
    let old = text.get_string(&txn);
    let prefix = old.bytes().zip(new.bytes()).take_while(|(a, b)| a == b).count();
    let prefix = floor_char_boundary(&old, floor_char_boundary(new, prefix));
    let max_suffix = (old.len() - prefix).min(new.len() - prefix);
    let suffix = old.bytes().rev().zip(new.bytes().rev()).take(max_suffix).take_while(|(a, b)| a == b).count();
    let mut old_end = old.len() - suffix;
    let mut new_end = new.len() - suffix;
    while !old.is_char_boundary(old_end) || !new.is_char_boundary(new_end) {
        old_end += 1;
        new_end += 1;
    }
    // yrs indexes text by UTF-8 bytes by default, like these offsets.
    let (at, removed) = (prefix as u32, (old_end - prefix) as u32);
    if removed > 0 {
        text.remove_range(&mut txn, at, removed);
    }
    if new_end > prefix {
        text.insert(&mut txn, at, &new[prefix..new_end]);
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(old: &str, new: &str) {
        let doc = Doc::new();
        replace_text(&doc, old);
        let sv = doc.transact().state_vector();
        replace_text(&doc, new);
        let text = doc.get_or_insert_text(tree::CONTENT);
        assert_eq!(text.get_string(&doc.transact()), new, "{old:?} -> {new:?}");
        let delta = doc.transact().encode_state_as_update_v1(&sv);
        assert!(delta.len() < new.len() + 64, "edit is small: {} bytes for {old:?} -> {new:?}", delta.len());
    }

    #[test]
    fn replacement_is_a_small_edit() {
        check("", "hello");
        check("hello world", "hello brave world");
        check("hello world", "hello");
        check("abc", "");
        check("héllo wörld", "héllo wèrld");
        check("aaaa", "aa");
        check("x€y", "x£y");
    }
}
