//! Keeps a project's documents and its workspace folder in step, both ways.
//!
//! The [`Mirror`] remembers, per file id, the path and text both sides last agreed on. That one
//! record does three jobs: it tells which documents changed since they were last written
//! (docs -> files), which files changed on disk since they were last read or written
//! (files -> docs), and it suppresses echoes (a file the mirror wrote reads back equal to the
//! record, so it is not an edit). A file changed on disk becomes the smallest CRDT edit: a
//! three-way merge at character level (computed with `similar`, whose Myers diff with a
//! deadline keeps a large rewrite from stalling), so text a person typed meanwhile, elsewhere in
//! the same file, survives.
//!
//! There are no timers or threads here: [`Debounce`] is the state an async driver feeds with
//! change notifications and asks for a deadline. File-system work goes through [`Workspace`]
//! and document work through yrs transactions tagged with [`MIRROR_ORIGIN`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::time::{Duration, Instant};

use similar::{Algorithm, DiffTag, TextDiff};
use sync_core::tree::{self, EntryKind, TreeError};
use yrs::{Doc, GetString, OffsetKind, Text, TextRef, Transact, TransactionMut};

use crate::paths::{PathError, SafePath};
use crate::workspace::{FileState, Scan, Workspace, WorkspaceError};

/// Origin of every transaction the mirror makes, so a driver can tell its own edits apart.
pub const MIRROR_ORIGIN: &str = "exec-bridge-mirror";
/// Most files a project's tree holds before the mirror stops adding files that programs create
/// (as many as an archive import takes): a program writing thousands of files does not flood
/// the project, and what it is refused is said, not dropped silently.
pub const MAX_FILES: usize = 1000;
/// Longest time spent on finding a minimal diff; past it the diff is still correct, just coarser.
const DIFF_TIMEOUT: Duration = Duration::from_millis(500);

/// The file documents of a project, as the driver holds them.
pub trait FileDocs {
    /// The loaded document of file `id`, if any. Files whose document is not loaded are left as
    /// they are on both sides.
    fn get(&self, id: &str) -> Option<Doc>;
    /// The (new, empty) document of a file the mirror has just created in the tree.
    fn create(&mut self, id: &str) -> Doc;
}

impl FileDocs for HashMap<String, Doc> {
    fn get(&self, id: &str) -> Option<Doc> {
        HashMap::get(self, id).cloned()
    }

    fn create(&mut self, id: &str) -> Doc {
        self.entry(id.to_owned()).or_default().clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("path {path:?} refused: {source}")]
    Path { path: String, source: PathError },
    #[error(transparent)]
    Workspace(#[from] WorkspaceError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("{path}: not added to the project, which has {limit} files already (the most it takes from programs)")]
    TooManyFiles { path: SafePath, limit: usize },
}

/// What one docs -> files pass did.
#[derive(Debug, Default)]
pub struct DocsToFiles {
    pub written: Vec<SafePath>,
    pub removed: Vec<SafePath>,
    /// Files whose document changed while the file on disk changed too: not overwritten; the
    /// next files -> docs pass merges the disk side first.
    pub deferred: Vec<SafePath>,
    /// Entries that could not be mirrored (hostile paths, symlinks on the way, I/O errors).
    pub refused: Vec<MirrorError>,
}

/// What one files -> docs pass did.
#[derive(Debug, Default)]
pub struct FilesToDocs {
    /// Ids of files whose text got an edit from disk.
    pub edited: Vec<String>,
    /// New tree entries for files that appeared on disk.
    pub created: Vec<(String, SafePath)>,
    /// Ids of entries deleted because their file was deleted on disk.
    pub deleted: Vec<String>,
    pub refused: Vec<MirrorError>,
}

#[derive(Debug, Clone)]
struct Synced {
    path: SafePath,
    text: String,
}

/// The mirror's memory of what both sides last agreed on. Start with
/// [`Mirror::docs_to_files`]: the documents are the source of truth for a fresh workspace.
#[derive(Debug)]
pub struct Mirror {
    synced: BTreeMap<String, Synced>,
    dirs: BTreeSet<SafePath>,
    /// Files in the tree past which files new on disk are refused ([`MAX_FILES`]).
    max_files: usize,
}

impl Default for Mirror {
    fn default() -> Mirror {
        Mirror { synced: BTreeMap::new(), dirs: BTreeSet::new(), max_files: MAX_FILES }
    }
}

impl Mirror {
    pub fn new() -> Mirror {
        Mirror::default()
    }

