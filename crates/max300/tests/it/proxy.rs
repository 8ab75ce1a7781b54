//! A TCP fault proxy for fault tests: it sits between one agent and the broker and can cut,
//! stall or slow that agent's link while everything else keeps running.
//!
//! ```text
//!  agent ──▶ FaultProxy (127.0.0.1:port 0) ──▶ upstream (the broker)
//!              cut():     RST every open connection, reset new ones on accept
//!              stall():   keep connections open, forward nothing (bytes wait, none are lost)
//!              delay(d):  every chunk leaves at least d after it arrived
//!              restore(): forward normally again, no delay
//! ```
//!
//! The proxy runs on its own thread with its own single-thread tokio runtime, so it works the
//! same from a plain `#[test]`, a current-thread `#[tokio::test]` or a multi-thread one, and
//! dropping it never drops a runtime inside an async context. Dropping it stops the thread
//! and closes the listener and every connection before `drop` returns.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use max300_protocol::clock::monotonic;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The most a direction reads at once.
const CHUNK: usize = 16 * 1024;
/// Chunks a direction holds between reading and forwarding (delayed or stalled). When full,
/// the proxy stops reading and TCP flow control holds the rest at the sender.
const CHUNKS_HELD: usize = 64;

/// What the proxy does to traffic right now; every connection follows changes at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Faults {
    link: Link,
    delay: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Up,
    Stalled,
    Cut,
}

/// Counters since the proxy started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted, including those reset at once because the link was cut.
    pub accepted: u64,
    /// Bytes forwarded from clients to the upstream.
    pub bytes_to_upstream: u64,
    /// Bytes forwarded from the upstream to clients.
    pub bytes_to_client: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
}

/// A TCP proxy on loopback port 0 that forwards every connection to one upstream address and
/// injects faults on command. Drop stops it.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    faults: watch::Sender<Faults>,
    counters: Arc<Counters>,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 port 0 and forwards to `upstream`. The listener is bound before
    /// this returns, so clients may connect to [`FaultProxy::addr`] at once.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the proxy's address");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the proxy's runtime");
        let (faults, faults_rx) = watch::channel(Faults {
            link: Link::Up,
            delay: Duration::ZERO,
        });
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn({
                let counters = counters.clone();
                let stop = stop.clone();
                move || {
                    runtime.block_on(serve(listener, upstream, faults_rx, counters, stop));
                    // Dropping the runtime here drops every connection task, closing its
                    // sockets, before the thread ends and `drop` returns.
                    drop(runtime);
                }
            })
            .expect("the proxy's thread");
        FaultProxy {
            addr,
            faults,
            counters,
            stop,
            thread: Some(thread),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resets every open connection (RST) and resets each new one as soon as it is
    /// accepted, until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.faults.send_modify(|f| f.link = Link::Cut);
    }

    /// Keeps connections open but forwards nothing either way until
    /// [`FaultProxy::restore`]; what arrives meanwhile is held and forwarded after.
    pub fn stall(&self) {
        self.faults.send_modify(|f| f.link = Link::Stalled);
    }

    /// Holds every chunk read from now on for at least `delay` before forwarding it, each
    /// way. `Duration::ZERO` removes the delay.
    pub fn delay(&self, delay: Duration) {
        self.faults.send_modify(|f| f.delay = delay);
    }

    /// Forwards normally again: no cut, no stall, no delay.
    pub fn restore(&self) {
        self.faults.send_modify(|f| {
            *f = Faults {
                link: Link::Up,
                delay: Duration::ZERO,
            }
        });
    }

    /// The counters so far.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            accepted: self.counters.accepted.load(Ordering::SeqCst),
            bytes_to_upstream: self.counters.to_upstream.load(Ordering::SeqCst),
            bytes_to_client: self.counters.to_client.load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            // Blocks briefly, even inside an async test: the proxy thread needs nothing from
            // the caller's runtime to finish.
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    upstream: SocketAddr,
    faults: watch::Receiver<Faults>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let listener = TcpListener::from_std(listener).expect("register the proxy's listener");
    loop {
        let client = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let client = match client {
            Ok((client, _)) => client,
            // Such as too many open files: the next accept may well succeed.
            Err(_) => continue,
        };
        counters.accepted.fetch_add(1, Ordering::SeqCst);
        if faults.borrow().link == Link::Cut {
            reset(&client);
            continue;
        }
        // Each connection task ends when either side closes, or when the runtime is
        // dropped at the end of the proxy's thread.
        tokio::spawn(relay(client, upstream, faults.clone(), counters.clone()));
    }
}

/// Makes closing `stream` send RST rather than FIN, as a cut link would look to the peer.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    faults: watch::Receiver<Faults>,
    counters: Arc<Counters>,
) {
    let upstream = tokio::select! {
        connected = TcpStream::connect(upstream) => connected,
        () = until_cut(faults.clone()) => Err(io::ErrorKind::ConnectionAborted.into()),
    };
    let Ok(mut upstream) = upstream else {
        reset(&client);
        return;
    };
    let cut = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let both_ways = async {
            tokio::try_join!(
                pipe(
                    client_read,
                    upstream_write,
                    faults.clone(),
                    &counters.to_upstream
                ),
                pipe(
                    upstream_read,
                    client_write,
                    faults.clone(),
                    &counters.to_client
                ),
            )
        };
        tokio::select! {
            _ = both_ways => false,
            () = until_cut(faults.clone()) => true,
        }
    };
    if cut {
        reset(&client);
        reset(&upstream);
    }
}

