//! `coffer serve`: wires the backends, the Mount pipeline, the gRPC service on
//! the provider socket and the health endpoints, and drains on shutdown.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::future;

use crate::audit::Auditor;
use crate::backend::{file::FileBackend, gcp::GcpBackend, vault::VaultBackend, Registry};
use crate::cache::Cache;
use crate::config::{HealthAddr, ServeArgs};
use crate::limit::{LimitConfig, Limiter};
use crate::mount::{MountConfig, Mounter};
use crate::proto::csi_driver_provider_server::CsiDriverProviderServer;
use crate::version::{VersionKey, VersionKeyError};

pub mod admit;
pub mod grpc;
pub mod health;
pub mod peer;
pub mod shard;
pub mod socket;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    VersionKey(#[from] VersionKeyError),
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error("cannot listen for health checks on {addr}: {source}")]
    Health {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("cannot start the Mount threads: {0}")]
    Threads(std::io::Error),
    #[error("a Mount thread stopped unexpectedly")]
    MountThread,
    /// A flag whose value cannot work; says which flag and why.
    #[error("{0}")]
    Config(String),
}

/// Concurrent Mounts on one connection (the driver multiplexes every pod's
/// Mount over one connection; grpc-go queues beyond this, it does not fail).
const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// Request bytes one connection may have buffered in flight.
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Largest MountRequest accepted: the gRPC default, stated here because
/// every parsing bound downstream is sized against it.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Raises the soft open-file limit to the hard one (as Go programs do at
/// start), so connection caps, not the descriptor table, bound the load.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(error = %e, "cannot raise the open-file limit");
            }
        }
    }
}

/// Hands freed heap pages back to the system once a minute: requests
/// that allocate megabytes for a moment (a hostile document, a large SPC)
/// would otherwise leave the RSS at their high-water mark, and a memory
/// limit counts RSS.
async fn release_memory_periodically() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u32;
    loop {
        tick.tick().await;
        ticks += 1;
        let _ = tokio::task::spawn_blocking(move || {
            crate::work::release_memory();
            // After the first minute: the code that ran only while
            // starting and warming up leaves RSS.
            if ticks == 2 {
                crate::work::drop_code_pages();
            }
        })
        .await;
    }
}

/// Builds the backends enabled by the flags.
pub fn backends(args: &ServeArgs) -> Registry {
    let mut registry = Registry::new();
    let files = args.file_backend_root.as_ref().map(|root| {
        Arc::new(
            FileBackend::new(root.clone(), args.file_backend_scope)
                .refuse_hardlinks(args.file_backend_refuse_hardlinks),
        )
    });
    if let Some(files) = &files {
        registry.register(files.clone());
    }
    // Always on: it does nothing until an SPC (or --vault-addr) names a Vault.
    let vault = Arc::new(VaultBackend::new(args.vault.clone()));
    registry.register(vault.clone());
    // Always on: documents open only with keys the node has (age key
    // files) or the pod's own Vault login.
    registry.register(Arc::new(crate::backend::sops::SopsBackend::new(
        args.sops.age_key_dir.clone(),
        args.sops.cluster_key,
        vault,
        files,
        args.cache_ttl,
    )));
    registry.register(Arc::new(GcpBackend::new(
        args.gcp.clone(),
        args.vault.request_timeout,
    )));
    registry.register(Arc::new(crate::backend::aws::AwsBackend::new(
        args.aws.clone(),
        &args.node_labels,
        args.vault.request_timeout,
        args.max_response_bytes,
    )));
    registry.register(Arc::new(crate::backend::azure::AzureBackend::new(
        args.azure.clone(),
        args.vault.request_timeout,
        args.max_response_bytes,
    )));
    registry
}

pub fn mount_config(args: &ServeArgs) -> MountConfig {
    MountConfig {
        timeout: args.mount_timeout,
        max_response_bytes: args.max_response_bytes,
        fetch_concurrency: usize::from(args.fetch_concurrency),
        default_backend: args.default_backend(),
        azure_split_cert_key: args.azure.write_cert_and_key_in_separate_files,
        stale_if_error: Some(args.stale_if_error).filter(|d| !d.is_zero()),
    }
}

pub fn limit_config(args: &ServeArgs) -> LimitConfig {
    LimitConfig {
        qps: args.backend_qps,
        burst: args.backend_burst,
        max_in_flight: args.backend_max_in_flight as usize,
        retries: args.backend_retries,
        ..LimitConfig::default()
    }
}

/// Serves until `shutdown` resolves, then stops accepting, waits up to the
/// grace period for in-flight Mounts, and removes the socket.
pub async fn serve(args: &ServeArgs, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let registry = backends(args);
    serve_with_backends(args, registry, shutdown).await
}

