//! Who may call: every connection carries its peer's credentials, read with
//! `SO_PEERCRED` at accept time; every request is checked for an allowed uid
//! (root, the driver, plus `--allowed-uids`) and for the `:authority` the
//! driver always sends (`localhost`). Refusals are PermissionDenied.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::Connected;
use tower::{Layer, Service};

use crate::metrics::METRICS;

/// The authority the driver dials with.
pub const AUTHORITY: &str = "localhost";

/// Credentials of the process at the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

/// A provider-socket connection that knows its peer.
pub struct PeerStream {
    inner: UnixStream,
    peer: Option<PeerInfo>,
}

impl PeerStream {
    pub fn new(inner: UnixStream) -> Self {
        let peer = getsockopt(&inner, PeerCredentials).ok().map(|c| PeerInfo {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        });
        Self { inner, peer }
    }
}

impl Connected for PeerStream {
    type ConnectInfo = Option<PeerInfo>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The checks, as a tower layer in front of the gRPC service.
#[derive(Clone)]
pub struct GuardLayer {
    allowed: Arc<BTreeSet<u32>>,
}

impl GuardLayer {
    /// Root is always allowed: it is the driver.
    pub fn new(extra_uids: &[u32]) -> Self {
        let mut allowed: BTreeSet<u32> = extra_uids.iter().copied().collect();
        allowed.insert(0);
        Self {
            allowed: Arc::new(allowed),
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            allowed: Arc::clone(&self.allowed),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    allowed: Arc<BTreeSet<u32>>,
}

impl<S> Guard<S> {
    fn refusal<B>(&self, req: &http::Request<B>) -> Option<tonic::Status> {
        let peer = req
            .extensions()
            .get::<Option<PeerInfo>>()
            .copied()
            .flatten();
        match peer {
            Some(p) if self.allowed.contains(&p.uid) => {}
            Some(p) => {
                tracing::warn!(
                    uid = p.uid,
                    pid = p.pid,
                    "refused a call from a peer uid that is not allowed"
                );
                return Some(tonic::Status::permission_denied(format!(
                    "peer uid {} may not call this provider (allowed: {:?}; see --allowed-uids)",
                    p.uid, self.allowed
                )));
            }
            None => {
                tracing::warn!("refused a call whose peer credentials cannot be read");
                return Some(tonic::Status::permission_denied(
                    "peer credentials unavailable",
                ));
            }
        }
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        if authority != AUTHORITY {
            tracing::warn!(authority = %authority, "refused a call with an unexpected :authority");
            return Some(tonic::Status::permission_denied(format!(
                ":authority {authority:?} is not {AUTHORITY:?}, which the driver always sends"
            )));
        }
        None
    }
}

impl<S, B, R> Service<http::Request<B>> for Guard<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(status) = self.refusal(&req) {
            METRICS.refused_peers.inc();
            return Box::pin(async move { Ok(status.into_http()) });
        }
        Box::pin(self.inner.call(req))
    }
}
