//! Mount-serving threads. Each provider connection is served, from its first
//! frame to its last, by one thread (a runtime with one worker); the accept
//! loop hands a new connection to the thread with the fewest.
//!
//! Why: the driver multiplexes every pod's Mount over one connection. On a
//! work-stealing runtime each Mount's stream task was stolen by the other
//! worker and the connection task bounced between cores after it: measured
//! at 8 callers on one connection, about a quarter more daemon CPU per
//! Mount than one worker doing it all. One thread per connection keeps a
//! connection, its streams and its socket on one core, while several
//! connections still spread over the cores. Work that grows with its input
//! (large parses, templates, large files) leaves these threads for the
//! blocking pool, as it did the runtime's workers (see `work`).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::sync::{mpsc, watch};

use super::peer::PeerStream;

/// Threads by default: one per CPU this process may use (which respects a
/// cgroup CPU limit), at most this many. The driver holds one connection,
/// so more would sit idle.
pub const MAX_DEFAULT_THREADS: usize = 8;
/// Blocking threads all Mount threads may hold together (the async
/// runtime's bound before connections had threads of their own).
const BLOCKING_THREADS: usize = 32;
/// Connections handed to a thread and not yet taken up by it.
const HANDOFF_QUEUE: usize = 16;

/// How many Mount threads to run for `--worker-threads`.
pub fn thread_count(configured: Option<u16>) -> usize {
    match configured {
        // At least 1: the flag's parser and `start` both see to it.
        Some(n) => usize::from(n),
        None => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_DEFAULT_THREADS),
    }
}

/// The connections one Mount thread serves: handed over by the accept
/// loop, registered with that thread's own reactor as they are taken.
pub type Incoming = BoxStream<'static, io::Result<PeerStream>>;

/// Counts a thread's connection until the connection is dropped.
pub struct Seat(Arc<AtomicUsize>);

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Thread {
    handoff: mpsc::Sender<PeerStream>,
    connections: Arc<AtomicUsize>,
}

/// The Mount threads' connection hand-offs.
pub struct Shards {
    threads: Vec<Thread>,
}

/// The Mount threads' runtimes: shut down (without waiting on them) when
/// dropped, which is allowed in async code where dropping a runtime is not.
pub struct Runtimes(Vec<tokio::runtime::Runtime>);

impl Drop for Runtimes {
    fn drop(&mut self) {
        for runtime in self.0.drain(..) {
            runtime.shutdown_background();
        }
    }
}

/// How one Mount thread's server ended (a panic is a join error).
pub type Finished<E> = tokio::task::JoinHandle<Result<(), E>>;

