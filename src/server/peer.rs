//! Who may call: every connection carries its peer's credentials, read with
//! `SO_PEERCRED` at accept time; every request is checked for an allowed uid
//! (root, the driver, plus `--allowed-uids`) and for the `:authority` the
//! driver always sends (`localhost`). Refusals are PermissionDenied.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::OwnedSemaphorePermit;
use tonic::transport::server::Connected;
use tower::{Layer, Service};

use crate::logging::Throttle;
use crate::metrics::METRICS;

/// Refusals are logged at most every few seconds: a caller chooses their rate.
static REFUSALS: Throttle = Throttle::new(std::time::Duration::from_secs(5));

/// The authority the driver dials with.
pub const AUTHORITY: &str = "localhost";

/// Credentials of the process at the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

/// What every request on a connection knows of it: the peer's credentials,
/// and when the connection last delivered bytes.
#[derive(Debug, Clone)]
pub struct Caller {
    pub peer: Option<PeerInfo>,
    heard: Arc<AtomicU64>,
}

/// The origin of [`Caller`]'s read times.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

impl Caller {
    /// When the connection last delivered bytes: no earlier than the
    /// arrival of any request it has delivered so far (a change the caller
    /// made before sending a request happened before this). Unlike the
    /// moment a handler starts, it is shared by all the requests one read
    /// brought in, so they can share one look at what changed meanwhile.
    pub fn last_heard(&self) -> Option<Instant> {
        match self.heard.load(Ordering::Acquire) {
            0 => None,
            nanos => EPOCH.checked_add(Duration::from_nanos(nanos)),
        }
    }

