//! Subcommands that act as the driver's side: `coffer mount` and `coffer demo`.

pub mod demo;
pub mod mount;
