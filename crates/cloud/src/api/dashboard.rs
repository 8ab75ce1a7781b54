//! The dashboard: one static page, its script and its style sheet, all compiled into the
//! binary (no CDN, so it works offline and behind a locked-down network). The page routes on
//! `location.pathname` and polls the JSON API; the server only hands out the three assets.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;

use super::ApiState;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// The assets change only with the binary; an hour keeps reloads cheap without leaving an old
/// script around for long after an upgrade. The page itself is never cached, so a new binary's
/// page is always the one that asks for the assets.
const ASSET_CACHE: &str = "public, max-age=3600";

/// The page (`/`, `/devices/{id}`, `/commands/{id}`) and its assets. Merged into the read
/// routes, so the read-token rule covers them too.
pub(crate) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/", get(page))
        .route("/devices/{id}", get(page))
        .route("/commands/{id}", get(page))
        .route("/assets/app.js", get(app_js))
        .route("/assets/style.css", get(style_css))
}

async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(INDEX_HTML))
}

async fn app_js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, ASSET_CACHE),
        ],
        APP_JS,
    )
}

async fn style_css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, ASSET_CACHE),
        ],
        STYLE_CSS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_load_nothing_from_elsewhere() {
        // Offline and behind a locked-down network the page must still work: no CDN, no
        // fonts or scripts from another origin.
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("style.css", STYLE_CSS),
        ] {
            for needle in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(needle), "{name} mentions {needle:?}");
            }
        }
    }

    #[test]
    fn the_page_asks_for_the_assets_that_are_served() {
        assert!(INDEX_HTML.contains(r#"src="/assets/app.js""#));
        assert!(INDEX_HTML.contains(r#"href="/assets/style.css""#));
    }
}
