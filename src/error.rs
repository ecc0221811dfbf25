//! Typed errors of the library. They are mapped to gRPC statuses exactly once,
//! in `server::grpc`. No message ever carries a secret value or a token.

use std::fmt;
use std::time::Duration;

/// The outcome class of a failure, ordered by how much it tells the user:
/// when several objects fail differently, the first class in this order wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Code {
    InvalidArgument,
    PermissionDenied,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
    DeadlineExceeded,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "InvalidArgument",
            Code::PermissionDenied => "PermissionDenied",
            Code::FailedPrecondition => "FailedPrecondition",
            Code::NotFound => "NotFound",
            Code::ResourceExhausted => "ResourceExhausted",
            Code::Unavailable => "Unavailable",
            Code::DeadlineExceeded => "DeadlineExceeded",
            Code::Internal => "Internal",
        }
    }
}

/// Why one object could not be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("rate limited: {0}")]
    ResourceExhausted(String),
    /// The backend asked us to slow down, perhaps saying for how long.
    #[error("rate limited: {message}")]
    Throttled {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Throttled by a backend whose peers report it as unavailable once
    /// retries are spent (Azure Key Vault's 429): retried honouring the
    /// hint, then Unavailable, and cached values may serve meanwhile.
    #[error("backend unavailable: {message}")]
    Busy {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("too large: {size} bytes, the limit is {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ObjectError {
    /// Worth trying again within the Mount deadline: the backend was
    /// unreachable, failed, or asked us to slow down.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ObjectError::Unavailable(_) | ObjectError::Throttled { .. } | ObjectError::Busy { .. }
        )
    }

    /// Stale-if-error applies: the backend could not answer, as opposed to
    /// answering "no" (a revoked grant must take effect at once).
    pub fn is_outage(&self) -> bool {
        matches!(self, ObjectError::Unavailable(_) | ObjectError::Busy { .. })
    }

    pub fn code(&self) -> Code {
        match self {
            ObjectError::Invalid(_) => Code::InvalidArgument,
            ObjectError::NotFound(_) => Code::NotFound,
            ObjectError::PermissionDenied(_) => Code::PermissionDenied,
            ObjectError::FailedPrecondition(_) => Code::FailedPrecondition,
            ObjectError::Unavailable(_) | ObjectError::Busy { .. } => Code::Unavailable,
            ObjectError::ResourceExhausted(_) | ObjectError::Throttled { .. } => {
                Code::ResourceExhausted
            }
            ObjectError::TooLarge { .. } => Code::ResourceExhausted,
            ObjectError::Internal(_) => Code::Internal,
        }
    }
}

/// Longest piece of caller input (a name, a path, a key) echoed in a message.
const SHOWN_CHARS: usize = 96;
/// Failures listed one by one in a message; the rest are counted.
pub const LISTED_FAILURES: usize = 20;

/// The innermost cause of an error (the part that says what went wrong,
/// e.g. "connection refused" under a client's "error sending request").
pub fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut cause = e.to_string();
    let mut s = e.source();
    while let Some(inner) = s {
        cause = inner.to_string();
        s = inner.source();
    }
    cause
}

/// Caller input as it appears in messages: quoted and escaped (no newline or
/// terminal escape can reach a log line or an event), and cut short, so a
/// 3 MB object name costs a 3 MB status nowhere.
pub fn shown(input: &str) -> String {
    let mut chars = input.chars();
    let head: String = chars.by_ref().take(SHOWN_CHARS).collect();
    if chars.next().is_none() {
        format!("{head:?}")
    } else {
        format!("{head:?}… ({} bytes)", input.len())
    }
}

/// Like [`shown`], but a short plain name (letters, digits, `-_./`) stays
/// bare, for lists of names that read better unquoted.
pub fn shown_bare(input: &str) -> String {
    let plain = input.len() <= SHOWN_CHARS
        && !input.is_empty()
        && input
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if plain {
        input.to_string()
    } else {
        shown(input)
    }
}

/// A failure tied to one object of the SPC, named by its label (its output
/// path, or its position in the list when it has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub object: String,
    pub error: ObjectError,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Entries of `files` and SPC parameters are labelled as themselves.
        if self.object.starts_with("files") || self.object.starts_with("parameters.") {
            write!(f, "{}: {}", self.object, self.error)
        } else {
            write!(f, "object {}: {}", shown(&self.object), self.error)
        }
    }
}

