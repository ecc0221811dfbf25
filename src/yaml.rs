//! YAML from callers (the SPC's `objects` and `secrets`, YAML payloads to
//! extract keys from), parsed within bounds.
//!
//! A YAML parser does work out of all proportion to its input on two
//! shapes: aliases (a 10 KB document of one anchor and many aliases expands
//! to hundreds of MB) and deep flow nesting (libyaml's scanner is quadratic
//! in it). So before the document reaches `serde_yaml_ng`, a streaming pass
//! with `saphyr-parser` measures it and stops at the first bound crossed:
//! input bytes, nesting depth, nodes after alias expansion, scalar bytes
//! after alias expansion. That pass does constant work per event and never
//! expands anything (an alias costs a table look-up), so rejecting a hostile
//! document costs about as much as reading it.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser};
use serde_yaml_ng::Value;

/// Bounds of one document.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    /// Nesting of sequences and mappings, aliases expanded.
    pub max_depth: usize,
    /// Nodes (scalars, sequences, mappings) with every alias expanded.
    pub max_nodes: u64,
    /// Scalar bytes with every alias expanded: what the parsed value weighs.
    pub max_scalar_bytes: u64,
}

/// Bounds of the documents an SPC or pod hands over (`objects`,
/// `secrets`). An SPC is a Kubernetes object (≤ 1.5 MiB in etcd); a list of
/// 1,000 objects with ten fields each is about 21,000 nodes. Measured in a
/// release build, the worst 1 MiB document takes under 60 ms to refuse.
pub const REQUEST: Limits = Limits {
    max_bytes: 1024 * 1024,
    max_depth: 32,
    max_nodes: 64_000,
    max_scalar_bytes: 4 * 1024 * 1024,
};

/// Why a document was refused. Positions only: a parser's message can
/// quote the document, which may hold a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum YamlError {
    #[error("is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("is not valid YAML at line {line}, column {column}")]
    Syntax { line: usize, column: usize },
    #[error("is not valid YAML")]
    SyntaxNoPosition,
    #[error("nests deeper than {limit} levels (at line {line})")]
    TooDeep { limit: usize, line: usize },
    #[error("expands to more than {limit} nodes (aliases included)")]
    TooManyNodes { limit: u64 },
    #[error("expands to more than {limit} bytes of text (aliases included)")]
    TooMuchText { limit: u64 },
    #[error("has an alias to a collection that contains it (line {line})")]
    RecursiveAlias { line: usize },
}

/// What a finished node weighs once every alias in it is expanded.
#[derive(Debug, Clone, Copy, Default)]
struct Weight {
    nodes: u64,
    bytes: u64,
    /// Levels of nesting inside the node (a scalar is 0).
    depth: usize,
}

/// An open sequence or mapping and what its finished children weigh.
struct Open {
    anchor: usize,
    weight: Weight,
}

/// Measures `text` against `limits` without building anything.
pub fn check(text: &str, limits: &Limits) -> Result<(), YamlError> {
    if text.len() > limits.max_bytes {
        return Err(YamlError::TooLarge {
            size: text.len(),
            limit: limits.max_bytes,
        });
    }
    let mut anchors: HashMap<usize, Weight> = HashMap::new();
    let mut stack: Vec<Open> = Vec::new();
    // Everything seen so far, aliases expanded: each node is added once, a
    // collection when it ends (its children were added as they ended).
    let mut nodes: u64 = 0;
    let mut bytes: u64 = 0;
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| YamlError::Syntax {
            line: e.marker().line(),
            column: e.marker().col() + 1,
        })?;
        let line = span.start.line();
        // A node just completed, its anchor (0 = none), and what it adds to
        // the running totals.
        let (anchor, weight, added) = match event {
            Event::Scalar(value, _, anchor, _) => {
                let w = Weight {
                    nodes: 1,
                    bytes: value.len() as u64,
                    depth: 0,
                };
                (anchor, w, w)
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some(w) => (0, *w, *w),
                // saphyr registers an anchor when its node starts: an alias
                // to it before it ends is inside it.
                None => return Err(YamlError::RecursiveAlias { line }),
            },
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if stack.len() >= limits.max_depth {
                    return Err(YamlError::TooDeep {
                        limit: limits.max_depth,
                        line,
                    });
                }
                stack.push(Open {
                    anchor,
                    weight: Weight::default(),
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(open) => (
                    open.anchor,
                    Weight {
                        nodes: open.weight.nodes.saturating_add(1),
                        bytes: open.weight.bytes,
                        depth: open.weight.depth + 1,
                    },
                    Weight {
                        nodes: 1,
                        bytes: 0,
                        depth: 0,
                    },
                ),
                None => return Err(YamlError::SyntaxNoPosition),
            },
            _ => continue,
        };
        if stack.len() + weight.depth > limits.max_depth {
            return Err(YamlError::TooDeep {
                limit: limits.max_depth,
                line,
            });
        }
        nodes = nodes.saturating_add(added.nodes);
        bytes = bytes.saturating_add(added.bytes);
        if nodes > limits.max_nodes {
            return Err(YamlError::TooManyNodes {
                limit: limits.max_nodes,
            });
        }
        if bytes > limits.max_scalar_bytes {
            return Err(YamlError::TooMuchText {
                limit: limits.max_scalar_bytes,
            });
        }
        if anchor != 0 {
            anchors.insert(anchor, weight);
        }
        if let Some(parent) = stack.last_mut() {
            parent.weight.nodes = parent.weight.nodes.saturating_add(weight.nodes);
            parent.weight.bytes = parent.weight.bytes.saturating_add(weight.bytes);
            parent.weight.depth = parent.weight.depth.max(weight.depth);
        }
    }
    Ok(())
}