/// Resolves when the link is cut (or the proxy is going away).
async fn until_cut(mut faults: watch::Receiver<Faults>) {
    let _ = faults.wait_for(|f| f.link == Link::Cut).await;
}

/// Forwards one direction until EOF, then passes the EOF on. Reading and forwarding are
/// apart, so a delay holds each chunk for `delay` after it arrived rather than adding up.
async fn pipe(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    faults: watch::Receiver<Faults>,
    forwarded: &AtomicU64,
) -> io::Result<()> {
    let (held, mut due) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_HELD);
    let read = {
        let faults = faults.clone();
        async move {
            let mut buf = vec![0; CHUNK];
            loop {
                let n = from.read(&mut buf).await?;
                if n == 0 {
                    // Dropping `held` tells the forwarder the stream ended.
                    return Ok::<_, io::Error>(());
                }
                let at = monotonic() + faults.borrow().delay;
                if held.send((at, buf[..n].to_vec())).await.is_err() {
                    return Ok(());
                }
            }
        }
    };
    let forward = async move {
        let mut faults = faults;
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at.into()).await;
            // Stalled (or cut: the relay is about to drop this): wait for the link.
            if faults.wait_for(|f| f.link == Link::Up).await.is_err() {
                return Ok(());
            }
            // Counted before the write, so a peer that has the bytes sees them counted.
            forwarded.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(read, forward).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long a test waits for something that should happen.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// An echo server on port 0; it stops with the test's runtime.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn connect(proxy: &FaultProxy) -> TcpStream {
        tokio::time::timeout(PATIENCE, TcpStream::connect(proxy.addr()))
            .await
            .unwrap()
            .unwrap()
    }

    async fn round_trip(stream: &mut TcpStream, text: &[u8]) {
        stream.write_all(text).await.unwrap();
        let mut back = vec![0; text.len()];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut back))
            .await
            .expect("the echo comes back")
            .unwrap();
        assert_eq!(back, text);
    }

    /// Waits for the stream to end, by EOF or by an error such as a reset.
    async fn assert_closed(stream: &mut TcpStream) {
        let mut buf = [0; 64];
        let ended = tokio::time::timeout(PATIENCE, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    // Bytes in flight before the cut may still arrive; keep reading.
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the connection stays open");
    }

    #[tokio::test]
    async fn bytes_pass_through_both_ways_and_are_counted() {
        let proxy = FaultProxy::start(echo_server().await);
        let mut stream = connect(&proxy).await;
        round_trip(&mut stream, b"hello").await;
        round_trip(&mut stream, &[7; 100_000]).await;
        assert_eq!(
            proxy.stats(),
            ProxyStats {
                accepted: 1,
                bytes_to_upstream: 100_005,
                bytes_to_client: 100_005,
            }
        );
    }

    // Multi-thread, as the fault suite runs: the proxy is dropped inside that runtime too.
    #[tokio::test(flavor = "multi_thread")]
    async fn cut_resets_open_connections_and_refuses_new_ones_until_restore() {
        let proxy = FaultProxy::start(echo_server().await);
        let mut open = connect(&proxy).await;
        round_trip(&mut open, b"before").await;

        proxy.cut();
        assert_closed(&mut open).await;
        // The kernel completes the handshake and the proxy then resets it: the client sees
        // either a failed connect or a connection that ends at once.
        let refused = tokio::time::timeout(PATIENCE, TcpStream::connect(proxy.addr()))
            .await
            .unwrap();
        if let Ok(mut refused) = refused {
            assert_closed(&mut refused).await;
        }

        proxy.restore();
        let mut again = connect(&proxy).await;
        round_trip(&mut again, b"after").await;
        assert_eq!(proxy.stats().accepted, 3);
    }

    #[tokio::test]
    async fn stall_holds_bytes_and_releases_them_after_restore() {
        let proxy = FaultProxy::start(echo_server().await);
        let mut stream = connect(&proxy).await;
        round_trip(&mut stream, b"flowing").await;
        let before = proxy.stats();

        proxy.stall();
        stream.write_all(b"held").await.unwrap();
        // Nothing may come back while stalled. Absence can only be checked for a while.
        let mut back = [0; 4];
        let early = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut back)).await;
        assert!(early.is_err(), "bytes passed a stalled link: {early:?}");
        assert_eq!(proxy.stats(), before);

        proxy.restore();
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut back))
            .await
            .expect("the held bytes arrive after restore")
            .unwrap();
        assert_eq!(&back, b"held");
    }

    #[tokio::test]
    async fn delay_adds_at_least_the_given_latency() {
        let proxy = FaultProxy::start(echo_server().await);
        let mut stream = connect(&proxy).await;
        let delay = Duration::from_millis(150);
        proxy.delay(delay);
        let sent = monotonic();
        round_trip(&mut stream, b"slow").await;
        // The request and the echo are each held for the delay.
        let took = monotonic().duration_since(sent);
        assert!(took >= 2 * delay, "{took:?}");
    }

    #[test]
    fn drop_closes_the_port_and_open_connections() {
        // A plain #[test]: the proxy needs no runtime of its caller's.
        let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = FaultProxy::start(echo.local_addr().unwrap());
        let addr = proxy.addr();
        let mut open = std::net::TcpStream::connect(addr).unwrap();
        open.set_read_timeout(Some(PATIENCE)).unwrap();
        drop(proxy);

        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "still listening"
        );
        let mut buf = [0; 8];
        match std::io::Read::read(&mut open, &mut buf) {
            Ok(0) => {}
            Err(e)
                if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::TimedOut => {
            }
            other => panic!("the connection outlived the proxy: {other:?}"),
        }
    }
}
