//! The dashboard in a real browser: `max300 up` with three units, Debian's headless chromium
//! driven over WebDriver by chromedriver (plain HTTP + JSON through reqwest). These need the
//! `chromium` and `chromium-driver` packages, which `.ci/run` installs; plain `cargo test`
//! skips them.
//!
//! Screenshots go to `$CARGO_TARGET_TMPDIR/screenshots/`; each path is printed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use max300_protocol::clock::monotonic;
use serde_json::{Value, json};

use crate::{Proc, free_port};

/// Where Debian puts the browser; chromedriver is found on `PATH`.
const CHROMIUM: &str = "/usr/bin/chromium";

/// A chromedriver process; killed on drop.
struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    /// chromedriver can't report a port it bound from port 0, so pick a free one and try
    /// again if someone took it in between.
    async fn start(log_dir: &Path) -> ChromeDriver {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing (apt-get install chromium; .ci/run does it)"
        );
        let http = reqwest::Client::new();
        for attempt in 1..=5 {
            let port = free_port();
            let log =
                std::fs::File::create(log_dir.join(format!("chromedriver-{attempt}.log"))).unwrap();
            let mut child = Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .expect(
                    "chromedriver is installed (apt-get install chromium-driver; .ci/run does it)",
                );
            let url = format!("http://127.0.0.1:{port}");
            let deadline = monotonic() + Duration::from_secs(20);
            while monotonic() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                let ready = http
                    .get(format!("{url}/status"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await;
                if let Ok(response) = ready
                    && let Ok(body) = response.json::<Value>().await
                    && body["value"]["ready"] == json!(true)
                {
                    return ChromeDriver { child, url };
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("chromedriver did not start (logs in {})", log_dir.display());
    }
}

impl Drop for ChromeDriver {
    /// Asks chromedriver to quit first, so it reaps its browser processes itself; killed if
    /// it takes too long.
    fn drop(&mut self) {
        request_from_drop(reqwest::Method::GET, format!("{}/shutdown", self.url));
        let deadline = monotonic() + Duration::from_secs(10);
        while monotonic() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP request from a `drop`, which can't await: on a thread with its own runtime, so it
/// works inside the test's runtime and on the failure path too.
fn request_from_drop(method: reqwest::Method, url: String) {
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let _ = reqwest::Client::new()
                .request(method, url)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
        });
    })
    .join();
}

/// One WebDriver session in headless chromium.
struct Browser {
    http: reqwest::Client,
    session: String,
    shots: PathBuf,
    taken: usize,
}

