//! The HTTP client for the schedule provider: GET with `?date=D`, a timeout, retries with
//! backoff, and a body-size limit enforced while reading, so a huge or endless body can't
//! exhaust memory.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use jiff::civil::Date;
use max300_protocol::Backoff;
use max300_protocol::error::Chain;
use tracing::warn;

use crate::CloudError;

/// The pause between attempts of one fetch: 0.5 s, then 2 s (three attempts). A provider that
/// stays down longer is the daily fetch's business, which retries for hours.
const RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(8)).factor(4);

/// Fetches provider documents.
#[derive(Clone, Debug)]
pub struct ProviderClient {
    http: reqwest::Client,
    url: String,
    max_bytes: usize,
    attempts: u32,
}

impl ProviderClient {
    /// A client for the endpoint `url` (e.g. `https://provider/tomorrow`).
    pub fn new(url: &str, max_bytes: usize, timeout: Duration) -> Result<Self, CloudError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| {
            CloudError::config_because(format!("provider: {url:?} is not a URL"), e)
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(CloudError::config(format!(
                "provider: {url:?} must be http:// or https://"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .map_err(|e| CloudError::config_because("provider: the HTTP client", e))?;
        Ok(ProviderClient {
            http,
            url: url.to_owned(),
            max_bytes,
            attempts: 3,
        })
    }

    /// The endpoint.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// GETs the document for `date`, retrying transient failures with backoff.
    pub async fn fetch(&self, date: Date) -> Result<Bytes, CloudError> {
        self.with_retries(|| async move {
            let mut download = self.open(date).await?;
            let mut body = BytesMut::new();
            while let Some(chunk) = download.chunk().await? {
                body.extend_from_slice(&chunk);
            }
            Ok(body.freeze())
        })
        .await
    }

    /// Runs `attempt` until it succeeds, fails for good, or has run as often as a fetch
    /// may: a transfer that breaks half-way is begun again from the start.
    pub async fn with_retries<T, F>(&self, mut attempt: impl FnMut() -> F) -> Result<T, CloudError>
    where
        F: Future<Output = Result<T, CloudError>>,
    {
        let mut n = 1;
        loop {
            match attempt().await {
                Ok(done) => return Ok(done),
                Err(error) if error.is_retryable() && n < self.attempts => {
                    warn!(attempt = n, error = %Chain(&error), url = %self.url, "provider fetch failed, retrying");
                    tokio::time::sleep(RETRY.delay(n - 1)).await;
                    n += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Starts one GET of the document for `date`: `Ok` once the provider answered 2xx; the
    /// body then arrives through [`Download::chunk`]. Not retried.
    pub async fn open(&self, date: Date) -> Result<Download, CloudError> {
        let mut response = self
            .http
            .get(&self.url)
            .query(&[("date", date.to_string())])
            .send()
            .await
            .map_err(|e| transfer_failed(format!("GET {}", self.url), e))?;
        let status = response.status();
        if let Some(len) = response.content_length()
            && len > self.max_bytes as u64
        {
            return Err(too_large(format!(
                "body of {len} bytes exceeds the limit of {} bytes",
                self.max_bytes
            )));
        }
        if !status.is_success() {
            // What went wrong, in the provider's words: the start of its answer is enough.
            let mut text = Vec::new();
            while text.len() < 1024
                && let Ok(Some(chunk)) = response.chunk().await
            {
                text.extend_from_slice(&chunk);
            }
            let text: String = String::from_utf8_lossy(&text).chars().take(200).collect();
            return Err(CloudError::Provider {
                what: format!("GET {} answered {status}: {text}", self.url),
                // A busy or failing server may do better next time; a 4xx will not.
                transient: status.is_server_error() || status.as_u16() == 429,
                cause: None,
            });
        }
        Ok(Download {
            response,
            max_bytes: self.max_bytes,
            read: 0,
        })
    }
}

/// A document's body as it arrives.
#[derive(Debug)]
pub struct Download {
    response: reqwest::Response,
    max_bytes: usize,
    read: usize,
}

impl Download {
    /// The next chunk, or `None` at the end; a body over the limit is refused.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, CloudError> {
        let chunk = self
            .response
            .chunk()
            .await
            .map_err(|e| transfer_failed("reading the body".into(), e))?;
        if let Some(chunk) = &chunk {
            self.read += chunk.len();
            if self.read > self.max_bytes {
                return Err(too_large(format!(
                    "body exceeds the limit of {} bytes",
                    self.max_bytes
                )));
            }
        }
        Ok(chunk)
    }
}

/// The network may do better next time.
fn transfer_failed(what: String, e: reqwest::Error) -> CloudError {
    CloudError::Provider {
        what,
        transient: true,
        cause: Some(e.into()),
    }
}

/// A body over the limit will not shrink on a retry.
fn too_large(what: String) -> CloudError {
    CloudError::Provider {
        what,
        transient: false,
        cause: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_waits_half_a_second_then_two_before_its_last_attempt() {
        assert_eq!(RETRY.delay(0), Duration::from_millis(500));
        assert_eq!(RETRY.delay(1), Duration::from_secs(2));
    }
}