    /// A mirror that adds files new on disk only while the tree holds fewer than `max_files`.
    pub fn with_max_files(max_files: usize) -> Mirror {
        Mirror { max_files, ..Mirror::default() }
    }

    /// The path and text last synced for file `id`.
    pub fn synced(&self, id: &str) -> Option<(&SafePath, &str)> {
        self.synced.get(id).map(|s| (&s.path, s.text.as_str()))
    }

    /// Writes every file whose text or path changed since it was last synced, and removes the
    /// files of deleted or renamed entries. Ignored paths are not mirrored.
    pub fn docs_to_files(&mut self, ws: &Workspace, root: &Doc, docs: &impl FileDocs) -> DocsToFiles {
        let mut report = DocsToFiles::default();
        let entries = tree::entries(&root.transact());
        let mut targets: BTreeMap<String, SafePath> = BTreeMap::new();
        for entry in &entries {
            let path = match SafePath::new(&entry.path) {
                Ok(path) => path,
                Err(source) => {
                    report.refused.push(MirrorError::Path { path: entry.path.clone(), source });
                    continue;
                }
            };
            if ws.is_ignored(&path) {
                continue;
            }
            match entry.kind {
                EntryKind::File => {
                    targets.insert(entry.id.clone(), path);
                }
                EntryKind::Dir if !self.dirs.contains(&path) => match ws.create_dir(&path) {
                    Ok(()) => {
                        self.dirs.insert(path);
                    }
                    Err(e) => report.refused.push(e.into()),
                },
                EntryKind::Dir => {}
            }
        }
        let target_paths: BTreeSet<&SafePath> = targets.values().collect();
        let mut stale: Vec<SafePath> = Vec::new();
        for (id, path) in &targets {
            let Some(doc) = docs.get(id) else { continue };
            let text = content_of(&doc);
            let previous = self.synced.get(id);
            if let Some(prev) = previous.filter(|p| &p.path == path) {
                if prev.text == text {
                    continue;
                }
                // Never overwrite what a program wrote and the documents have not seen yet.
                match ws.read(path) {
                    Ok(Some(FileState::Text(on_disk))) if on_disk == prev.text => {}
                    Ok(_) => {
                        report.deferred.push(path.clone());
                        continue;
                    }
                    Err(e) => {
                        report.refused.push(e.into());
                        continue;
                    }
                }
            }
            match ws.write(path, &text) {
                Ok(()) => {
                    if let Some(prev) = previous.filter(|p| &p.path != path) {
                        stale.push(prev.path.clone());
                    }
                    self.synced.insert(id.clone(), Synced { path: path.clone(), text });
                    report.written.push(path.clone());
                }
                Err(e) => report.refused.push(e.into()),
            }
        }
        let gone: Vec<String> = self.synced.keys().filter(|id| !targets.contains_key(*id)).cloned().collect();
        for id in gone {
            if let Some(prev) = self.synced.remove(&id) {
                stale.push(prev.path);
            }
        }
        for path in stale {
            if target_paths.contains(&path) {
                continue;
            }
            match ws.remove(&path) {
                Ok(()) => report.removed.push(path),
                Err(e) => report.refused.push(e.into()),
            }
        }
        report
    }

