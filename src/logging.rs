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
    let filter = EnvFilter::builder()
        .parse(&args.log_level)
        .map_err(|e| LogError(args.log_level.clone(), e.to_string()))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
