//! The HTTP client for the schedule provider: GET with `?date=D`, a timeout, retries with
//! backoff, and a body-size limit enforced while reading, so a huge or endless body can't
//! exhaust memory.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use jiff::civil::Date;
use max300_protocol::Backoff;
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
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| CloudError::Config(format!("provider: {url:?} is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(CloudError::Config(format!(
                "provider: {url:?} must be http:// or https://"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .map_err(|e| CloudError::Provider(e.to_string()))?;
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
        let mut attempt = 1;
        loop {
            match self.fetch_once(date).await {
                Ok(body) => return Ok(body),
                Err((error, retryable)) if retryable && attempt < self.attempts => {
                    warn!(attempt, error = %error, url = %self.url, "provider fetch failed, retrying");
                    tokio::time::sleep(RETRY.delay(attempt - 1)).await;
                    attempt += 1;
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    async fn fetch_once(&self, date: Date) -> Result<Bytes, (CloudError, bool)> {
        let err = |msg: String, retry: bool| (CloudError::Provider(msg), retry);
        let mut response = self
            .http
            .get(&self.url)
            .query(&[("date", date.to_string())])
            .send()
            .await
            .map_err(|e| err(format!("GET {}: {e}", self.url), true))?;
        let status = response.status();
        if let Some(len) = response.content_length()
            && len > self.max_bytes as u64
        {
            return Err(err(
                format!(
                    "body of {len} bytes exceeds the limit of {} bytes",
                    self.max_bytes
                ),
                false,
            ));
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| err(format!("reading the body: {e}"), true))?
        {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(err(
                    format!("body exceeds the limit of {} bytes", self.max_bytes),
                    false,
                ));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let text: String = String::from_utf8_lossy(&body).chars().take(200).collect();
            return Err(err(
                format!("GET {} answered {status}: {text}", self.url),
                status.is_server_error() || status.as_u16() == 429,
            ));
        }
        Ok(body.freeze())
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