    /// Brings what a [`Workspace::scan`] found into the documents: changed text becomes a
    /// minimal edit merged with whatever the document gained meanwhile, new text files become
    /// new entries, and tracked files missing from the scan have their entries deleted. Files
    /// that are binary, too large, symlinks or unreadable are left alone on both sides.
    pub fn files_to_docs(&mut self, scan: &Scan, root: &Doc, docs: &mut impl FileDocs) -> FilesToDocs {
        let mut report = FilesToDocs::default();
        let tracked: BTreeSet<SafePath> = self.synced.values().map(|s| s.path.clone()).collect();
        let ids: Vec<String> = self.synced.keys().cloned().collect();
        for id in ids {
            let Some(synced) = self.synced.get_mut(&id) else { continue };
            match scan.get(&synced.path) {
                None => {
                    match tree::delete(&mut root.transact_mut_with(MIRROR_ORIGIN), &id) {
                        Ok(()) | Err(TreeError::NotFound(_)) => {}
                        Err(e) => report.refused.push(e.into()),
                    }
                    self.synced.remove(&id);
                    report.deleted.push(id);
                }
                Some(FileState::Text(on_disk)) if *on_disk != synced.text => {
                    let Some(doc) = docs.get(&id) else { continue };
                    merge_into(&doc, &synced.text, on_disk);
                    synced.text.clone_from(on_disk);
                    report.edited.push(id);
                }
                Some(_) => {}
            }
        }
        let mut files_in_tree = tree::entries(&root.transact()).iter().filter(|e| e.kind == EntryKind::File).count();
        for (path, state) in scan {
            let FileState::Text(text) = state else { continue };
            if tracked.contains(path) {
                continue;
            }
            let created = {
                let mut txn = root.transact_mut_with(MIRROR_ORIGIN);
                // An entry the mirror has not written yet keeps its document's text; the next
                // docs -> files pass takes it over.
                if tree::find_by_path(&txn, path.as_str()).is_some() {
                    continue;
                }
                if files_in_tree >= self.max_files {
                    report.refused.push(MirrorError::TooManyFiles { path: path.clone(), limit: self.max_files });
                    continue;
                }
                files_in_tree += 1;
                tree::create(&mut txn, path.as_str(), EntryKind::File)
            };
            match created {
                Ok(id) => {
                    let doc = docs.create(&id);
                    let content = doc.get_or_insert_text(tree::CONTENT);
                    let mut txn = doc.transact_mut_with(MIRROR_ORIGIN);
                    let end = content.len(&txn);
                    content.insert(&mut txn, end, text);
                    drop(txn);
                    self.synced.insert(id.clone(), Synced { path: path.clone(), text: text.clone() });
                    report.created.push((id, path.clone()));
                }
                Err(e) => report.refused.push(e.into()),
            }
        }
        report
    }
}

fn content_of(doc: &Doc) -> String {
    let content = doc.get_or_insert_text(tree::CONTENT);
    content.get_string(&doc.transact())
}

/// Applies the change `base -> on_disk` to the document's text, which is `base` plus whatever
/// other peers did meanwhile, as the smallest edit in one transaction.
fn merge_into(doc: &Doc, base: &str, on_disk: &str) {
    let content = doc.get_or_insert_text(tree::CONTENT);
    let kind = doc.offset_kind();
    let mut txn = doc.transact_mut_with(MIRROR_ORIGIN);
    let current = content.get_string(&txn);
    let edits = plan_edits(base, &current, on_disk);
    apply_edits(&content, &mut txn, &current, &edits, kind);
}

/// One step of a text edit, in characters (Unicode scalar values) of the text it applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextEdit {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
}

fn char_diff<'a>(old: &'a str, new: &'a str) -> TextDiff<'a, 'a, 'a, str> {
    TextDiff::configure().algorithm(Algorithm::Myers).timeout(DIFF_TIMEOUT).diff_chars(old, new)
}

