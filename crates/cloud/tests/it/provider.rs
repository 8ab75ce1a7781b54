//! The provider client against a real HTTP server on port 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use max300_cloud::provider::ProviderClient;
use serde::Deserialize;

#[derive(Deserialize)]
struct DateQuery {
    date: Option<String>,
}

/// A provider that fails `failures` times with 503, then answers with the date it was asked.
async fn serve(failures: usize, body_bytes: usize) -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/tomorrow",
            get(
                move |State(calls): State<Arc<AtomicUsize>>, Query(q): Query<DateQuery>| async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    if n < failures {
                        return (StatusCode::SERVICE_UNAVAILABLE, "busy".to_owned());
                    }
                    let date = q.date.unwrap_or_default();
                    let pad = " ".repeat(body_bytes);
                    (StatusCode::OK, format!("{{\"schedule_date\":\"{date}\"}}{pad}"))
                },
            ),
        )
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/tomorrow"), calls)
}

#[tokio::test]
async fn sends_the_date_hint_and_retries_server_errors() {
    let (url, calls) = serve(2, 0).await;
    let client = ProviderClient::new(&url, 1024, Duration::from_secs(5)).unwrap();
    let body = client.fetch("2026-11-30".parse().unwrap()).await.unwrap();
    assert_eq!(&body[..], br#"{"schedule_date":"2026-11-30"}"#);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn gives_up_after_three_attempts_with_the_status_in_the_error() {
    let (url, calls) = serve(10, 0).await;
    let client = ProviderClient::new(&url, 1024, Duration::from_secs(5)).unwrap();
    let err = client
        .fetch("2026-11-30".parse().unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn refuses_a_body_over_the_limit_without_retrying() {
    let (url, calls) = serve(0, 5000).await;
    let client = ProviderClient::new(&url, 1024, Duration::from_secs(5)).unwrap();
    let err = client
        .fetch("2026-11-30".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("exceeds the limit of 1024 bytes"),
        "{err}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_unreachable_provider_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/tomorrow");
    let client = ProviderClient::new(&url, 1024, Duration::from_secs(2)).unwrap();
    let err = client
        .fetch("2026-11-30".parse().unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&url), "{err}");
}

#[test]
fn refuses_urls_that_are_not_http() {
    let err = ProviderClient::new("ftp://x/tomorrow", 10, Duration::from_secs(1)).unwrap_err();
    assert!(err.to_string().contains("http"), "{err}");
}

/// A provider that claims a body of 3 GB, or dribbles one byte at a time.
async fn hostile(route: &'static str) -> String {
    use axum::body::Body;
    use axum::response::Response;
    let app = Router::new()
        .route(
            "/huge",
            get(|| async {
                // Announces 3 GB; sends a little, then holds the connection open.
                let stream =
                    futures_stream(b"{\"schedule_date\":\"".to_vec(), Duration::from_secs(30));
                Response::builder()
                    .header("content-length", "3000000000")
                    .body(Body::from_stream(stream))
                    .unwrap()
            }),
        )
        .route(
            "/dribble",
            get(|| async {
                let stream = futures_stream(
                    b"{\"schedule_date\":\"2026-11-30\"}".to_vec(),
                    Duration::from_millis(300),
                );
                Response::builder().body(Body::from_stream(stream)).unwrap()
            }),
        )
        .route(
            "/garbage",
            get(|| async { "<html><body>502 Bad Gateway</body></html>" }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}{route}")
}

/// Sends `bytes` one at a time, `every` apart.
fn futures_stream(
    bytes: Vec<u8>,
    every: Duration,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for b in bytes {
            if tx.send(Ok(bytes::Bytes::from(vec![b]))).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn a_3_gb_body_is_refused_before_it_is_read() {
    let client = ProviderClient::new(
        &hostile("/huge").await,
        64 * 1024 * 1024,
        Duration::from_secs(5),
    )
    .unwrap();
    let err = client
        .fetch("2026-11-30".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("3000000000 bytes exceeds the limit"),
        "{err}"
    );
}

#[tokio::test]
async fn a_provider_that_answers_byte_by_byte_times_out() {
    let client =
        ProviderClient::new(&hostile("/dribble").await, 1024, Duration::from_secs(1)).unwrap();
    let err = client
        .fetch("2026-11-30".parse().unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("reading the body"), "{err}");
}

#[tokio::test]
async fn a_garbage_body_is_fetched_but_rejected_whole() {
    let url = hostile("/garbage").await;
    let client = ProviderClient::new(&url, 1024, Duration::from_secs(5)).unwrap();
    let body = client.fetch("2026-11-30".parse().unwrap()).await.unwrap();
    let fleet = max300_protocol::Fleet::new(jiff::tz::TimeZone::get("Europe/London").unwrap());
    let err = max300_protocol::document::normalize(&body, &fleet).unwrap_err();
    assert!(err.to_string().contains("not a JSON object"), "{err}");
}