/// Why a Mount failed as a whole. Every variant means nothing was returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    /// The request itself (attributes, secrets, permission, parameters) is malformed.
    #[error("invalid mount request: {0}")]
    Request(String),
    /// One or more objects failed validation or fetching.
    #[error("{}", describe_failures(.total, .failures))]
    Objects {
        total: usize,
        failures: Vec<Failure>,
    },
    #[error(
        "mount timed out after {}; objects still outstanding: {}",
        humantime::format_duration(*.timeout),
        list(.outstanding)
    )]
    Deadline {
        timeout: Duration,
        outstanding: Vec<String>,
    },
    /// The node policy refused objects: nothing was fetched.
    #[error("{}", describe_denials(.denials))]
    Policy { denials: Vec<crate::policy::Denial> },
    /// The service-account tokens do not belong to the pod the request names.
    #[error("{0}")]
    Identity(String),
    /// The audit log cannot record the Mount and the daemon fails closed.
    #[error("{0}")]
    Audit(String),
    /// The node cannot take this request now (large requests queue).
    #[error("{0}")]
    Busy(String),
    #[error("mount response would be {size} bytes; the limit is {limit} (--max-response-bytes, and the driver's gRPC receive limit)")]
    ResponseTooLarge { size: u64, limit: u64 },
}

fn describe_failures(total: &usize, failures: &[Failure]) -> String {
    let mut listed: Vec<String> = failures
        .iter()
        .take(LISTED_FAILURES)
        .map(ToString::to_string)
        .collect();
    if failures.len() > LISTED_FAILURES {
        listed.push(format!("and {} more", failures.len() - LISTED_FAILURES));
    }
    format!(
        "{} of {} objects failed, nothing was mounted: {}",
        failures.len(),
        total,
        listed.join("; ")
    )
}

fn describe_denials(denials: &[crate::policy::Denial]) -> String {
    let mut listed: Vec<String> = denials
        .iter()
        .take(LISTED_FAILURES)
        .map(|d| {
            let by = if d.rule == "default" {
                "the policy's default (no rule matched)".to_string()
            } else {
                format!("policy rule {}", shown_bare(&d.rule))
            };
            format!(
                "object {} ({} backend): denied by {by}",
                shown(&d.object),
                d.backend
            )
        })
        .collect();
    if denials.len() > LISTED_FAILURES {
        listed.push(format!("and {} more", denials.len() - LISTED_FAILURES));
    }
    format!(
        "the node policy refused {} object(s), nothing was fetched: {}",
        denials.len(),
        listed.join("; ")
    )
}

fn list(labels: &[String]) -> String {
    let mut listed: Vec<String> = labels
        .iter()
        .take(LISTED_FAILURES)
        .map(|l| shown_bare(l))
        .collect();
    if labels.len() > LISTED_FAILURES {
        listed.push(format!("and {} more", labels.len() - LISTED_FAILURES));
    }
    listed.join(", ")
}

impl MountError {
    pub fn code(&self) -> Code {
        match self {
            MountError::Request(_) => Code::InvalidArgument,
            MountError::Objects { failures, .. } => failures
                .iter()
                .map(|f| f.error.code())
                .min()
                .unwrap_or(Code::Internal),
            MountError::Deadline { .. } => Code::DeadlineExceeded,
            MountError::Policy { .. } | MountError::Identity(_) => Code::PermissionDenied,
            MountError::ResponseTooLarge { .. } => Code::ResourceExhausted,
            MountError::Audit(_) | MountError::Busy(_) => Code::Unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_failures_pick_the_most_telling_code() {
        let err = MountError::Objects {
            total: 3,
            failures: vec![
                Failure {
                    object: "a".into(),
                    error: ObjectError::Unavailable("connection refused".into()),
                },
                Failure {
                    object: "b".into(),
                    error: ObjectError::NotFound("no such file".into()),
                },
            ],
        };
        assert_eq!(err.code(), Code::NotFound);
        let msg = err.to_string();
        assert!(msg.starts_with("2 of 3 objects failed"), "{msg}");
        assert!(msg.contains("object \"a\": backend unavailable: connection refused"));
        assert!(msg.contains("object \"b\": not found: no such file"));
    }

    #[test]
    fn echoed_input_is_escaped_cut_and_summarised() {
        assert_eq!(shown("a\nb\u{1b}[31m"), "\"a\\nb\\u{1b}[31m\"");
        let long = "x".repeat(3_000_000);
        let s = shown(&long);
        assert!(s.len() < 200 && s.ends_with("(3000000 bytes)"), "{s}");
        let failures: Vec<Failure> = (0..100_000)
            .map(|i| Failure {
                object: format!("{i}-{}", "y".repeat(500)),
                error: ObjectError::Invalid("bad".into()),
            })
            .collect();
        let msg = MountError::Objects {
            total: 100_000,
            failures,
        }
        .to_string();
        assert!(msg.len() < 8 * 1024, "{} bytes", msg.len());
        assert!(msg.contains("and 99980 more"), "{msg}");
        let msg = MountError::Deadline {
            timeout: Duration::from_secs(1),
            outstanding: (0..50).map(|i| format!("o{i}")).collect(),
        }
        .to_string();
        assert!(msg.contains("and 30 more"), "{msg}");
    }

    #[test]
    fn deadline_names_outstanding_objects() {
        let err = MountError::Deadline {
            timeout: Duration::from_secs(100),
            outstanding: vec!["db/pass".into(), "api".into()],
        };
        assert_eq!(
            err.to_string(),
            "mount timed out after 1m 40s; objects still outstanding: db/pass, api"
        );
    }
}
