//! The gRPC edge: the `CSIDriverProvider` service, one log span per Mount, and
//! the single place where library errors become gRPC statuses.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::{field, Instrument};

use crate::error::{Code, MountError};
use crate::metrics::{MountLabels, METRICS};
use crate::mount::Mounter;
use crate::proto::csi_driver_provider_server::CsiDriverProvider;
use crate::proto::{MountRequest, MountResponse, VersionRequest, VersionResponse};

/// The API version the driver and coffer speak.
pub const API_VERSION: &str = "v1alpha1";
pub const RUNTIME_NAME: &str = "coffer";

pub struct ProviderService {
    mounter: Arc<Mounter>,
    in_flight: Arc<AtomicUsize>,
}

impl ProviderService {
    pub fn new(mounter: Arc<Mounter>, in_flight: Arc<AtomicUsize>) -> Self {
        Self { mounter, in_flight }
    }
}

/// The longest status message sent. The message travels in HTTP/2
/// trailers, and grpc-go (the driver) refuses header lists over 16 KiB by
/// default: a longer message would reach the user as a transport error
/// instead of the reason. Kubernetes events are cut at 1 KiB anyway.
pub const MAX_STATUS_MESSAGE: usize = 4096;

/// `message` cut to [`MAX_STATUS_MESSAGE`] bytes on a character boundary.
pub fn capped(mut message: String) -> String {
    if message.len() > MAX_STATUS_MESSAGE {
        let mut end = MAX_STATUS_MESSAGE - 40;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let total = message.len();
        message.truncate(end);
        message.push_str(&format!("… ({total} bytes in all)"));
    }
    message
}

/// Maps a Mount failure to the status the driver shows in the FailedMount event.
pub fn to_status(err: &MountError) -> Status {
    let code = match err.code() {
        Code::InvalidArgument => tonic::Code::InvalidArgument,
        Code::PermissionDenied => tonic::Code::PermissionDenied,
        Code::FailedPrecondition => tonic::Code::FailedPrecondition,
        Code::NotFound => tonic::Code::NotFound,
        Code::ResourceExhausted => tonic::Code::ResourceExhausted,
        Code::Unavailable => tonic::Code::Unavailable,
        Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        Code::Internal => tonic::Code::Internal,
    };
    Status::new(code, capped(err.to_string()))
}

/// Decrements the in-flight count however the Mount ends (even if the
/// client goes away and the future is dropped).
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        METRICS.mounts_in_flight.dec();
    }
}

#[tonic::async_trait]
impl CsiDriverProvider for ProviderService {
    async fn version(
        &self,
        request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        tracing::debug!(driver_version = %request.get_ref().version, "version requested");
        Ok(Response::new(VersionResponse {
            version: API_VERSION.into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn mount(
        &self,
        request: Request<MountRequest>,
    ) -> Result<Response<MountResponse>, Status> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        METRICS.mounts_in_flight.inc();
        let _guard = InFlight(Arc::clone(&self.in_flight));
        let started = Instant::now();
        // A debug-level span: inner log lines carry the pod at debug; at
        // info, formatting span fields for every Mount was a visible share of
        // the daemon's CPU. Failures name the pod themselves.
        let span = tracing::debug_span!(
            "mount",
            pod_namespace = field::Empty,
            pod_name = field::Empty,
            pod_uid = field::Empty,
            spc = field::Empty,
            objects = field::Empty,
        );
        let mounter = Arc::clone(&self.mounter);
        let heard = request
            .extensions()
            .get::<crate::server::peer::Caller>()
            .and_then(crate::server::peer::Caller::last_heard);
        let (ctx, result) = async move {
            let ctx = match mounter.parse(request.into_inner()).await {
                Ok(mut ctx) => {
                    // The request was in by the connection's last read:
                    // what changed before then is what this Mount must see.
                    if let Some(heard) = heard.filter(|h| *h < ctx.received) {
                        ctx.received = heard;
                    }
                    Arc::new(ctx)
                }
                Err(e) => return (None, Err(e)),
            };
            let span = tracing::Span::current();
            if !span.is_disabled() {
                span.record("pod_namespace", ctx.pod.namespace.as_str());
                span.record("pod_name", ctx.pod.name.as_str());
                span.record("pod_uid", ctx.pod.uid.as_str());
                span.record("spc", ctx.spc_name.as_str());
            }
            let result = mounter.mount(Arc::clone(&ctx)).await;
            (Some(ctx), result)
        }
        .instrument(span.clone())
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        METRICS.mount_duration.observe(elapsed);
        let duration_ms = elapsed * 1000.0;
        let _entered = span.enter();
        match result {
            Ok(response) => {
                METRICS.mounts_ok.inc();
                // Every Mount is in the audit stream; a log line per
                // successful rotation poll is noise (and, at thousands of
                // Mounts a second, a large share of the daemon's work).
                tracing::debug!(duration_ms, outcome = "ok", "mount served");
                Ok(Response::new(response))
            }
            Err(err) => {
                let status = to_status(&err);
                METRICS
                    .mounts
                    .get_or_create(&MountLabels {
                        outcome: "error",
                        code: err.code().as_str(),
                    })
                    .inc();
                let pod = ctx.as_ref().map(|c| &c.pod);
                tracing::warn!(
                    pod_namespace = pod.map(|p| p.namespace.as_str()),
                    pod_name = pod.map(|p| p.name.as_str()),
                    pod_uid = pod.map(|p| p.uid.as_str()),
                    spc = ctx.as_ref().map(|c| c.spc_name.as_str()),
                    duration_ms,
                    outcome = "error",
                    code = ?status.code(),
                    error = %status.message(),
                    "mount failed"
                );
                Err(status)
            }
        }
    }
}
