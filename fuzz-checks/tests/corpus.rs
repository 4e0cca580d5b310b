//! Replays every saved fuzz input (`fuzz/regressions/`, `fuzz/corpus/`) through its check on stable.

use std::fs;
use std::path::{Path, PathBuf};

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz").join(kind).join(target);
    let listing = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{} is missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = listing.map(|e| e.expect("directory entry").path()).filter(|p| p.is_file()).collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    files
}

fn replay(kind: &str, target: &str) {
    let (_, check) = fuzz_checks::TARGETS.iter().find(|(name, _)| *name == target).expect("a known target");
    for path in inputs(kind, target) {
        let bytes = fs::read(&path).expect("readable input");
        // Name the input before a failing check panics, so the failure says which file it was.
        let outcome = std::panic::catch_unwind(|| check(&bytes));
        assert!(outcome.is_ok(), "{} fails the {target} check", path.display());
    }
}

#[test]
fn every_target_is_listed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    let mut on_disk: Vec<String> = fs::read_dir(&dir)
        .expect("fuzz/fuzz_targets")
        .map(|e| e.expect("entry").path().file_stem().expect("name").to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = fuzz_checks::TARGETS.iter().map(|(name, _)| (*name).to_owned()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
}

macro_rules! target_tests {
    ($($target:ident),* $(,)?) => {
        mod regressions {
            $(#[test] fn $target() { super::replay("regressions", stringify!($target)); })*
        }
        mod corpus {
            $(#[test] fn $target() { super::replay("corpus", stringify!($target)); })*
        }
    };
}

target_tests!(wire_ywebsocket, wire_hocus, update_apply, tree_reader, archive_import);
