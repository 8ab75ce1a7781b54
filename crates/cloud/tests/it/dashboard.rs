//! The dashboard as the service serves it: the page on each of its paths, the assets with
//! their content types, and the read-token rule (page open, JSON closed).

use std::sync::Arc;

use max300_cloud::{Cloud, CloudConfig};
use max300_protocol::{Clock, ManualClock};
use tokio_util::sync::CancellationToken;

use crate::eve;

const TOKEN: &str = "a-long-enough-test-token";

/// The service with a token that protects reads too; stopped when the guard drops.
async fn start(dir: &std::path::Path) -> (Cloud, tokio_util::sync::DropGuard) {
    let broker = max300_mqtt::broker::start("127.0.0.1:0".parse().unwrap(), 16).unwrap();
    let mut config = CloudConfig::load(None, &[]).unwrap();
    config.data_dir = dir.to_path_buf();
    config.mqtt = format!("mqtt://{broker}");
    config.http = "127.0.0.1:0".into();
    config.api_token = Some(TOKEN.into());
    config.protect_reads = true;
    let shutdown = CancellationToken::new();
    let clock = Arc::new(ManualClock::new(eve())) as Arc<dyn Clock>;
    let cloud = Cloud::start(config, clock, shutdown.clone()).await.unwrap();
    (cloud, shutdown.drop_guard())
}

async fn get(url: &str, token: Option<&str>) -> (u16, String, String, String) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let r = request.send().await.unwrap();
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (content_type, cache) = (header("content-type"), header("cache-control"));
    (
        r.status().as_u16(),
        content_type,
        cache,
        r.text().await.unwrap(),
    )
}

#[tokio::test]
async fn serves_the_page_and_its_assets_while_the_json_keeps_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let (cloud, _stop) = start(dir.path()).await;
    let api = format!("http://{}", cloud.addr);
    for path in [
        "/",
        "/devices/max300-0001",
        "/commands/01JDX0000000000000000000",
    ] {
        let (status, content_type, cache, body) = get(&format!("{api}{path}"), None).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            content_type.starts_with("text/html"),
            "{path}: {content_type}"
        );
        assert_eq!(cache, "no-cache", "{path}");
        assert!(body.contains("/assets/app.js") && body.contains("/assets/style.css"));
    }
    for (path, kind) in [
        ("/assets/app.js", "text/javascript"),
        ("/assets/style.css", "text/css"),
    ] {
        let (status, content_type, cache, body) = get(&format!("{api}{path}"), None).await;
        assert_eq!(status, 200, "{path}");
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        assert!(cache.contains("max-age"), "{path}: {cache}");
        assert!(!body.is_empty());
    }
    let (status, _, _, _) = get(&format!("{api}/api/fleet"), None).await;
    assert_eq!(
        status, 401,
        "the JSON needs the token when reads are protected"
    );
    let (status, _, _, _) = get(&format!("{api}/api/fleet"), Some(TOKEN)).await;
    assert_eq!(status, 200);
    let (status, _, _, _) = get(&format!("{api}/assets/nothing.js"), None).await;
    assert_eq!(status, 404);
}
