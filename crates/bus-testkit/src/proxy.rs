//! A loopback TCP proxy that can cut every connection through it and let them back later.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy on `127.0.0.1` in front of one target address, for fault injection.
///
/// [`cut`](Self::cut) drops every connection through the proxy at once, losing whatever bytes
/// were still in it, and refuses new connections (they are accepted and closed at once) until
/// [`restore`](Self::restore). To a client this looks like a network failure in the middle of
/// a stream of writes: some were delivered, the rest were not.
///
/// The proxy runs on the Tokio runtime it was started in and stops when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    address: SocketAddr,
    /// Whether the proxy is cut, and how many cuts there were. Every connection task watches
    /// it and ends at the first cut after it started, however short.
    cut: watch::Sender<(bool, u64)>,
    cuts: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    listener: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (cut, cut_rx) = watch::channel((false, 0));
        let accepted = Arc::new(AtomicU64::new(0));
        let task = {
            let accepted = accepted.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if cut_rx.borrow().0 {
                        drop(client);
                        continue;
                    }
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let cut_rx = cut_rx.clone();
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(target).await {
                            pump(client, server, cut_rx).await;
                        }
                    });
                }
            })
        };
        Ok(Self {
            address,
            cut,
            cuts: Arc::new(AtomicU64::new(0)),
            accepted,
            listener: task,
        })
    }

    /// The proxy's own address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A `nats://` URL for the proxy's address.
    pub fn url(&self) -> String {
        format!("nats://{}", self.address)
    }

    /// Drops every connection through the proxy and refuses new ones until
    /// [`restore`](Self::restore).
    pub fn cut(&self) {
        let generation = self.cuts.fetch_add(1, Ordering::Relaxed) + 1;
        self.cut.send_replace((true, generation));
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.send_modify(|state| state.0 = false);
    }

    /// How many times [`cut`](Self::cut) was called.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }

    /// How many connections the proxy has accepted and forwarded.
    pub fn connections_accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.listener.abort();
        self.cut.send_modify(|state| *state = (true, state.1 + 1));
    }
}

/// Copies bytes both ways until either side closes or the proxy is cut; then drops both
/// sockets without flushing, like a failed network path.
async fn pump(client: TcpStream, server: TcpStream, mut cut: watch::Receiver<(bool, u64)>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = tokio::io::copy(&mut client_read, &mut server_write);
    let downstream = tokio::io::copy(&mut server_read, &mut client_write);
    let cut_now = async {
        let (is_cut, born) = *cut.borrow_and_update();
        if is_cut {
            return;
        }
        loop {
            if cut.changed().await.is_err() {
                return;
            }
            let (is_cut, generation) = *cut.borrow_and_update();
            if is_cut || generation != born {
                return;
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
        _ = cut_now => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn forwards_then_cuts_then_forwards_again() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = socket.read(&mut buffer).await {
                        if n == 0 || socket.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = TcpProxy::start(target).await.unwrap();

        let mut a = TcpStream::connect(proxy.address()).await.unwrap();
        a.write_all(b"ping").await.unwrap();
        let mut reply = [0u8; 4];
        a.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"ping");

        proxy.cut();
        // The live connection is closed by the proxy: a read sees end of stream or an error.
        let mut rest = [0u8; 1];
        let n = a.read(&mut rest).await.unwrap_or(0);
        assert_eq!(n, 0, "a cut connection delivers nothing more");
        // A new connection is accepted and closed while cut.
        let mut b = TcpStream::connect(proxy.address()).await.unwrap();
        let _ = b.write_all(b"lost").await;
        assert_eq!(b.read(&mut rest).await.unwrap_or(0), 0);

        proxy.restore();
        let mut c = TcpStream::connect(proxy.address()).await.unwrap();
        c.write_all(b"back").await.unwrap();
        c.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"back");
        assert_eq!(proxy.cuts(), 1);
        assert_eq!(proxy.connections_accepted(), 2);
    }
}