    fn heard_now(&self) {
        let nanos = u64::try_from(EPOCH.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        self.heard.fetch_max(nanos, Ordering::AcqRel);
    }
}

/// A provider-socket connection that knows its peer. Once admitted it
/// holds a connection slot until it closes, and must send its first bytes
/// within a handshake window.
pub struct PeerStream {
    inner: UnixStream,
    caller: Caller,
    _slot: Option<OwnedSemaphorePermit>,
    /// The Mount thread serving it counts it while it lives.
    _seat: Option<super::shard::Seat>,
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl PeerStream {
    pub fn new(inner: UnixStream) -> Self {
        let peer = getsockopt(&inner, PeerCredentials).ok().map(|c| PeerInfo {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        });
        LazyLock::force(&EPOCH);
        Self {
            inner,
            caller: Caller {
                peer,
                heard: Arc::default(),
            },
            _slot: None,
            _seat: None,
            handshake: None,
        }
    }

    pub fn peer(&self) -> Option<PeerInfo> {
        self.caller.peer
    }

    /// Holds `slot` for the connection's life; the peer must start talking
    /// within `handshake`.
    pub fn admitted(mut self, slot: OwnedSemaphorePermit, handshake: Duration) -> Self {
        self._slot = Some(slot);
        self.handshake = Some(Box::pin(tokio::time::sleep(handshake)));
        self
    }

    /// Counted by the Mount thread that will serve it.
    pub fn seated(mut self, seat: super::shard::Seat) -> Self {
        self._seat = Some(seat);
        self
    }

    /// Moves the connection to the reactor and timer of the runtime this is
    /// called on (the Mount thread that serves it); the handshake deadline
    /// is kept.
    pub fn rehome(self) -> io::Result<Self> {
        let Self {
            inner,
            caller,
            _slot,
            _seat,
            handshake,
        } = self;
        let inner = UnixStream::from_std(inner.into_std()?)?;
        let handshake =
            handshake.map(|h| Box::pin(tokio::time::sleep_until(h.as_ref().deadline())));
        Ok(Self {
            inner,
            caller,
            _slot,
            _seat,
            handshake,
        })
    }
}

impl Connected for PeerStream {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.caller.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let delivered = matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before;
        if delivered {
            this.caller.heard_now();
        }
        if let Some(deadline) = this.handshake.as_mut() {
            match &polled {
                Poll::Ready(Ok(())) if delivered => this.handshake = None,
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer sent nothing within the handshake window",
                    )));
                }
                _ => {}
            }
        }
        polled
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

    /// The uids allowed to call.
    pub fn allowed(&self) -> Arc<BTreeSet<u32>> {
        Arc::clone(&self.allowed)
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
        let peer = req.extensions().get::<Caller>().and_then(|c| c.peer);
        match peer {
            Some(p) if self.allowed.contains(&p.uid) => {}
            Some(p) => {
                if let Some(suppressed) = REFUSALS.allow() {
                    tracing::warn!(
                        uid = p.uid,
                        pid = p.pid,
                        suppressed,
                        "refused a call from a peer uid that is not allowed"
                    );
                }
                return Some(tonic::Status::permission_denied(format!(
                    "peer uid {} may not call this provider (allowed: {:?}; see --allowed-uids)",
                    p.uid, self.allowed
                )));
            }
            None => {
                if let Some(suppressed) = REFUSALS.allow() {
                    tracing::warn!(
                        suppressed,
                        "refused a call whose peer credentials cannot be read"
                    );
                }
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
            if let Some(suppressed) = REFUSALS.allow() {
                tracing::warn!(authority = %crate::error::shown(&authority), suppressed, "refused a call with an unexpected :authority");
            }
            return Some(tonic::Status::permission_denied(format!(
                ":authority {} is not {AUTHORITY:?}, which the driver always sends",
                crate::error::shown(&authority)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The accept loop's runtime admits a connection; a Mount thread's
    /// runtime serves it. Moved, it reads there, and the handshake window
    /// that began at admission still closes it.
    #[test]
    fn a_moved_connection_works_on_its_new_runtime_and_keeps_its_handshake_deadline() {
        use std::sync::Arc;
        use tokio::sync::Semaphore;
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let (accepting, serving) = (runtime(), runtime());
        let window = Duration::from_millis(300);
        let admit = |stream| {
            let slot = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
            PeerStream::new(stream).admitted(slot, window)
        };

        // Talks in time: served on the other runtime.
        let (talker, mut talker_peer) = accepting.block_on(async { UnixStream::pair() }).unwrap();
        let talker = accepting.block_on(async { admit(talker) });
        serving.block_on(async {
            let mut stream = talker.rehome().unwrap();
            talker_peer.write_all(b"hello").await.unwrap();
            let mut buf = [0u8; 8];
            let n = stream.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"hello");
            assert!(stream.connect_info().last_heard().is_some());
            // Past the window, a connection that talked stays open.
            tokio::time::sleep(window * 2).await;
            talker_peer.write_all(b"again").await.unwrap();
            let n = stream.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"again");
        });

        // Silent: closed when the window that began at admission ends.
        let (silent, _silent_peer) = accepting.block_on(async { UnixStream::pair() }).unwrap();
        let admitted_at = Instant::now();
        let silent = accepting.block_on(async { admit(silent) });
        serving.block_on(async {
            let mut stream = silent.rehome().unwrap();
            let mut buf = [0u8; 8];
            let err = tokio::time::timeout(window * 10, stream.read(&mut buf))
                .await
                .expect("the handshake window did not close the connection")
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut);
            let waited = admitted_at.elapsed();
            assert!(waited >= window && waited < window * 10, "{waited:?}");
        });
    }

    #[tokio::test]
    async fn a_connection_knows_when_it_last_delivered_bytes() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut stream = PeerStream::new(ours);
        let caller = stream.connect_info();
        assert_eq!(
            caller.peer.map(|p| p.uid),
            Some(nix::unistd::getuid().as_raw())
        );
        assert_eq!(caller.last_heard(), None, "nothing read yet");

        let sent = Instant::now();
        theirs.write_all(b"first").await.unwrap();
        let mut buf = [0u8; 16];
        let n = stream.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"first");
        let first = caller.last_heard().expect("a read was recorded");
        assert!(first >= sent && first <= Instant::now());

        // A later read moves it on; the clone every request gets sees it.
        theirs.write_all(b"second").await.unwrap();
        let _ = stream.read(&mut buf).await.unwrap();
        let second = stream.connect_info().last_heard().unwrap();
        assert!(second >= first);
        assert_eq!(caller.last_heard(), Some(second));

        // End of stream delivers nothing and changes nothing.
        drop(theirs);
        assert_eq!(stream.read(&mut buf).await.unwrap(), 0);
        assert_eq!(caller.last_heard(), Some(second));
    }
}
