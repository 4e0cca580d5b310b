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

/// The layer list of a crate root: every `//! - layer:` line, lowest first, with the module paths
/// it names in backticks.
fn layer_list(lib_rs: &str) -> Vec<Vec<String>> {
    lib_rs
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("//! - layer:"))
        .map(|l| l.split('`').skip(1).step_by(2).map(str::to_owned).collect())
        .collect()
}

/// The module path of a source file, from its path inside `src/` (`sync/rooms/mod.rs` is
/// `sync::rooms`; `lib.rs` is the root, the empty path).
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let file = parts.pop().unwrap_or_default();
    let stem = file.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib") {
        parts.push(stem.to_owned());
    }
    parts
}

/// Source without comments (doc links are not imports) and without string literals.
fn code_only(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if c == '"' && !escaped {
                        break;
                    }
                    escaped = c == '\\' && !escaped;
                }
                out.push_str("\"\"");
            }
            c => out.push(c),
        }
    }
    out
}

/// Reads a use tree at the start of `s` (`a::b::{c, d::e}`), appending every full path to `out`
/// with `prefix` before it.
fn use_tree(s: &str, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.to_vec();
    let mut i = 0;
    let bytes = s.as_bytes();
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < bytes.len() && bytes[i] == b'{' {
            i += 1;
            loop {
                i += use_tree(&s[i..], &path, out);
                while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b',') {
                    i += 1;
                }
                if i >= bytes.len() || bytes[i] == b'}' {
                    return i + 1;
                }
            }
        }
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        if start == i {
            break;
        }
        path.push(s[start..i].to_owned());
        if s[i..].starts_with("::") {
            i += 2;
        } else {
            break;
        }
    }
    if path.len() > prefix.len() {
        out.push(path);
    }
    i
}

/// Every module path `source` (the module `module`) names through `crate::`, `super::` or
/// `self::`, resolved to a path from the crate root.
fn crate_paths(source: &str, module: &[String]) -> Vec<Vec<String>> {
    let code = code_only(source);
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    for start in 0..code.len() {
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        let rest = &code[start..];
        let (mut base, mut after) = if let Some(after) = rest.strip_prefix("crate::") {
            (Vec::new(), after)
        } else if rest.starts_with("super::") || rest.starts_with("self::") {
            // `super` of a file `a/b.rs` (module `a::b`) is `a`; `self` is the module itself.
            (module.to_vec(), rest)
        } else {
            continue;
        };
        if start >= 2 && &code[start - 2..start] == "::" {
            continue;
        }
        loop {
            if let Some(next) = after.strip_prefix("super::") {
                base.pop();
                after = next;
            } else if let Some(next) = after.strip_prefix("self::") {
                after = next;
            } else {
                break;
            }
        }
        use_tree(after, &base, &mut found);
    }
    found
}

/// The layer of a path: the entry of the list that is its longest prefix; the crate root (a
/// path through no listed module) is above every layer. `None`: a folder of listed modules.
fn layer_of(path: &[String], layers: &[Vec<String>]) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (index, layer) in layers.iter().enumerate() {
        for entry in layer {
            let segments: Vec<&str> = entry.split("::").collect();
            let is_prefix = segments.len() <= path.len() && segments.iter().zip(path).all(|(a, b)| a == b);
            if is_prefix && best.is_none_or(|(len, _)| segments.len() > len) {
                best = Some((segments.len(), index));
            }
        }
    }
    if let Some((_, index)) = best {
        return Some(index);
    }
    let is_folder = layers.iter().flatten().any(|entry| {
        let segments: Vec<&str> = entry.split("::").collect();
        !path.is_empty() && path.len() < segments.len() && segments.iter().zip(path).all(|(a, b)| a == b)
    });
    if is_folder { None } else { Some(layers.len()) }
}

