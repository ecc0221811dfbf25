//! Log setup and process hardening. Secrets are kept out of logs by the types
//! that hold them; this module keeps them out of panics and core dumps.

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
