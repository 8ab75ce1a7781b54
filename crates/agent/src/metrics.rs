//! The agent's own Prometheus metrics, on an optional local port (`metrics = "ADDR"`):
//! outbox depth, battery write latency, and boundary lateness (when a period's setpoint was
//! in effect, minus the period's start).
//!
//! The endpoint is a few lines of HTTP/1.1 over tokio rather than a web framework: it answers
//! one `GET /metrics` per connection, and the agent-only build for the Pi stays small.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::AgentError;

/// A request head larger than this is refused; a scrape is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// A client that says nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent's metrics.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    outbox: Gauge,
    write_latency: Histogram,
    lateness: Histogram,
}

impl Default for AgentMetrics {
    fn default() -> AgentMetrics {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    /// Every metric at zero.
    pub fn new() -> AgentMetrics {
        let outbox = Gauge::default();
        // Seconds: 0.1 ms .. 5 s. A simulated write is microseconds, a Modbus one milliseconds.
        let write_latency = Histogram::new([
            0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
        ]);
        // Real seconds after the boundary: 0.1 ms .. 10 s.
        let lateness = Histogram::new([
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 10.0,
        ]);
        let mut registry = Registry::default();
        registry.register(
            "max300_agent_outbox_depth",
            "Acks and reports stored and not yet receipted by the cloud",
            outbox.clone(),
        );
        registry.register(
            "max300_agent_battery_write_seconds",
            "Time to write a setpoint to the battery controller",
            write_latency.clone(),
        );
        registry.register(
            "max300_agent_boundary_lateness_seconds",
            "Real seconds from a period's start to its setpoint being read back in effect",
            lateness.clone(),
        );
        AgentMetrics {
            registry,
            outbox,
            write_latency,
            lateness,
        }
    }

    /// The outbox holds `n` entries.
    pub fn outbox(&self, n: u64) {
        self.outbox.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// One controller write took `took`.
    pub fn battery_write(&self, took: Duration) {
        self.write_latency.observe(took.as_secs_f64());
    }

    /// A period's setpoint took effect `real_seconds` after its start.
    pub fn boundary_lateness(&self, real_seconds: f64) {
        self.lateness.observe(real_seconds.max(0.0));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Binds `addr` and serves `GET /metrics` until shutdown. Returns the bound address (port 0
/// picks a free one).
pub async fn serve(
    addr: &str,
    metrics: Arc<AgentMetrics>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, AgentError> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| AgentError::Config(format!("metrics: {addr:?} is not host:port")))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| AgentError::Config(format!("metrics: cannot listen on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| AgentError::Config(format!("metrics: {e}")))?;
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "metrics: accept failed");
                        continue;
                    }
                },
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &metrics).await {
                    debug!(%peer, error = %e, "metrics: request not answered");
                }
            });
        }
    });
    Ok(bound)
}

async fn answer(mut stream: TcpStream, metrics: &AgentMetrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", "").await;
        }
        let n = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (parts.next(), parts.next());
    match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => {
            respond(&mut stream, "200 OK", &metrics.render()).await
        }
        (Some(b"GET"), _) => respond(&mut stream, "404 Not Found", "only /metrics is here\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "only GET\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_the_metrics_and_nothing_else() {
        let metrics = Arc::new(AgentMetrics::new());
        metrics.outbox(3);
        metrics.battery_write(Duration::from_micros(300));
        metrics.boundary_lateness(0.002);
        let shutdown = CancellationToken::new();
        let addr = serve("127.0.0.1:0", metrics, shutdown.clone())
            .await
            .unwrap();
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("max300_agent_outbox_depth 3"), "{ok}");
        assert!(
            ok.contains("max300_agent_battery_write_seconds_count 1"),
            "{ok}"
        );
        assert!(
            ok.contains("max300_agent_boundary_lateness_seconds_count 1"),
            "{ok}"
        );
        let other = get(addr, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let post = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_bad_address_is_a_clear_error() {
        let e = serve(
            "nowhere",
            Arc::new(AgentMetrics::new()),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("metrics"), "{e}");
    }
}
