//! Checkpoints (versions) of whole projects: capture, list, restore as a new change, and diff.
//!
//! A checkpoint holds the full state of the project's root document and of every file document
//! in its tree, each read through its room, one after the other. Restoring never rewrites
//! history: the server computes the edits that bring each document back to its checkpointed
//! content and applies them as its own live writes, after saving an automatic checkpoint of the
//! state being replaced, so a restore can itself be undone.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use doc_store::{CheckpointInfo, NewCheckpoint, StoreError};
use sync_core::DocName;
use sync_core::tree::{self, EntryKind};
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, ReadTxn, Transact, Update};

use crate::archive::ArchiveFile;
use crate::project::{self, ProjectError};
use crate::sync::rooms::Rooms;

/// Name prefix of checkpoints the server makes by itself; retention applies only to these.
pub const AUTO_PREFIX: &str = "auto: ";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("no such checkpoint")]
    NotFound,
    #[error("no file {0:?} in the checkpoint or the project")]
    NoSuchFile(String),
    #[error("{0}")]
    Project(#[from] ProjectError),
    #[error("document store unavailable")]
    Store(#[from] StoreError),
    #[error("the checkpoint holds a document that cannot be read")]
    Corrupt,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn doc_name(name: &str) -> Result<DocName, CheckpointError> {
    DocName::parse(name).map_err(|_| CheckpointError::Project(ProjectError::BadName))
}

fn encode_full(doc: &Doc) -> Vec<u8> {
    doc.transact().encode_state_as_update_v1(&yrs::StateVector::default())
}

/// Runs `job` (decodes, diffs: CPU work) on the blocking pool.
async fn off_runtime<R, J>(rooms: &Rooms, job: J) -> Result<R, CheckpointError>
where
    J: FnOnce() -> Result<R, CheckpointError> + Send + 'static,
    R: Send + 'static,
{
    rooms.tasks().blocking("checkpoint decode", job).await.map_err(|_| CheckpointError::Corrupt)?
}

fn decode(bytes: &[u8]) -> Result<Doc, CheckpointError> {
    let doc = Doc::new();
    let update = Update::decode_v1(bytes).map_err(|_| CheckpointError::Corrupt)?;
    doc.transact_mut().apply_update(update).map_err(|_| CheckpointError::Corrupt)?;
    Ok(doc)
}

fn content_of(doc: &Doc) -> String {
    let text = doc.get_or_insert_text(tree::CONTENT);
    text.get_string(&doc.transact())
}

/// Saves a checkpoint of every document of `project` and returns its id.
pub async fn create(rooms: &Rooms, project: &str, name: &str, author: &str) -> Result<i64, CheckpointError> {
    let root = project::snapshot(rooms, &doc_name(project)?).await?;
    let entries = tree::entries(&root.transact());
    let mut docs = vec![(project.to_owned(), encode_full(&root))];
    for entry in entries.iter().filter(|e| e.kind == EntryKind::File) {
        let name = tree::file_doc_name(project, &entry.id);
        let doc = project::snapshot(rooms, &doc_name(&name)?).await?;
        docs.push((name, encode_full(&doc)));
    }
    let checkpoint = NewCheckpoint { project, name, author, created_at: now_ms(), docs: &docs };
    Ok(rooms.store().create_checkpoint(&checkpoint).await?)
}

pub async fn list(rooms: &Rooms, project: &str) -> Result<Vec<CheckpointInfo>, CheckpointError> {
    Ok(rooms.store().list_checkpoints(project).await?)
}

/// Restores a checkpoint as a new change on top of the history; returns the id of the automatic
/// checkpoint saved first (the state before the restore). Waits at most [`project::SAVE_WAIT`]:
/// past it the store is answered unavailable and the restore completes once it is back.
pub async fn restore(rooms: &Rooms, project: &str, id: i64, author: &str) -> Result<i64, CheckpointError> {
    let (owned_rooms, project, author) = (rooms.clone(), project.to_owned(), author.to_owned());
    let job = async move { restore_now(&owned_rooms, &project, id, &author).await };
    project::to_completion(rooms, "restore", job, || CheckpointError::Project(ProjectError::Unavailable)).await
}

async fn restore_now(rooms: &Rooms, project: &str, id: i64, author: &str) -> Result<i64, CheckpointError> {
    let saved = rooms.store().load_checkpoint(project, id).await?.ok_or(CheckpointError::NotFound)?;
    let owned = project.to_owned();
    let (then_root, then_files) = off_runtime(rooms, move || {
        let saved: HashMap<String, Vec<u8>> = saved.into_iter().collect();
        let then_root = decode(saved.get(&owned).ok_or(CheckpointError::Corrupt)?)?;
        let mut files = Vec::new();
        for entry in tree::entries(&then_root.transact()).iter().filter(|e| e.kind == EntryKind::File) {
            let name = tree::file_doc_name(&owned, &entry.id);
            if let Some(bytes) = saved.get(&name) {
                files.push((name, content_of(&decode(bytes)?)));
            }
        }
        Ok((then_root, files))
    })
    .await?;
    let before = create(rooms, project, &format!("{AUTO_PREFIX}before restoring checkpoint {id}"), author).await?;

    // File contents first, so a file that reappears in the tree already has its text.
    let then_entries = tree::entries(&then_root.transact());
    for (name, then_text) in then_files {
        let doc_name = doc_name(&name)?;
        let now = project::snapshot(rooms, &doc_name).await?;
        let sv = now.transact().state_vector();
        project::replace_text(&now, &then_text);
        let update = now.transact().encode_state_as_update_v1(&sv);
        project::apply(rooms, &doc_name, update).await?;
    }

    let root_name = doc_name(project)?;
    let now_root = project::snapshot(rooms, &root_name).await?;
    let sv = now_root.transact().state_vector();
    {
        let mut txn = now_root.transact_mut();
        let now_entries = tree::entries(&txn);
        for entry in &now_entries {
            if !then_entries.iter().any(|t| t.id == entry.id) {
                tree::delete(&mut txn, &entry.id).map_err(ProjectError::from)?;
            }
        }
        for entry in &then_entries {
            let unchanged = now_entries
                .iter()
                .any(|n| n.id == entry.id && n.stored_path == entry.stored_path && n.kind == entry.kind);
            if !unchanged {
                tree::put_entry(&mut txn, &entry.id, &entry.stored_path, entry.kind).map_err(ProjectError::from)?;
            }
        }
        let settings = tree::settings(&then_root.transact());
        for (key, value) in [("run", settings.run), ("language", settings.language)] {
            if let Some(value) = value {
                tree::set_setting(&mut txn, key, &value);
            }
        }
    }
    let update = now_root.transact().encode_state_as_update_v1(&sv);
    project::apply(rooms, &root_name, update).await?;
    Ok(before)
}

/// A unified diff of one file between a checkpoint and now (`/dev/null` where it is absent).
pub async fn diff(rooms: &Rooms, project: &str, id: i64, path: &str) -> Result<String, CheckpointError> {
    let saved = rooms.store().load_checkpoint(project, id).await?.ok_or(CheckpointError::NotFound)?;
    let (owned, owned_path) = (project.to_owned(), path.to_owned());
    let then_text = off_runtime(rooms, move || {
        let saved: HashMap<String, Vec<u8>> = saved.into_iter().collect();
        let then_root = decode(saved.get(&owned).ok_or(CheckpointError::Corrupt)?)?;
        Ok(match tree::find_by_path(&then_root.transact(), &owned_path) {
            Some(entry) => match saved.get(&tree::file_doc_name(&owned, &entry.id)) {
                Some(bytes) => Some(content_of(&decode(bytes)?)),
                None => Some(String::new()),
            },
            None => None,
        })
    })
    .await?;
    let now_root = project::snapshot(rooms, &doc_name(project)?).await?;
    let now_text = match tree::find_by_path(&now_root.transact(), path) {
        Some(entry) => {
            let doc = project::snapshot(rooms, &doc_name(&tree::file_doc_name(project, &entry.id))?).await?;
            Some(content_of(&doc))
        }
        None => None,
    };
    if then_text.is_none() && now_text.is_none() {
        return Err(CheckpointError::NoSuchFile(path.to_owned()));
    }
    let (old_name, new_name) = (
        if then_text.is_some() { format!("a/{path}") } else { "/dev/null".to_owned() },
        if now_text.is_some() { format!("b/{path}") } else { "/dev/null".to_owned() },
    );
    let (old, new) = (then_text.unwrap_or_default(), now_text.unwrap_or_default());
    off_runtime(rooms, move || {
        Ok(similar::TextDiff::from_lines(&old, &new).unified_diff().header(&old_name, &new_name).to_string())
    })
    .await
}

/// Every file of a project as it was at a checkpoint, by path.
pub async fn files_at(rooms: &Rooms, project: &str, id: i64) -> Result<Vec<ArchiveFile>, CheckpointError> {
    let saved = rooms.store().load_checkpoint(project, id).await?.ok_or(CheckpointError::NotFound)?;
    let project = project.to_owned();
    off_runtime(rooms, move || {
        let saved: HashMap<String, Vec<u8>> = saved.into_iter().collect();
        let root = decode(saved.get(&project).ok_or(CheckpointError::Corrupt)?)?;
        let entries = tree::entries(&root.transact());
        let mut files = Vec::new();
        for entry in entries.into_iter().filter(|e| e.kind == EntryKind::File) {
            let text = match saved.get(&tree::file_doc_name(&project, &entry.id)) {
                Some(bytes) => content_of(&decode(bytes)?),
                None => String::new(),
            };
            files.push(ArchiveFile { path: entry.path, text });
        }
        Ok(files)
    })
    .await
}

/// Deletes the oldest automatic checkpoints of `project` beyond the newest `keep`.
pub async fn prune_automatic(rooms: &Rooms, project: &str, keep: usize) -> Result<usize, CheckpointError> {
    let auto: Vec<CheckpointInfo> =
        list(rooms, project).await?.into_iter().filter(|c| c.name.starts_with(AUTO_PREFIX)).collect();
    let excess = auto.len().saturating_sub(keep);
    for old in &auto[..excess] {
        rooms.store().delete_checkpoint(project, old.id).await?;
    }
    Ok(excess)
}