/// The diff's steps with both ranges, in characters, recomputed from the lengths: `similar`'s
/// `Insert` and `Delete` ops can carry a stale index for the side they do not touch.
fn steps(diff: &TextDiff<'_, '_, '_, str>) -> Vec<(DiffTag, Range<usize>, Range<usize>)> {
    let (mut old_at, mut new_at) = (0, 0);
    diff.ops()
        .iter()
        .map(|op| {
            let (tag, old, new) = op.as_tag_tuple();
            let step = (tag, old_at..old_at + old.len(), new_at..new_at + new.len());
            old_at += old.len();
            new_at += new.len();
            step
        })
        .collect()
}

/// The edits that carry the change `base -> new` over to `current` (which is `base` changed by
/// others), ordered so that applying them one after another, as listed, is correct: from the
/// end of the text to its start. Where `current` equals `base` the result is exactly `new`.
/// Text deleted by the change but already deleted or replaced in `current` is left as
/// `current` has it; insertions inside such a region land at its start.
pub fn plan_edits(base: &str, current: &str, new: &str) -> Vec<TextEdit> {
    // Runs of `base` that `current` kept unchanged: (start in base, start in current, length).
    let ours = char_diff(base, current);
    let kept: Vec<(usize, usize, usize)> = steps(&ours)
        .into_iter()
        .filter_map(|(tag, old, cur)| (tag == DiffTag::Equal).then_some((old.start, cur.start, old.len())))
        .collect();
    let to_current = |p: usize| -> usize {
        let i = kept.partition_point(|&(b, _, _)| b <= p);
        if i == 0 {
            return 0;
        }
        let (b, c, len) = kept[i - 1];
        c + (p - b).min(len)
    };
    let theirs = char_diff(base, new);
    let new_chars = theirs.new_slices();
    // (position in current, order: deletes before inserts, later base ops first, edit)
    let mut edits: Vec<(usize, usize, TextEdit)> = Vec::new();
    for (seq, (tag, old, added)) in steps(&theirs).into_iter().enumerate() {
        if tag == DiffTag::Equal {
            continue;
        }
        if !old.is_empty() {
            let first = kept.partition_point(|&(b, _, len)| b + len <= old.start);
            for &(b, c, len) in kept[first..].iter().take_while(|&&(b, _, _)| b < old.end) {
                let lo = old.start.max(b);
                let hi = old.end.min(b + len);
                if lo < hi {
                    edits.push((c + (lo - b), 0, TextEdit::Delete { at: c + (lo - b), len: hi - lo }));
                }
            }
        }
        if !added.is_empty() {
            let at = to_current(old.start);
            let text = new_chars[added].concat();
            edits.push((at, usize::MAX - seq, TextEdit::Insert { at, text }));
        }
    }
    edits.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    edits.into_iter().map(|(_, _, edit)| edit).collect()
}

/// Applies [`plan_edits`]' output to a Y.Text holding `current`, converting character positions
/// to the document's offset kind (yrs's default, [`OffsetKind::Bytes`], counts UTF-8 bytes;
/// Yjs-compatible documents count UTF-16 code units).
pub fn apply_edits(text: &TextRef, txn: &mut TransactionMut, current: &str, edits: &[TextEdit], kind: OffsetKind) {
    let mut wanted: Vec<usize> = edits
        .iter()
        .flat_map(|edit| match edit {
            TextEdit::Delete { at, len } => [*at, at + len],
            TextEdit::Insert { at, .. } => [*at, *at],
        })
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut offsets: HashMap<usize, u32> = HashMap::with_capacity(wanted.len());
    let mut units = 0usize;
    let mut chars = current.chars();
    let mut position = 0usize;
    for want in wanted {
        while position < want {
            let Some(c) = chars.next() else { break };
            units += match kind {
                OffsetKind::Bytes => c.len_utf8(),
                OffsetKind::Utf16 => c.len_utf16(),
            };
            position += 1;
        }
        offsets.insert(want, u32::try_from(units).unwrap_or(u32::MAX));
    }
    for edit in edits {
        match edit {
            TextEdit::Delete { at, len } => {
                let start = offsets[at];
                text.remove_range(txn, start, offsets[&(at + len)] - start);
            }
            TextEdit::Insert { at, text: chunk } => text.insert(txn, offsets[at], chunk),
        }
    }
}

