//! The agent's own Prometheus metrics, on an optional local port (`metrics = "ADDR"`):
//! outbox depth, battery write latency, and boundary lateness (when a period's setpoint was
//! in effect, minus the period's start).
//!
//! The endpoint is hyper's HTTP/1 server with no framework on top (hyper is linked in the
//! agent-only build anyway, by the OTLP exporter's client, so the Pi binary stays small). It
//! answers `GET /metrics`, one request per connection, as a scrape is.

use max300_protocol::error::Chain;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::AgentError;

/// A request head larger than this is refused (431); a scrape is a few hundred bytes. It is
/// also the smallest read buffer hyper allows.
const MAX_REQUEST: usize = 8 * 1024;
/// A client that has not sent its request head after this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// At shutdown, answers already started get this long to finish.
const DRAIN: Duration = Duration::from_secs(1);
/// The Prometheus text format.
const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

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
        .map_err(|cause| AgentError::Io {
            what: format!("metrics: cannot listen on {addr}"),
            cause,
        })?;
    let bound = listener.local_addr().map_err(|cause| AgentError::Io {
        what: "metrics: the listener has no address".into(),
        cause,
    })?;
    tokio::spawn(accept(listener, metrics, shutdown));
    Ok(bound)
}

/// Accepts connections until shutdown, then closes the listener and gives the answers in
/// flight [`DRAIN`] to finish; a connection still open after that is not waited for.
async fn accept(listener: TcpListener, metrics: Arc<AgentMetrics>, shutdown: CancellationToken) {
    let mut http = http1::Builder::new();
    http.keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %Chain(&e), "metrics: accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let service = service_fn(move |request: Request<_>| {
            std::future::ready(Ok::<_, Infallible>(answer(&request, &metrics)))
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%peer, error = %Chain(&e), "metrics: request not answered");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("metrics: answers still in flight at shutdown");
    }
}

/// The response to one request: the metrics, or why not.
fn answer<B>(request: &Request<B>, metrics: &AgentMetrics) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => respond(StatusCode::OK, metrics.render()),
        (&Method::GET, _) => respond(StatusCode::NOT_FOUND, "only /metrics is here\n".into()),
        _ => {
            let mut response = respond(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET"));
            response
        }
    }
}

fn respond(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_TEXT));
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// A metrics server on a free port, with its shutdown.
    async fn serving() -> (SocketAddr, CancellationToken) {
        let shutdown = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0",
            Arc::new(AgentMetrics::new()),
            shutdown.clone(),
        )
        .await
        .unwrap();
        (addr, shutdown)
    }

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
        let post = get(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(post.to_lowercase().contains("allow: get"), "{post}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_scrape_is_prometheus_text_on_a_closed_connection() {
        let (addr, shutdown) = serving().await;
        // HTTP/1.1 would keep the connection open: get() reads until the server closes it.
        let ok = get(
            addr,
            "GET /metrics?from=prometheus HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await;
        let head = ok.to_lowercase();
        assert!(head.starts_with("http/1.1 200 ok"), "{ok}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{ok}"
        );
        assert!(head.contains("connection: close"), "{ok}");
        assert!(ok.contains("max300_agent_outbox_depth 0"), "{ok}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_refused() {
        let (addr, shutdown) = serving().await;
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(2 * MAX_REQUEST)
        );
        let refused = get(addr, &huge).await;
        assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn shutdown_closes_the_port() {
        let (addr, shutdown) = serving().await;
        assert!(
            get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 200")
        );
        shutdown.cancel();
        // The accept task drops the listener as soon as it sees the cancel.
        tokio::time::timeout(Duration::from_secs(5), async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the listener is closed after shutdown");
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
