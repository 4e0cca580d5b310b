//! House-style checks over the whole workspace that no compiler enforces.

use std::fs;
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable directory") {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !matches!(name, "target" | "node_modules" | ".git" | "data" | "dist") {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_starts_with_a_module_doc_line() {
    let mut files = Vec::new();
    rust_files(&workspace_root(), &mut files);
    assert!(files.len() > 20, "found only {} Rust files; is the walk broken?", files.len());
    let missing: Vec<String> = files
        .iter()
        .filter(|f| !fs::read_to_string(f).expect("utf-8 source").starts_with("//!"))
        .map(|f| f.display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a leading `//!` line saying what they are for:\n{}", missing.join("\n"));
}

#[test]
fn every_crate_uses_the_workspace_lints() {
    let root = workspace_root();
    let manifest = fs::read_to_string(root.join("Cargo.toml")).expect("root manifest");
    let members: Vec<&str> = manifest
        .lines()
        .skip_while(|l| !l.starts_with("members"))
        .skip(1)
        .take_while(|l| !l.starts_with(']'))
        .filter_map(|l| l.trim().trim_end_matches(',').strip_prefix('"')?.strip_suffix('"'))
        .collect();
    assert!(members.len() >= 8, "members not found in the root Cargo.toml");
    for member in members {
        let crate_manifest = fs::read_to_string(root.join(member).join("Cargo.toml")).expect("crate manifest");
        assert!(crate_manifest.contains("[lints]\nworkspace = true"), "{member} does not use the workspace lints");
    }
}