/// Parses `text` into a YAML value after [`check`] has passed it.
pub fn parse(text: &str, limits: &Limits) -> Result<Value, YamlError> {
    check(text, limits)?;
    serde_yaml_ng::from_str(text).map_err(|e| match e.location() {
        Some(l) => YamlError::Syntax {
            line: l.line(),
            column: l.column(),
        },
        None => YamlError::SyntaxNoPosition,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn timed(text: &str) -> (Result<Value, YamlError>, Duration) {
        let started = Instant::now();
        let r = parse(text, &REQUEST);
        (r, started.elapsed())
    }

    #[test]
    fn ordinary_documents_parse_as_before() {
        let doc = "- objectName: a\n  filePermission: 0640\n  secretArgs: {x: [1, 2]}\n\
                   - &b {objectName: b}\n- *b\n";
        let v = parse(doc, &REQUEST).unwrap();
        let direct: Value = serde_yaml_ng::from_str(doc).unwrap();
        assert_eq!(v, direct);
    }

    #[test]
    fn alias_fan_out_is_refused_before_expansion() {
        // One anchor of 2,000 nodes and 4,000 aliases: 8 M nodes expanded
        // from 24 KB (this shape took 21 s and GBs inside serde_yaml_ng).
        let mut doc = format!("- &a [{}]\n", vec!["x"; 2000].join(","));
        for _ in 0..4000 {
            doc.push_str("- *a\n");
        }
        let (r, took) = timed(&doc);
        assert!(matches!(r, Err(YamlError::TooManyNodes { .. })), "{r:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        // Nested laughs: each level doubles.
        let mut laughs = String::from("a0: &a0 [x, x]\n");
        for i in 1..40 {
            laughs.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}]\n", p = i - 1));
        }
        assert!(matches!(
            parse(&laughs, &REQUEST),
            Err(YamlError::TooManyNodes { .. })
        ));
        // A big scalar aliased many times: the text bound.
        let mut text = format!("- &s {}\n", "y".repeat(500_000));
        for _ in 0..20 {
            text.push_str("- *s\n");
        }
        assert!(matches!(
            parse(&text, &REQUEST),
            Err(YamlError::TooMuchText { .. })
        ));
    }

    #[test]
    fn deep_nesting_is_refused_quickly() {
        for doc in [
            "[".repeat(200_000),
            "{a: ".repeat(200_000),
            "- ".repeat(200_000),
            "? ".repeat(200_000),
            (0..40).map(|i| format!("{}a:\n", " ".repeat(i))).collect(),
        ] {
            let (r, took) = timed(&doc);
            // saphyr itself stops some shapes early as syntax errors.
            assert!(
                matches!(r, Err(YamlError::TooDeep { .. } | YamlError::Syntax { .. })),
                "{}: {r:?}",
                &doc[..10]
            );
            assert!(took < Duration::from_secs(1), "{took:?}");
        }
        // Depth through an alias counts too.
        let deep = format!(
            "a: &d {}1{}\nb: {}*d{}\n",
            "[".repeat(20),
            "]".repeat(20),
            "[".repeat(20),
            "]".repeat(20)
        );
        assert!(matches!(
            parse(&deep, &REQUEST),
            Err(YamlError::TooDeep { .. })
        ));
    }

    #[test]
    fn size_syntax_and_recursion() {
        let big = "a".repeat(REQUEST.max_bytes + 1);
        assert!(matches!(
            parse(&big, &REQUEST),
            Err(YamlError::TooLarge { .. })
        ));
        let e = parse("- objectName: [unclosed\n  password: hunter2", &REQUEST).unwrap_err();
        assert!(matches!(e, YamlError::Syntax { .. }), "{e}");
        assert!(!e.to_string().contains("hunter2"));
        let e = parse("a: &x [1, *x]", &REQUEST).unwrap_err();
        assert!(
            matches!(
                e,
                YamlError::RecursiveAlias { .. } | YamlError::Syntax { .. }
            ),
            "{e}"
        );
    }
}
