//! Document names: validation and the project a name belongs to.
//!
//! A project's root document is named `{project}`; every other document of it is
//! `{project}/{rest}` (files are `{project}/{fileId}`). Names may contain `/`.

use std::fmt;

/// Longest accepted document name, in bytes.
pub const MAX_NAME_LEN: usize = 512;
/// Longest accepted project id, in bytes.
pub const MAX_PROJECT_LEN: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("document name is empty")]
    Empty,
    #[error("document name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("project id must match [a-z0-9][a-z0-9_-]{{0,62}}")]
    BadProject,
    #[error("document name has an empty, '.' or '..' segment, or a control character")]
    BadSegment,
}

/// A validated document name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocName(String);

impl DocName {
    pub fn parse(name: &str) -> Result<DocName, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        let (project, rest) = match name.split_once('/') {
            Some((p, r)) => (p, Some(r)),
            None => (name, None),
        };
        if !is_project_id(project) {
            return Err(NameError::BadProject);
        }
        if let Some(rest) = rest {
            let bad = rest
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == ".." || seg.chars().any(char::is_control));
            if bad {
                return Err(NameError::BadSegment);
            }
        }
        Ok(DocName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The project this document belongs to: the part before the first `/`.
    pub fn project(&self) -> &str {
        self.0.split_once('/').map_or(self.0.as_str(), |(p, _)| p)
    }

    /// True for a project's root document.
    pub fn is_root(&self) -> bool {
        !self.0.contains('/')
    }
}

impl fmt::Display for DocName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Project ids: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn is_project_id(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    s.len() <= MAX_PROJECT_LEN
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, expected: Result<&str, NameError>) {
        let got = DocName::parse(name).map(|n| n.project().to_owned());
        assert_eq!(got, expected.map(str::to_owned), "name {name:?}");
    }

    #[test]
    fn names() {
        check("demo", Ok("demo"));
        check("demo/0123abcd", Ok("demo"));
        check("p1/a/b/c.txt", Ok("p1"));
        check("", Err(NameError::Empty));
        check("Demo", Err(NameError::BadProject));
        check("-x", Err(NameError::BadProject));
        check("demo/", Err(NameError::BadSegment));
        check("demo//x", Err(NameError::BadSegment));
        check("demo/../other", Err(NameError::BadSegment));
        check("demo/a\u{0}b", Err(NameError::BadSegment));
        check(&format!("demo/{}", "x".repeat(600)), Err(NameError::TooLong));
        assert!(DocName::parse("demo").unwrap().is_root());
        assert!(!DocName::parse("demo/x").unwrap().is_root());
    }
}