/// Every import of a module from a layer above its own, and every module in no layer.
fn layering_violations(files: &[(PathBuf, String)], layers: &[Vec<String>]) -> Vec<String> {
    let mut problems = Vec::new();
    for (rel, source) in files {
        let module = module_of(rel);
        let own = match layer_of(&module, layers) {
            Some(own) if own == layers.len() && !module.is_empty() => {
                problems.push(format!("{}: module `{}` is in no layer", rel.display(), module.join("::")));
                continue;
            }
            Some(own) => own,
            None => layers.len(),
        };
        for path in crate_paths(source, &module) {
            if let Some(target) = layer_of(&path, layers)
                && target > own
            {
                problems.push(format!(
                    "{}: `{}` (layer {own}) uses `crate::{}` (layer {target})",
                    rel.display(),
                    module.join("::"),
                    path.join("::")
                ));
            }
        }
    }
    problems
}

#[test]
fn collab_server_modules_import_only_from_their_layer_or_below() {
    let src = workspace_root().join("collab-server/src");
    let layers = layer_list(&fs::read_to_string(src.join("lib.rs")).expect("lib.rs"));
    assert!(layers.len() >= 5, "the layer list in collab-server/src/lib.rs was not found");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let files: Vec<(PathBuf, String)> = paths
        .into_iter()
        .map(|p| (p.strip_prefix(&src).expect("under src").to_path_buf(), fs::read_to_string(&p).expect("utf-8")))
        // The binary is a crate of its own: it uses the library by its name.
        .filter(|(rel, _)| rel != Path::new("main.rs"))
        .collect();
    let problems = layering_violations(&files, &layers);
    assert!(
        problems.is_empty(),
        "imports against the layer order of collab-server/src/lib.rs:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_layering_check_catches_upward_imports() {
    let layers = layer_list("//! - layer: `low` `shared`\n//! - layer: `mid::a` `mid::b`\n//! - layer: `top`\n");
    assert_eq!(layers, [vec!["low", "shared"], vec!["mid::a", "mid::b"], vec!["top"]]);
    let check = |files: &[(&str, &str)]| {
        let files: Vec<(PathBuf, String)> = files.iter().map(|(p, s)| (PathBuf::from(p), s.to_string())).collect();
        layering_violations(&files, &layers)
    };
    // Downward, sideways within a layer, through a folder, nested groups, and comments: fine.
    let fine = check(&[
        ("top.rs", "use crate::mid::{a::X, b::{Y, Z}};\nfn f() { crate::low::g(); }"),
        ("mid/a.rs", "use super::b::Thing;\nuse crate::shared::S;\n/// See [`crate::top`].\nfn f() {}"),
        ("mid/mod.rs", "pub mod a;\npub mod b;"),
        ("lib.rs", "use crate::top::T;"),
        ("low.rs", "const S: &str = \"crate::top::X\";"),
    ]);
    assert!(fine.is_empty(), "{fine:?}");
    // Upward, in every spelling.
    let wrong = check(&[
        ("low.rs", "use crate::mid::a::X;"),
        ("shared.rs", "use crate::{low::L, top::{T, U}};"),
        ("mid/b.rs", "fn f() { let _ = crate::top::make(); }"),
        ("mid/a.rs", "use super::super::top::T;"),
        ("top.rs", "use crate::Root;"),
        ("stray.rs", ""),
    ]);
    assert_eq!(wrong.len(), 7, "{wrong:#?}");
    for (what, expected) in [
        ("low.rs", "uses `crate::mid::a::X`"),
        ("shared.rs", "uses `crate::top::T`"),
        ("shared.rs", "uses `crate::top::U`"),
        ("mid/b.rs", "uses `crate::top::make`"),
        ("mid/a.rs", "uses `crate::top::T`"),
        ("top.rs", "uses `crate::Root`"),
        ("stray.rs", "is in no layer"),
    ] {
        assert!(wrong.iter().any(|w| w.starts_with(what) && w.contains(expected)), "{what}: {expected} in {wrong:#?}");
    }
}
