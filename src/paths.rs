//! Output-path rules. The driver's atomic writer rejects some paths and would
//! fail the whole mount late; we check the same rules (plus our own set rules)
//! before fetching anything, so the error is early and names the object.

use std::collections::BTreeSet;
use std::ops::Bound;

use crate::error::shown;

/// Longest path the driver accepts, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest path element the driver accepts, in bytes.
pub const MAX_ELEMENT_BYTES: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("invalid path: it is empty")]
    Empty,
    #[error("invalid path: it must be relative, not absolute")]
    Absolute,
    #[error("invalid path: it is {0} bytes long; the limit is {MAX_PATH_BYTES}")]
    TooLong(usize),
    #[error("invalid path: an element is {0} bytes long; the limit is {MAX_ELEMENT_BYTES}")]
    ElementTooLong(usize),
    #[error("invalid path: it must not contain a '..' element")]
    DotDot,
    #[error("invalid path: it must not start with '..'")]
    LeadingDotDot,
    #[error("invalid path: it is not clean (no empty or '.' elements, no trailing '/')")]
    NotClean,
    #[error("invalid path: it contains a NUL byte")]
    Nul,
}

/// Checks one output path against the driver's rules.
pub fn validate_path(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong(path.len()));
    }
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    let elements: Vec<&str> = path.split('/').collect();
    for element in &elements {
        if *element == ".." {
            return Err(PathError::DotDot);
        }
        if element.len() > MAX_ELEMENT_BYTES {
            return Err(PathError::ElementTooLong(element.len()));
        }
        if element.is_empty() || *element == "." {
            return Err(PathError::NotClean);
        }
    }
    // The writer keeps its own `..data` and `..<timestamp>` entries at the top.
    if elements[0].starts_with("..") {
        return Err(PathError::LeadingDotDot);
    }
    Ok(())
}

/// A problem with the set of paths, independent of each path's own validity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathSetError {
    #[error("path {} is used by more than one object or file", shown(.0))]
    Duplicate(String),
    #[error("path {} is a file but also the directory of {}", shown(.file), shown(.other))]
    FileIsDirectory { file: String, other: String },
}

/// Checks that paths are unique and that no file is a directory of another.
pub fn validate_path_set<'a>(paths: impl IntoIterator<Item = &'a str>) -> Vec<PathSetError> {
    let mut seen = BTreeSet::new();
    let mut errors = Vec::new();
    for path in paths {
        if !seen.insert(path) {
            errors.push(PathSetError::Duplicate(path.to_string()));
        }
    }
    // A file that is also a directory: the first path at or after
    // "<file>/" in sorted order starts with it. One range look-up per path
    // keeps this O(n log n) whatever the names (scanning sorted neighbours
    // was quadratic for names such as "x", "x-", "x--", …).
    for file in &seen {
        let dir = format!("{file}/");
        let next = seen
            .range::<str, _>((Bound::Included(dir.as_str()), Bound::Unbounded))
            .next();
        if let Some(other) = next.filter(|o| o.starts_with(&dir)) {
            errors.push(PathSetError::FileIsDirectory {
                file: file.to_string(),
                other: other.to_string(),
            });
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_sets_are_checked_in_near_linear_time() {
        // Shapes that made the old neighbour scan quadratic.
        let names: Vec<String> = (1..=1000)
            .map(|i| "x".to_string() + &"-".repeat(i))
            .collect();
        let deep: Vec<String> = (1..=250)
            .map(|i| format!("{i}/{}", "a/".repeat(2000)))
            .collect();
        let started = std::time::Instant::now();
        assert!(validate_path_set(names.iter().map(String::as_str)).is_empty());
        assert!(validate_path_set(deep.iter().map(String::as_str)).is_empty());
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        let errs = validate_path_set(["a", "a-b", "a.c", "a/b", "b/c", "b"]);
        assert_eq!(errs.len(), 2, "{errs:?}");
    }

    #[test]
    fn driver_path_rules() {
        let long_element = "a".repeat(256);
        let ok_element = "a".repeat(255);
        let long_path = vec!["abcdefg"; 600].join("/");
        let table: Vec<(&str, Result<(), PathError>)> = vec![
            ("a", Ok(())),
            ("a/b/c.txt", Ok(())),
            (".hidden", Ok(())),
            ("a/..b", Ok(())),
            ("a..", Ok(())),
            (&ok_element, Ok(())),
            ("", Err(PathError::Empty)),
            ("/etc/passwd", Err(PathError::Absolute)),
            ("..", Err(PathError::DotDot)),
            ("a/../b", Err(PathError::DotDot)),
            ("a/..", Err(PathError::DotDot)),
            ("..data", Err(PathError::LeadingDotDot)),
            ("..2024_01_01/x", Err(PathError::LeadingDotDot)),
            ("./a", Err(PathError::NotClean)),
            ("a//b", Err(PathError::NotClean)),
            ("a/", Err(PathError::NotClean)),
            ("a/./b", Err(PathError::NotClean)),
            (".", Err(PathError::NotClean)),
            ("a\0b", Err(PathError::Nul)),
            (&long_element, Err(PathError::ElementTooLong(256))),
            (&long_path, Err(PathError::TooLong(long_path.len()))),
        ];
        for (path, want) in table {
            assert_eq!(validate_path(path), want, "path {path:?}");
        }
    }

    #[test]
    fn path_set_rules() {
        assert!(validate_path_set(["a", "b", "c/d", "c/e"]).is_empty());
        assert!(validate_path_set(["a", "ab/c", "a.txt"]).is_empty());
        assert_eq!(
            validate_path_set(["a", "b", "a"]),
            vec![PathSetError::Duplicate("a".into())]
        );
        assert_eq!(
            validate_path_set(["a", "a-b", "a/c"]),
            vec![PathSetError::FileIsDirectory {
                file: "a".into(),
                other: "a/c".into()
            }]
        );
        assert_eq!(
            validate_path_set(["x/y", "x/y/z"]),
            vec![PathSetError::FileIsDirectory {
                file: "x/y".into(),
                other: "x/y/z".into()
            }]
        );
    }
}
