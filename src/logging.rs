//! Log setup and process hardening. Secrets are kept out of logs by the types
//! that hold them; this module keeps them out of panics and core dumps.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

use crate::config::{LogArgs, LogFormat};

#[derive(Debug, thiserror::Error)]
#[error("invalid --log-level {0:?}: {1}")]
pub struct LogError(String, String);

/// Installs the global subscriber, writing to stderr.
pub fn init(args: &LogArgs) -> Result<(), LogError> {
    check_level(&args.log_level)?;
    let mut filter = EnvFilter::builder()
        .parse(&args.log_level)
        .map_err(|e| LogError(args.log_level.clone(), e.to_string()))?;
    for directive in QUIET_CRATES {
        if let Ok(d) = directive.parse() {
            filter = filter.add_directive(d);
        }
    }
    // Text lines go through `EscapingStderr`, so no field (an object name,
    // an address from an SPC) can start a forged line or carry terminal
    // escapes; colours would be escaped too, so there are none. JSON escapes
    // by itself.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| EscapingStderr)
        .with_ansi(false)
        .with_target(true);
    let installed = match args.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A second init (tests, the demo) keeps the first subscriber.
    let _ = installed;
    Ok(())
}

/// The AWS SDK's own debug and trace lines print the access key id of
/// the credentials it signs with and every request it signs: they stay
/// quiet whatever --log-level asks (coffer logs each call's outcome itself).
const QUIET_CRATES: [&str; 9] = [
    "aws_smithy_runtime=info",
    "aws_smithy_runtime_api=info",
    "aws_sigv4=info",
    "aws_smithy_http_client=info",
    "aws_sdk_secretsmanager=info",
    "aws_sdk_ssm=info",
    "aws_sdk_sts=info",
    "aws_credential_types=info",
    "aws_runtime=info",
];

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A tracing filter accepts any bare word as a target name, so a misspelt
/// level (`verbose`) would silently turn every line off: a directive must
/// be a level, or `target=level`.
fn check_level(raw: &str) -> Result<(), LogError> {
    let bad = |why: &str| {
        Err(LogError(
            raw.to_string(),
            format!(
                "{why}; use one of {} or a filter such as info,coffer=debug",
                LEVELS.join(", ")
            ),
        ))
    };
    if raw.trim().is_empty() {
        return bad("it is empty");
    }
    for directive in raw.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return bad(&format!("{} is not a level", crate::error::shown(level)));
        }
    }
    Ok(())
}

/// Stderr that writes each log line with its control characters escaped:
/// only the line's own final newline stays a newline.
pub struct EscapingStderr;

/// `line` with control characters (C0 but tab, DEL, C1, Unicode line and
/// paragraph separators) written as `\u{..}` escapes, except a final `\n`.
pub fn escape_line(line: &str) -> std::borrow::Cow<'_, str> {
    let body = line.strip_suffix('\n').unwrap_or(line);
    let bad = |c: char| (c.is_control() && c != '\t') || c == '\u{2028}' || c == '\u{2029}';
    if !body.contains(bad) {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len() + 16);
    for c in body.chars() {
        if bad(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    if body.len() < line.len() {
        out.push('\n');
    }
    std::borrow::Cow::Owned(out)
}

impl std::io::Write for EscapingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr()
            .lock()
            .write_all(escape_line(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Makes the process undumpable (no core files, no ptrace by other users'
/// processes) and replaces the panic message with its location only, since a
/// panic payload could be built from data the daemon handles.
pub fn harden_process() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot mark the process undumpable");
    }
    if let Err(e) = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0) {
        tracing::warn!(error = %e, "cannot disable core dumps");
    }
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "unknown location".into());
        eprintln!("coffer: internal error (panic) at {at}; message withheld to protect secrets");
    }));
}

/// At most one log line per interval for an event that can repeat at the
/// rate an attacker chooses (a refused connection, a dropped audit record),
/// with a count of the lines left out.
pub struct Throttle {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(left out since the last line)` when a line may be written now.
    pub fn allow(&self) -> Option<u64> {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let (last, suppressed) = &mut *state;
        if last.is_some_and(|t| t.elapsed() < self.interval) {
            *suppressed += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_are_checked() {
        for ok in ["info", "DEBUG", "info,coffer=debug", "warn,h2=off", "off"] {
            assert!(check_level(ok).is_ok(), "{ok}");
        }
        for bad in ["verbose", "info,coffer=loud", "", "infoo"] {
            let e = check_level(bad).unwrap_err().to_string();
            assert!(e.contains("error, warn, info"), "{bad}: {e}");
        }
    }

    #[test]
    fn log_lines_cannot_be_forged() {
        let forged = "mount failed object=\"a\nINFO mount served outcome=ok\u{1b}[2K\r\"\n";
        let out = escape_line(forged);
        assert_eq!(out.matches('\n').count(), 1, "{out}");
        assert!(out.ends_with('\n') && !out.contains('\u{1b}') && !out.contains('\r'));
        assert!(out.contains("\\u{a}INFO"), "{out}");
        assert_eq!(escape_line("plain\tline\n"), "plain\tline\n");
    }

    #[test]
    fn throttle_counts_what_it_leaves_out() {
        let t = Throttle::new(Duration::from_millis(50));
        assert_eq!(t.allow(), Some(0));
        for _ in 0..10 {
            assert_eq!(t.allow(), None);
        }
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(t.allow(), Some(10));
    }
}
