//! Subcommands besides the daemon: `coffer mount` and `coffer demo` (the
//! driver's side) and `coffer check` (pre-flight validation).

pub mod check;
pub mod demo;
pub mod mount;
pub mod sops;