impl Browser {
    async fn open(driver: &ChromeDriver, profile: &Path, shots: PathBuf) -> Browser {
        let http = reqwest::Client::new();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--no-first-run",
                    format!("--user-data-dir={}", profile.display()),
                    "--window-size=1400,1100",
                ],
            },
        }}});
        let value = call(
            &http,
            reqwest::Method::POST,
            &format!("{}/session", driver.url),
            Some(caps),
        )
        .await;
        let id = value["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        // A fresh folder, so every file in it is from this run.
        let _ = std::fs::remove_dir_all(&shots);
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            http,
            session: format!("{}/session/{id}", driver.url),
            shots,
            taken: 0,
        }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        call(
            &self.http,
            reqwest::Method::POST,
            &format!("{}/{path}", self.session),
            Some(body),
        )
        .await
    }

    async fn goto(&self, url: &str) {
        self.post("url", json!({ "url": url })).await;
    }

    /// Runs a script in the page and returns what it returns.
    async fn js(&self, script: &str) -> Value {
        self.post("execute/sync", json!({ "script": script, "args": [] }))
            .await
    }

    /// Runs `script` until `done` holds for its value, or fails after `within`.
    async fn wait_for(
        &self,
        what: &str,
        within: Duration,
        script: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = monotonic() + within;
        loop {
            let value = self.js(script).await;
            if done(&value) {
                return value;
            }
            assert!(
                monotonic() < deadline,
                "{what}: still {value} after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn click(&self, css: &str) {
        let found = self
            .post("element", json!({"using": "css selector", "value": css}))
            .await;
        let element = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{css}: no element id in {found}"))
            .to_owned();
        self.post(&format!("element/{element}/click"), json!({}))
            .await;
    }

    /// Saves a PNG of the viewport and prints its path.
    async fn screenshot(&mut self, name: &str) -> PathBuf {
        let value = call(
            &self.http,
            reqwest::Method::GET,
            &format!("{}/screenshot", self.session),
            None,
        )
        .await;
        let png = base64_decode(value.as_str().expect("base64 text"));
        assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
        self.taken += 1;
        let path = self.shots.join(format!("{:02}-{name}.png", self.taken));
        std::fs::write(&path, png).unwrap();
        println!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Browser {
    /// Ends the session, which closes chromium.
    fn drop(&mut self) {
        request_from_drop(reqwest::Method::DELETE, self.session.clone());
    }
}

/// One WebDriver command; a WebDriver error is a test failure with its message.
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Value {
    let mut request = http.request(method, url).timeout(Duration::from_secs(60));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let body: Value = response
        .json()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    if let Some(error) = body["value"]["error"].as_str() {
        panic!("{url}: {error}: {}", body["value"]["message"]);
    }
    body["value"].clone()
}

/// Standard base64 (the screenshot), without a crate for twenty lines.
fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => panic!("not base64: {c:?}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// The statuses of the chart's periods, in order.
const CHART_STATUSES: &str = "return Array.from(document.querySelectorAll('#chart [data-period]'))\
     .map(e => [Number(e.dataset.period), e.dataset.status])";

fn count_is(n: usize) -> impl Fn(&Value) -> bool {
    move |v: &Value| v.as_array().is_some_and(|a| a.len() == n)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs chromium and chromedriver (installed by .ci/run)"]
async fn dashboard_shows_the_fleet_and_a_clock_change_day_live() {
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = [
        "up",
        "--devices",
        "3",
        "--http",
        "127.0.0.1:0",
        "--date",
        "2026-10-25",
        "--speed",
        "600",
    ]
    .map(String::from)
    .to_vec();
    let mut up = Proc::start("up", &args, dir.path());
    let base = up.expect_line("dashboard:");
    let base = base.trim_end_matches('/').to_owned();

    let driver = ChromeDriver::start(dir.path()).await;
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    let mut browser = Browser::open(&driver, &dir.path().join("profile"), shots).await;
    let long = Duration::from_secs(60);

    // The fleet view lists every registered device.
    browser.goto(&format!("{base}/")).await;
    let rows = browser
        .wait_for(
            "fleet rows",
            long,
            "return Array.from(document.querySelectorAll('tr[data-device-id]'))\
             .map(r => r.dataset.deviceId).sort();",
            count_is(3),
        )
        .await;
    let devices: Value = reqwest::get(format!("{base}/api/devices"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut expected: Vec<String> = devices
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_owned())
        .collect();
    expected.sort();
    assert_eq!(rows, json!(expected), "the fleet view lists every device");
    let cards = browser
        .js("return document.querySelectorAll('#summary .card').length;")
        .await;
    assert_eq!(cards, json!(8), "summary counts with the five alerts");
    browser.screenshot("fleet").await;

    // One device on the autumn clock change: 50 periods, and the two 01:00s tell apart.
    let device = &expected[0];
    browser
        .goto(&format!("{base}/devices/{device}?date=2026-10-25"))
        .await;
    browser
        .wait_for(
            "a 50-period chart",
            long,
            "const c = document.querySelector('#chart');\
             return c && [c.dataset.periodCount, c.querySelectorAll('[data-period]').length];",
            |v| *v == json!(["50", 50]),
        )
        .await;
    let titles = browser
        .js("return [3, 5].map(p => document.querySelector(`#chart [data-period=\"${p}\"] title`).textContent);")
        .await;
    let (first, second) = (titles[0].as_str().unwrap(), titles[1].as_str().unwrap());
    assert!(
        first.contains("01:00") && first.contains("+01:00"),
        "{first}"
    );
    assert!(
        second.contains("01:00") && second.contains("+00:00"),
        "{second}"
    );
    let labels = browser
        .js(
            "return Array.from(document.querySelectorAll('#chart svg > text'))\
             .filter(t => t.textContent === '01:00').length;",
        )
        .await;
    assert_eq!(labels, json!(2), "the axis labels both 01:00s");

    // A period turns from pending to executed while the page stays loaded.
    browser.js("window.__same_page = 'yes'; return null;").await;
    let pending = browser
        .wait_for(
            "a pending period",
            long,
            &format!("{CHART_STATUSES}.find(p => p[1] === 'pending') || null;"),
            |v| v.is_array(),
        )
        .await;
    let period = pending[0].as_u64().unwrap();
    browser.screenshot("device-50-periods-pending").await;
    let updated_before = browser
        .js("return document.querySelector('#last-updated').textContent;")
        .await;
    browser
        .wait_for(
            &format!("period {period} executed"),
            Duration::from_secs(90),
            &format!(
                "const e = document.querySelector('#chart [data-period=\"{period}\"]');\
                 return [e && e.dataset.status, window.__same_page || null];"
            ),
            |v| v[0] == json!("executed"),
        )
        .await;
    let after = browser
        .js("return [window.__same_page || null, document.querySelector('#last-updated').textContent];")
        .await;
    assert_eq!(after[0], json!("yes"), "the page was not reloaded");
    assert_ne!(
        after[1], updated_before,
        "#last-updated changes on each poll"
    );
    browser.screenshot("device-50-periods-executed").await;

    // A few hours in, past the clock change: bars turn executed and the SoC line follows.
    browser
        .wait_for(
            "twelve periods executed",
            Duration::from_secs(90),
            &format!("{CHART_STATUSES}.filter(p => p[1] === 'executed').length;"),
            |v| v.as_u64().is_some_and(|n| n >= 12),
        )
        .await;
    browser.screenshot("device-50-periods-morning").await;

    // The command behind the chart, from the chart page's link.
    let command = browser
        .js("const a = document.querySelector('#command a[href^=\"/commands/\"]'); return a && a.getAttribute('href');")
        .await;
    let command = command
        .as_str()
        .expect("the day's command is linked")
        .to_owned();
    browser.goto(&format!("{base}{command}")).await;
    browser
        .wait_for(
            "the command view",
            long,
            "const h = document.querySelector('#cmd-head'); return h ? h.textContent : '';",
            |v| v.as_str().is_some_and(|t| t.contains(device.as_str())),
        )
        .await;
    browser.screenshot("command").await;

    // The previous day, through the page's own link: an ordinary 48-period day.
    browser
        .goto(&format!("{base}/devices/{device}?date=2026-10-25"))
        .await;
    browser
        .wait_for(
            "the day's links",
            long,
            "const a = document.querySelector('#daynav a'); return a && a.textContent;",
            |v| v.as_str().is_some_and(|t| t.contains("2026-10-24")),
        )
        .await;
    browser.click("#daynav a").await;
    browser
        .wait_for(
            "a 48-period chart",
            long,
            "const c = document.querySelector('#chart');\
             return [location.search, c && c.dataset.periodCount, c ? c.querySelectorAll('[data-period]').length : 0];",
            |v| *v == json!(["?date=2026-10-24", "48", 48]),
        )
        .await;
    browser.screenshot("device-48-periods").await;

    // Back on the fleet: the day's command and conformance so far.
    browser.goto(&format!("{base}/")).await;
    browser
        .wait_for(
            "conformance on the fleet view",
            long,
            "const r = document.querySelector('tr[data-device-id]');\
             return r ? r.textContent : '';",
            |v| v.as_str().is_some_and(|t| !t.contains("0/0")),
        )
        .await;
    browser.screenshot("fleet-later").await;

    // And the spring clock change, with no plan: 46 periods.
    browser
        .goto(&format!("{base}/devices/{device}?date=2027-03-28"))
        .await;
    browser
        .wait_for(
            "a 46-period chart",
            long,
            "const c = document.querySelector('#chart');\
             return c && [c.dataset.periodCount, c.querySelectorAll('[data-period]').length];",
            |v| *v == json!(["46", 46]),
        )
        .await;

    drop(browser);
    drop(driver);
    up.stop();
}
