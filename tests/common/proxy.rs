//! A loopback TCP proxy that injects faults between coffer and a backend's
//! server: added latency, resets, half-open connections, slow-drip answers,
//! truncated answers. The mode can change while connections come and go.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Forward both ways untouched.
    Pass,
    /// Hold every chunk of the answer this long.
    Latency(Duration),
    /// Accept, then reset the connection at once.
    Reset,
    /// Accept and read, never answer, never close.
    HalfOpen,
    /// Forward the answer one byte at a time, this far apart.
    SlowDrip(Duration),
    /// Forward this many bytes of the answer, then close.
    Truncate(usize),
    /// Answer with bytes that are not HTTP.
    Garbage,
}

pub struct Proxy {
    pub addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    /// Open connections, closed when the fault changes so that pooled
    /// client connections meet the new fault too.
    open: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fault = Arc::new(Mutex::new(Fault::Pass));
        let open: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (f, o) = (Arc::clone(&fault), Arc::clone(&open));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mode = *f.lock().unwrap();
                let conn = tokio::spawn(handle(client, upstream, mode));
                let mut open = o.lock().unwrap();
                open.retain(|h| !h.is_finished());
                open.push(conn.abort_handle());
            }
        });
        Proxy {
            addr,
            fault,
            open,
            task,
        }
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies from now on: open connections are closed.
    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
        for conn in self.open.lock().unwrap().drain(..) {
            conn.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(mut client: TcpStream, upstream: SocketAddr, fault: Fault) {
    match fault {
        Fault::Reset => {
            // SO_LINGER 0: close sends RST.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            drop(client);
            return;
        }
        Fault::HalfOpen => {
            let mut sink = [0u8; 4096];
            while let Ok(n) = client.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
            // Keep the socket open until the peer leaves or the test ends.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        Fault::Garbage => {
            let mut buf = [0u8; 4096];
            let _ = client.read(&mut buf).await;
            let _ = client
                .write_all(b"\x16\x03\x01garbage that is not HTTP\r\n\r\n\xff\xfe")
                .await;
            return;
        }
        _ => {}
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async move {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        // Keep the answer direction going after the request is sent.
        std::future::pending::<()>().await;
    };
    let down = async move {
        answer(&mut sr, &mut cw, fault).await;
        let _ = cw.shutdown().await;
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

async fn answer(
    sr: &mut tokio::net::tcp::OwnedReadHalf,
    cw: &mut tokio::net::tcp::OwnedWriteHalf,
    fault: Fault,
) {
    let mut sent = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match sr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let ok = match fault {
            Fault::Latency(d) => {
                tokio::time::sleep(d).await;
                cw.write_all(chunk).await.is_ok()
            }
            Fault::SlowDrip(d) => {
                let mut ok = true;
                for b in chunk {
                    tokio::time::sleep(d).await;
                    if cw.write_all(&[*b]).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                ok
            }
            Fault::Truncate(limit) => {
                let take = limit.saturating_sub(sent).min(n);
                let ok = cw.write_all(&chunk[..take]).await.is_ok();
                sent += take;
                if sent >= limit {
                    break;
                }
                ok
            }
            _ => cw.write_all(chunk).await.is_ok(),
        };
        if !ok {
            break;
        }
    }
}