/// Debouncing as plain state: changed keys collect until the changes pause for `quiet`, or at
/// most `max_delay` after the first one, so a program writing a file in many small steps gives
/// one edit and a steady stream of changes still gets through. The driver calls
/// [`Debounce::touch`] per change, sleeps until [`Debounce::deadline`], then calls
/// [`Debounce::take_due`].
#[derive(Debug, Clone)]
pub struct Debounce<K> {
    quiet: Duration,
    max_delay: Duration,
    pending: BTreeSet<K>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl<K: Ord> Debounce<K> {
    pub fn new(quiet: Duration, max_delay: Duration) -> Debounce<K> {
        Debounce { quiet, max_delay, pending: BTreeSet::new(), first: None, last: None }
    }

    pub fn touch(&mut self, key: K, now: Instant) {
        self.pending.insert(key);
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When the pending changes are due, if any are pending.
    pub fn deadline(&self) -> Option<Instant> {
        Some((self.last? + self.quiet).min(self.first? + self.max_delay))
    }

    /// The pending keys if they are due at `now`, clearing them.
    pub fn take_due(&mut self, now: Instant) -> Option<BTreeSet<K>> {
        if self.deadline()? > now {
            return None;
        }
        self.first = None;
        self.last = None;
        Some(std::mem::take(&mut self.pending))
    }

    /// Clears the pending keys whether due or not; true when there were any.
    pub fn take_all(&mut self) -> bool {
        self.first = None;
        self.last = None;
        !std::mem::take(&mut self.pending).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply_chars(current: &str, edits: &[TextEdit]) -> String {
        let mut chars: Vec<char> = current.chars().collect();
        for edit in edits {
            match edit {
                TextEdit::Delete { at, len } => {
                    chars.drain(*at..at + len);
                }
                TextEdit::Insert { at, text } => {
                    chars.splice(*at..*at, text.chars());
                }
            }
        }
        chars.into_iter().collect()
    }

    fn check(base: &str, current: &str, new: &str, expected: &str) {
        let edits = plan_edits(base, current, new);
        assert_eq!(apply_chars(current, &edits), expected, "base {base:?} current {current:?} new {new:?}");
        for kind in [OffsetKind::Bytes, OffsetKind::Utf16] {
            let doc = Doc::with_options(yrs::Options { offset_kind: kind, ..Default::default() });
            let text = doc.get_or_insert_text(tree::CONTENT);
            text.insert(&mut doc.transact_mut(), 0, current);
            apply_edits(&text, &mut doc.transact_mut(), current, &edits, kind);
            assert_eq!(text.get_string(&doc.transact()), expected, "{kind:?}");
        }
    }

    #[test]
    fn files_past_the_limit_are_refused_with_a_reason() {
        let root = Doc::new();
        tree::init(&mut root.transact_mut());
        let mut docs: HashMap<String, Doc> = HashMap::new();
        let mut mirror = Mirror::with_max_files(3);
        let scan: Scan = (0..5)
            .map(|i| (SafePath::new(&format!("out/{i}.txt")).unwrap(), FileState::Text(format!("{i}\n"))))
            .collect();
        let report = mirror.files_to_docs(&scan, &root, &mut docs);
        assert_eq!(report.created.len(), 3);
        assert_eq!(tree::entries(&root.transact()).len(), 3);
        let refused: Vec<String> = report.refused.iter().map(ToString::to_string).collect();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused.iter().all(|r| r.contains("has 3 files already")), "{refused:?}");
        // Once files are deleted on disk, room is made again.
        let fewer: Scan = scan.iter().skip(2).map(|(p, s)| (p.clone(), s.clone())).collect();
        let report = mirror.files_to_docs(&fewer, &root, &mut docs);
        assert_eq!((report.deleted.len(), report.created.len(), report.refused.len()), (2, 2, 0));
    }

    #[test]
    fn unchanged_document_becomes_the_new_text() {
        check("hello world", "hello world", "hello brave world", "hello brave world");
        check("abc", "abc", "", "");
        check("", "", "new file\n", "new file\n");
        check("a=1\nb=2\n", "a=1\nb=2\n", "b=2\na=1\n", "b=2\na=1\n");
        check("ünïcödé 🎉 text", "ünïcödé 🎉 text", "ünïcode 🎊 text!", "ünïcode 🎊 text!");
        check("日本語", "日本語", "日本人の言語", "日本人の言語");
    }

    #[test]
    fn edits_are_minimal() {
        let edits = plan_edits("hello world", "hello world", "hello World");
        assert_eq!(edits, vec![TextEdit::Delete { at: 6, len: 1 }, TextEdit::Insert { at: 6, text: "W".into() }]);
        let long = "line\n".repeat(10_000);
        let appended = format!("{long}one more\n");
        assert_eq!(
            plan_edits(&long, &long, &appended),
            vec![TextEdit::Insert { at: 50_000, text: "one more\n".into() }]
        );
    }

    #[test]
    fn concurrent_edits_elsewhere_survive() {
        check("line one\nline two\n", "line one!\nline two\n", "line one\nline 2\n", "line one!\nline 2\n");
        check("hello world", "hello big world", "hello world!", "hello big world!");
        check("éa🎉b", "Xéa🎉b", "éa🎉bY", "Xéa🎉bY");
        // Text the other side deleted stays deleted; an insertion inside it lands at its start.
        check("abcdef", "af", "abcXdef", "aXf");
        check("abcdef", "af", "aef", "af");
    }

    #[test]
    fn random_edits_reach_the_new_text_and_keep_concurrent_inserts() {
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let alphabet: Vec<char> = "ab c\néü日🎉".chars().collect();
        let random_text = |rng: &mut rand::rngs::StdRng, len: usize| -> String {
            (0..len).map(|_| alphabet[rand::Rng::random_range(rng, 0..alphabet.len())]).collect()
        };
        for _ in 0..200 {
            let base = random_text(&mut rng, 20);
            let new = random_text(&mut rng, 20);
            check(&base, &base, &new, &new);
            // A marker another peer inserted anywhere survives any change, which is otherwise whole.
            let mut current: Vec<char> = base.chars().collect();
            current.insert(rand::Rng::random_range(&mut rng, 0..=current.len()), '§');
            let current: String = current.into_iter().collect();
            let merged = apply_chars(&current, &plan_edits(&base, &current, &new));
            assert_eq!(merged.matches('§').count(), 1, "seed {seed}: {base:?} {current:?} {new:?} {merged:?}");
            assert_eq!(merged.replacen('§', "", 1), new, "seed {seed}: {base:?} {current:?} {new:?}");
        }
    }

    #[test]
    fn debounce_waits_for_quiet_but_not_forever() {
        let start = Instant::now();
        let ms = |n: u64| start + Duration::from_millis(n);
        let mut debounce = Debounce::new(Duration::from_millis(100), Duration::from_millis(1000));
        assert_eq!(debounce.deadline(), None);
        assert_eq!(debounce.take_due(ms(0)), None);
        debounce.touch("a", ms(0));
        debounce.touch("b", ms(50));
        assert_eq!(debounce.deadline(), Some(ms(150)));
        assert_eq!(debounce.take_due(ms(149)), None);
        assert_eq!(debounce.take_due(ms(150)), Some(BTreeSet::from(["a", "b"])));
        assert_eq!(debounce.deadline(), None);
        for step in 0..20 {
            debounce.touch("c", ms(1000 + step * 90));
        }
        assert_eq!(debounce.deadline(), Some(ms(2000)));
        assert_eq!(debounce.take_due(ms(2000)), Some(BTreeSet::from(["c"])));
    }
}
