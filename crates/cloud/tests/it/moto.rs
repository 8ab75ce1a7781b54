//! moto's server, one Python process that speaks DynamoDB and S3, for tests against the AWS
//! backends. Each test starts its own on a port the server picks (`-p 0`) and reads back from
//! its banner, so tests run in parallel with no fixed ports; dropping it kills the process.
//!
//! The server is `moto_server`'s own `main`, run with one change: it serves one request at a
//! time. moto undoes a cancelled TransactWriteItems by restoring a copy of the whole table
//! taken when that transaction began, so on its default threaded server a transaction that
//! fails while another commits wipes the other's writes. DynamoDB applies each request
//! atomically; serving requests one at a time is the faithful model of that, and the race
//! tests (two instances on one item) depend on it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running `moto_server`, killed when dropped. The same endpoint serves S3: point an S3
/// client (e.g. `object_store`'s `with_endpoint(&moto.endpoint).with_allow_http(true)`) at it
/// and create a bucket with a plain `PUT {endpoint}/{bucket}`.
pub struct Moto {
    /// `http://127.0.0.1:PORT`: the endpoint URL for any AWS client (DynamoDB, S3).
    pub endpoint: String,
    child: Child,
}

/// `moto_server`'s entry point, serving one request at a time (see the module doc).
const SINGLE_THREADED: &str = "import sys, moto.server as m
real = m.run_simple
m.run_simple = lambda *a, **k: real(*a, **dict(k, threaded=False))
m.main(sys.argv[1:])";

/// The region every test client uses; moto accepts any.
pub const REGION: &str = "eu-west-2";

impl Moto {
    /// Starts a server and waits until it listens. Fails the test, never skips it, when
    /// moto is not installed.
    pub fn start() -> Moto {
        let installed = std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| dir.join("moto_server").is_file())
        });
        assert!(
            installed,
            "moto_server is not on PATH: install it with pip install 'moto[server]'"
        );
        let mut child = Command::new("python3")
            .args(["-c", SINGLE_THREADED, "-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run python3 for moto's server ({e}): pip install 'moto[server]'")
            });
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        // The reader keeps draining stderr (one line per request) after the banner, so the
        // pipe never fills and stalls the server; it ends when the process does.
        std::thread::spawn(move || {
            let mut banner = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let port = line
                    .split("Running on http://127.0.0.1:")
                    .nth(1)
                    .and_then(|rest| rest.trim().parse::<u16>().ok());
                if let Some(tx) = &banner {
                    let _ = tx.send(port.ok_or(line));
                    if port.is_some() {
                        banner = None;
                    }
                }
            }
        });
        let mut said = Vec::new();
        let port = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(Ok(port)) => break port,
                Ok(Err(line)) => said.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "moto's server did not start (pip install 'moto[server]'); it said:\n{}",
                        said.join("\n")
                    );
                }
            }
        };
        Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
        }
    }

    /// A DynamoDB client for this server: static credentials and region set on the client,
    /// never through the process environment (tests run in parallel threads).
    pub fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .credentials_provider(Credentials::new("test", "test", None, None, "moto"))
            .build();
        aws_sdk_dynamodb::Client::from_conf(config)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
