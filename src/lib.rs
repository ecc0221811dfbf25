//! coffer: a Secrets Store CSI Driver provider. See ARCHITECTURE.md for the
//! module map and how a Mount request flows through it.

pub mod atomic_writer;
pub mod audit;
pub mod backend;
pub mod bounded_map;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod fuzzing;
pub mod key;
pub mod limit;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod mount;
pub mod nodefs;
pub mod paths;
pub mod policy;
pub mod render;
pub mod request;
pub mod secret;
pub mod server;
pub mod spc;
pub mod version;
pub mod work;
pub mod yaml;

/// Code generated from `proto/provider.proto` (package `v1alpha1`).
pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("v1alpha1");
}