impl Shards {
    /// Starts `count` threads, each running `serve(its incoming connections)`
    /// until it ends. Each is a runtime of one worker: on a single-threaded
    /// runtime, where the server's own loop shares the thread with its
    /// connections, the same load cost a third more CPU per Mount.
    pub fn start<F, Fut, E>(
        count: usize,
        serve: F,
    ) -> io::Result<(Shards, Vec<Finished<E>>, Runtimes)>
    where
        F: Fn(Incoming) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Send + 'static,
    {
        let count = count.max(1);
        let mut threads = Vec::with_capacity(count);
        let mut finished = Vec::with_capacity(count);
        let mut runtimes = Runtimes(Vec::with_capacity(count));
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(format!("coffer-mounts-{i}"))
                .enable_all()
                .max_blocking_threads((BLOCKING_THREADS / count).max(2))
                .build()?;
            let (handoff, mut taken) = mpsc::channel::<PeerStream>(HANDOFF_QUEUE);
            let incoming: Incoming = futures::stream::poll_fn(move |cx| taken.poll_recv(cx))
                .map(PeerStream::rehome)
                .boxed();
            finished.push(runtime.spawn(serve(incoming)));
            runtimes.0.push(runtime);
            threads.push(Thread {
                handoff,
                connections: Arc::default(),
            });
        }
        Ok((Shards { threads }, finished, runtimes))
    }

    /// Hands each connection of `incoming` to the thread serving the fewest
    /// until `stop` turns true.
    pub async fn dispatch(
        self,
        incoming: impl Stream<Item = io::Result<PeerStream>>,
        mut stop: watch::Receiver<bool>,
    ) {
        tokio::pin!(incoming);
        loop {
            let next = tokio::select! {
                next = incoming.next() => next,
                _ = stop.wait_for(|s| *s) => return,
            };
            match next {
                Some(Ok(conn)) => self.hand_over(conn).await,
                Some(Err(_)) => continue,
                None => return,
            }
        }
    }

    /// The least-loaded thread that is still running takes `conn`.
    async fn hand_over(&self, mut conn: PeerStream) {
        let mut order: Vec<&Thread> = self.threads.iter().collect();
        order.sort_by_key(|t| t.connections.load(Ordering::Acquire));
        for thread in order {
            thread.connections.fetch_add(1, Ordering::AcqRel);
            let seated = conn.seated(Seat(Arc::clone(&thread.connections)));
            match thread.handoff.send(seated).await {
                Ok(()) => return,
                // That thread has ended (its seat was given back with the
                // connection it did not take): try the next.
                Err(mpsc::error::SendError(back)) => conn = back,
            }
        }
        tracing::error!("no Mount thread is running; closed a provider connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::UnixStream;

    /// Which thread served each connection, in the order they were handed
    /// over, with the connections kept open.
    #[tokio::test]
    async fn connections_go_to_the_thread_with_the_fewest_and_are_served_there() {
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, String, PeerStream)>();
        let ids = Arc::new(AtomicUsize::new(0));
        let (shards, finished, runtimes) = Shards::start(2, move |mut incoming: Incoming| {
            let tx = tx.clone();
            let id = ids.fetch_add(1, Ordering::SeqCst);
            async move {
                while let Some(conn) = incoming.next().await {
                    let name = std::thread::current().name().unwrap_or("").to_string();
                    // Registered with this thread's reactor: usable here.
                    let conn = conn.map_err(|_| ())?;
                    let _ = tx.send((id, name, conn));
                }
                Ok::<(), ()>(())
            }
        })
        .unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let (conns_tx, conns_rx) = mpsc::channel::<io::Result<PeerStream>>(8);
        let dispatcher = tokio::spawn(
            shards.dispatch(tokio_stream::wrappers::ReceiverStream::new(conns_rx), stop),
        );
        let mut peers = Vec::new();
        let mut served = Vec::new();
        for _ in 0..4 {
            let (ours, theirs) = UnixStream::pair().unwrap();
            peers.push(theirs);
            conns_tx.send(Ok(PeerStream::new(ours))).await.unwrap();
            served.push(rx.recv().await.unwrap());
        }
        let threads: Vec<usize> = served.iter().map(|(id, _, _)| *id).collect();
        assert_eq!(
            threads.iter().filter(|&&t| t == threads[0]).count(),
            2,
            "{threads:?}"
        );
        assert!(served
            .iter()
            .all(|(_, name, _)| name.starts_with("coffer-mounts-")));
        // A closed connection frees its seat: the next goes where it was.
        let (first_thread, _, first) = served.remove(0);
        drop(first);
        // The seat is given back when the stream is dropped (here, at once).
        let (ours, theirs) = UnixStream::pair().unwrap();
        peers.push(theirs);
        conns_tx.send(Ok(PeerStream::new(ours))).await.unwrap();
        let (next_thread, _, _) = rx.recv().await.unwrap();
        assert_eq!(next_thread, first_thread);

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), dispatcher)
            .await
            .unwrap()
            .unwrap();
        // The dispatcher is gone with its senders: each thread's server ends.
        for f in finished {
            let ended = tokio::time::timeout(Duration::from_secs(5), f).await;
            assert!(matches!(ended, Ok(Ok(Ok(())))));
        }
        drop(runtimes);
    }
}