/// [`serve`] with an explicit set of backends (embedding, tests).
pub async fn serve_with_backends(
    args: &ServeArgs,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let version_key = match VersionKey::load_or_create(&args.version_key_file) {
        Ok(key) => key,
        // A key file that exists but is damaged or unsafe needs the admin.
        Err(e @ (VersionKeyError::BadLength { .. } | VersionKeyError::Unsafe { .. })) => {
            return Err(e.into())
        }
        // Unwritable or unreadable location: serve with a key of this run
        // only; the cost is one rewrite of unchanged files after a restart.
        Err(e) => {
            tracing::warn!(error = %e, "using a version key for this run only; versions will change once after a restart");
            VersionKey::random()?
        }
    };
    args.validate().map_err(ServeError::Config)?;
    let default_backend = args.default_backend();
    if let Err(e) = registry.get(&default_backend) {
        let known: Vec<&str> = registry.names().collect();
        return Err(ServeError::Config(format!(
            "--default-backend {}: {}{}",
            crate::error::shown(&default_backend),
            e,
            crate::spc::suggestion(&default_backend, &known)
                .map(|s| format!("; did you mean {s}?"))
                .unwrap_or_default()
        )));
    }
    raise_nofile_limit();
    let housekeeping = tokio::spawn(release_memory_periodically());
    let auditor = Auditor::start(args.audit_log.clone(), args.audit_fail_closed);
    let node_labels =
        crate::policy::parse_node_labels(&args.node_labels).map_err(ServeError::Config)?;
    let policy = crate::policy::PolicyHandle::load(args.policy.clone(), node_labels)
        .map_err(|e| ServeError::Config(e.to_string()))?;
    if let Some(p) = policy.current() {
        tracing::info!(rules = p.rule_names().count(), "node policy in force");
    }
    policy.watch();
    let mounter = Arc::new(Mounter::new(
        registry,
        version_key,
        mount_config(args),
        Cache::new(args.cache_ttl, args.cache_max_bytes),
        Arc::new(Limiter::new(limit_config(args))),
        Arc::clone(&auditor),
        policy,
    ));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let service = grpc::ProviderService::new(mounter, Arc::clone(&in_flight));

    let (listener, bound) = socket::bind(&args.socket, args.socket_mode)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let health = match args.health_addr {
        HealthAddr::Off => None,
        // The provider socket is the product; the health port is an aid. A
        // taken port must not keep pods from getting their secrets: say so
        // loudly (the DaemonSet's probes will then fail visibly) and serve.
        HealthAddr::On(addr) => match tokio::net::TcpListener::bind(addr).await {
            Err(source) => {
                tracing::error!(error = %ServeError::Health { addr, source }, "serving without health endpoints");
                None
            }
            Ok(listener) => {
                let app = health::router(bound.path().to_path_buf());
                tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "health endpoints listening");
                Some(tokio::spawn(admit::serve_health(
                    listener,
                    app,
                    stop_rx.clone(),
                )))
            }
        },
    };

    let guard = peer::GuardLayer::new(&args.allowed_uids);
    let incoming = admit::provider_incoming(listener, guard.allowed());
    let provider = CsiDriverProviderServer::from_arc(Arc::new(service))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(usize::MAX);
    let mount_timeout = args.mount_timeout;
    let stop = stop_rx.clone();
    let (shards, finished, runtimes) =
        shard::Shards::start(shard::thread_count(args.worker_threads), move |incoming| {
            let mut stop = stop.clone();
            tonic::transport::Server::builder()
                // HTTP/2 limits: a caller cannot park unbounded streams,
                // headers or buffered bytes; dead peers are found by pings;
                // connections are recycled (gracefully) so none is held
                // forever.
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                .http2_max_header_list_size(16 * 1024)
                .http2_max_pending_accept_reset_streams(Some(32))
                .initial_connection_window_size(CONNECTION_WINDOW)
                .initial_stream_window_size(CONNECTION_WINDOW / 4)
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
                .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
                .max_connection_age(std::time::Duration::from_secs(3600))
                .max_connection_age_grace(mount_timeout + std::time::Duration::from_secs(5))
                .timeout(mount_timeout + std::time::Duration::from_secs(10))
                .layer(guard.clone())
                .add_service(provider.clone())
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
        })
        .map_err(ServeError::Threads)?;
    let dispatcher = tokio::spawn(shards.dispatch(incoming, stop_rx.clone()));
    // Resolves when every Mount thread's server has ended, or at the
    // first that failed.
    let server = future::try_join_all(finished.into_iter().map(|ended| async move {
        match ended.await {
            Ok(result) => result.map_err(ServeError::from),
            Err(_) => Err(ServeError::MountThread),
        }
    }));
    tracing::info!(
        socket = %bound.path().display(),
        version = env!("CARGO_PKG_VERSION"),
        "coffer provider listening"
    );
    // Start-up code (flag parsing, SDK clients, policy) is done with.
    tokio::task::spawn_blocking(crate::work::drop_code_pages);
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r.map(|_| ()),
        () = shutdown => {
            tracing::info!(in_flight = in_flight.load(Ordering::SeqCst), "shutting down: no new connections, draining in-flight mounts");
            let _ = stop_tx.send(true);
            match tokio::time::timeout(args.shutdown_grace, &mut server).await {
                Ok(r) => r.map(|_| ()),
                Err(_) => {
                    tracing::warn!(
                        in_flight = in_flight.load(Ordering::SeqCst),
                        grace = %humantime::format_duration(args.shutdown_grace),
                        "in-flight mounts did not finish within the grace period; exiting anyway"
                    );
                    Ok(())
                }
            }
        }
    };
    dispatcher.abort();
    // Connections still open past the grace period end here.
    drop(runtimes);
    let _ = stop_tx.send(true);
    if let Some(h) = health {
        let _ = h.await;
    }
    housekeeping.abort();
    auditor.flush(std::time::Duration::from_secs(2)).await;
    drop(bound);
    tracing::info!("coffer stopped");
    result
}
