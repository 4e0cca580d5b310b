//! Turning a tree path (from the documents, so untrusted) into a safe relative workspace path.
//!
//! `sync_core::tree::validate_path` already skips the worst entries when the tree is read; this
//! is the second, stricter check that stands right before the file system. Hostile names are
//! refused with a reason, never truncated or cleaned up: a cleaned name could land on a file
//! its author did not name.

use std::fmt;
use std::path::PathBuf;

/// Longest accepted name of one path component, in bytes (the limit of common file systems).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Longest accepted whole path, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("absolute path")]
    Absolute,
    #[error("empty path component")]
    EmptyComponent,
    #[error("'.' or '..' path component")]
    DotComponent,
    #[error("control character in path")]
    ControlChar,
    #[error("backslash in path")]
    Backslash,
    #[error("path component of {0} bytes (at most {MAX_COMPONENT_BYTES})")]
    ComponentTooLong(usize),
    #[error("path of {0} bytes (at most {MAX_PATH_BYTES})")]
    TooLong(usize),
}

/// A relative, `/`-separated path that stays inside the workspace root: no `.`, `..` or empty
/// components, no control characters or backslashes, within the length limits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SafePath(String);

impl SafePath {
    /// Checks a tree path; see [`PathError`] for what is refused.
    pub fn new(tree_path: &str) -> Result<SafePath, PathError> {
        if tree_path.is_empty() {
            return Err(PathError::Empty);
        }
        if tree_path.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong(tree_path.len()));
        }
        if tree_path.starts_with('/') {
            return Err(PathError::Absolute);
        }
        if tree_path.contains('\\') {
            return Err(PathError::Backslash);
        }
        if tree_path.chars().any(char::is_control) {
            return Err(PathError::ControlChar);
        }
        for component in tree_path.split('/') {
            match component {
                "" => return Err(PathError::EmptyComponent),
                "." | ".." => return Err(PathError::DotComponent),
                long if long.len() > MAX_COMPONENT_BYTES => return Err(PathError::ComponentTooLong(long.len())),
                _ => {}
            }
        }
        Ok(SafePath(tree_path.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, each a single valid file name.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The folders above the file, outermost first, and the file's own name.
    pub fn split_parent(&self) -> (Vec<&str>, &str) {
        let mut parts: Vec<&str> = self.components().collect();
        let name = parts.pop().unwrap_or_default();
        (parts, name)
    }

    /// The path relative to the workspace root.
    pub fn to_path_buf(&self) -> PathBuf {
        PathBuf::from(&self.0)
    }
}

impl fmt::Display for SafePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<&str, PathError>) {
        assert_eq!(SafePath::new(input).as_ref().map(SafePath::as_str).map_err(Clone::clone), expected, "{input:?}");
    }

    #[test]
    fn ordinary_paths_pass_unchanged() {
        check("main.py", Ok("main.py"));
        check("src/lib/util.rs", Ok("src/lib/util.rs"));
        check(".env", Ok(".env"));
        check("...", Ok("..."));
        check("a..b/c", Ok("a..b/c"));
        check("naïve/日本語 ファイル.txt", Ok("naïve/日本語 ファイル.txt"));
        check("notes (abc123).md", Ok("notes (abc123).md"));
    }

    #[test]
    fn traversal_and_absolute_paths_are_refused() {
        check("", Err(PathError::Empty));
        check("..", Err(PathError::DotComponent));
        check("../x", Err(PathError::DotComponent));
        check("a/../../x", Err(PathError::DotComponent));
        check("./x", Err(PathError::DotComponent));
        check("a/./b", Err(PathError::DotComponent));
        check("a/..", Err(PathError::DotComponent));
        check("/etc/passwd", Err(PathError::Absolute));
        check("/", Err(PathError::Absolute));
        check("a//b", Err(PathError::EmptyComponent));
        check("a/", Err(PathError::EmptyComponent));
        check("..\\..\\x", Err(PathError::Backslash));
        check("C:\\Windows", Err(PathError::Backslash));
    }

    #[test]
    fn control_characters_are_refused() {
        check("a\0b", Err(PathError::ControlChar));
        check("evil\0/../../etc/passwd", Err(PathError::ControlChar));
        check("line\nbreak", Err(PathError::ControlChar));
        check("tab\there", Err(PathError::ControlChar));
        check("esc\u{1b}[31m", Err(PathError::ControlChar));
        check("del\u{7f}", Err(PathError::ControlChar));
        check("c1\u{85}", Err(PathError::ControlChar));
    }

    #[test]
    fn overlong_names_are_refused_not_truncated() {
        check(&"x".repeat(10_000), Err(PathError::TooLong(10_000)));
        check(&"x".repeat(256), Err(PathError::ComponentTooLong(256)));
        check(&"é".repeat(128), Err(PathError::ComponentTooLong(256)));
        check(&"x".repeat(255), Ok(&"x".repeat(255)));
        let deep = vec!["d".repeat(200); 21].join("/");
        assert!(deep.len() > MAX_PATH_BYTES);
        check(&deep, Err(PathError::TooLong(deep.len())));
        let just_fits = vec!["d".repeat(255); 16].join("/");
        assert!(just_fits.len() <= MAX_PATH_BYTES);
        check(&just_fits, Ok(&just_fits));
    }

    #[test]
    fn split_parent_names_folders_and_file() {
        let path = SafePath::new("a/b/c.txt").unwrap();
        assert_eq!(path.split_parent(), (vec!["a", "b"], "c.txt"));
        let top = SafePath::new("c.txt").unwrap();
        assert_eq!(top.split_parent(), (vec![], "c.txt"));
    }
}
