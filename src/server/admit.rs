//! Connection admission for both listeners. Neither the provider socket nor
//! the health port may be exhausted by a caller, and neither may starve the
//! other:
//! - accept errors (EMFILE, ENFILE, ENOBUFS) back off instead of spinning;
//! - each listener has its own connection cap, well below the process's
//!   file-descriptor limit (which start-up raises to its hard limit), so a
//!   flood on the health port cannot take the descriptors the provider
//!   socket needs;
//! - the provider socket gives uids that may not call a tiny pool of their
//!   own (they are told PermissionDenied, and cannot crowd out the driver),
//!   and closes connections that send nothing within a handshake window;
//! - the health port caps connections per client address, bounds how long
//!   a request's headers may take and how long a connection may live.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::peer::PeerStream;
use crate::logging::Throttle;
use crate::metrics::{ConnectionLabels, METRICS};

/// Connections the provider socket holds at once (the driver uses one).
pub const PROVIDER_CONNECTIONS: usize = 64;
/// Connections from uids that may not call: enough for them to be told
/// PermissionDenied (the guard answers without running a Mount), too few
/// to cost anything.
pub const STRANGER_CONNECTIONS: usize = 4;
/// A provider connection must start talking within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Health-port connections at once, and per client address.
pub const HEALTH_CONNECTIONS: usize = 256;
pub const HEALTH_CONNECTIONS_PER_CLIENT: usize = 8;
/// How long a health request's headers may take to arrive.
pub const HEALTH_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one health connection may live (keep-alive included).
pub const HEALTH_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Waits after accept errors, doubling from 5 ms to 1 s, so a full
/// descriptor table costs a few wake-ups per second instead of a core.
#[derive(Debug, Default)]
pub struct Backoff {
    current: Option<Duration>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    pub fn failed(&mut self) -> Duration {
        let next = match self.current {
            None => Self::FIRST,
            Some(d) => (d * 2).min(Self::MAX),
        };
        self.current = Some(next);
        next
    }

    pub fn succeeded(&mut self) {
        self.current = None;
    }
}

fn refused(listener: &'static str, reason: &'static str) {
    METRICS
        .refused_connections
        .get_or_create(&ConnectionLabels { listener, reason })
        .inc();
}

static ACCEPT_ERRORS: Throttle = Throttle::new(Duration::from_secs(10));

async fn accept_failed(listener: &'static str, e: &io::Error, backoff: &mut Backoff) {
    refused(listener, "accept_error");
    if let Some(suppressed) = ACCEPT_ERRORS.allow() {
        tracing::warn!(listener, error = %e, suppressed, "cannot accept connections; backing off");
    }
    tokio::time::sleep(backoff.failed()).await;
}

static REFUSED_UIDS: Throttle = Throttle::new(Duration::from_secs(10));

/// The provider socket's connections: only allowed uids, at most
/// [`PROVIDER_CONNECTIONS`] at once; errors never reach tonic (which would
/// retry at once and spin).
pub fn provider_incoming(
    listener: UnixListener,
    allowed: Arc<BTreeSet<u32>>,
) -> impl Stream<Item = io::Result<PeerStream>> {
    let slots = Arc::new(Semaphore::new(PROVIDER_CONNECTIONS));
    let strangers = Arc::new(Semaphore::new(STRANGER_CONNECTIONS));
    futures::stream::unfold(
        (listener, (slots, strangers), Backoff::default()),
        move |(listener, (slots, strangers), mut backoff)| {
            let allowed = Arc::clone(&allowed);
            async move {
                loop {
                    let stream = match listener.accept().await {
                        Ok((stream, _)) => {
                            backoff.succeeded();
                            stream
                        }
                        Err(e) => {
                            accept_failed("provider", &e, &mut backoff).await;
                            continue;
                        }
                    };
                    let stream = PeerStream::new(stream);
                    let welcome = stream.peer().is_some_and(|p| allowed.contains(&p.uid));
                    let pool = if welcome { &slots } else { &strangers };
                    let Ok(permit) = Arc::clone(pool).try_acquire_owned() else {
                        refused("provider", if welcome { "limit" } else { "uid" });
                        if !welcome {
                            if let Some(suppressed) = REFUSED_UIDS.allow() {
                                let peer = stream.peer();
                                tracing::warn!(
                                    uid = peer.map(|p| p.uid),
                                    pid = peer.map(|p| p.pid),
                                    suppressed,
                                    "closed a connection from a peer uid that may not call (see --allowed-uids)"
                                );
                            }
                        }
                        continue;
                    };
                    let stream = stream.admitted(permit, HANDSHAKE_TIMEOUT);
                    return Some((Ok(stream), (listener, (slots, strangers), backoff)));
                }
            }
        },
    )
}

/// Connections per client address on the health port.
#[derive(Default)]
struct PerClient(Mutex<HashMap<IpAddr, usize>>);

/// Releases a client's slot when its connection ends.
struct ClientSlot {
    table: Arc<PerClient>,
    ip: IpAddr,
    _global: OwnedSemaphorePermit,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.0.lock() {
            if let Some(n) = t.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    t.remove(&self.ip);
                }
            }
        }
    }
}

impl PerClient {
    fn admit(self: &Arc<Self>, ip: IpAddr, global: OwnedSemaphorePermit) -> Option<ClientSlot> {
        let mut t = self.0.lock().ok()?;
        let n = t.entry(ip).or_insert(0);
        if *n >= HEALTH_CONNECTIONS_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: Arc::clone(self),
            ip,
            _global: global,
        })
    }
}

/// Serves `router` on the health port until `stop` turns true.
pub async fn serve_health(
    listener: TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let global = Arc::new(Semaphore::new(HEALTH_CONNECTIONS));
    let clients = Arc::new(PerClient::default());
    let mut backoff = Backoff::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, addr) = match accepted {
            Ok(a) => {
                backoff.succeeded();
                a
            }
            Err(e) => {
                accept_failed("health", &e, &mut backoff).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&global).try_acquire_owned() else {
            refused("health", "limit");
            continue;
        };
        let Some(slot) = clients.admit(addr.ip(), permit) else {
            refused("health", "limit");
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEALTH_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(HEALTH_CONNECTION_LIFETIME) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HEALTH_HEADER_TIMEOUT, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..12).map(|_| b.failed()).collect();
        assert_eq!(waits[0], Duration::from_millis(5));
        assert_eq!(waits[1], Duration::from_millis(10));
        assert_eq!(*waits.last().unwrap(), Duration::from_secs(1));
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(5));
    }
}
