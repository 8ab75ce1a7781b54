//! `max300 lambda`: the Lambda Runtime API client around the cloud's Lambda handler.
//!
//! The runtime interface is a small HTTP API at `AWS_LAMBDA_RUNTIME_API`: take the next
//! invocation (`GET /2018-06-01/runtime/invocation/next`), then post its response or its
//! error; a failure to start is posted to `/runtime/init/error`. The function is packaged as
//! `bootstrap`, which Lambda starts with no arguments (see `main`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use max300_cloud::lambda::LambdaService;
use max300_protocol::{Clock, SystemClock};
use serde_json::{Value, json};
use tracing::{Instrument, error, info, info_span};

const API: &str = "2018-06-01/runtime";

/// `max300 lambda`
#[derive(Args, Debug, Clone, Default)]
pub struct LambdaArgs {
    /// The Runtime API's host:port (Lambda sets it).
    #[arg(long, env = "AWS_LAMBDA_RUNTIME_API")]
    pub runtime_api: String,
    /// A TOML config file; `MAX300_*` variables override it, as for `max300 cloud`.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

/// Serves invocations until the Runtime API goes away.
pub async fn run(args: LambdaArgs) -> anyhow::Result<ExitCode> {
    let base = format!("http://{}/{API}", args.runtime_api);
    // No timeout on the whole request: `next` blocks until there is an invocation.
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("http client")?;
    let service = match start(&args).await {
        Ok(s) => s,
        Err(e) => {
            let body = json!({"errorMessage": format!("{e:#}"), "errorType": "Init"});
            // Lambda shows this to whoever invoked; the process ends either way.
            let _ = http
                .post(format!("{base}/init/error"))
                .header("Lambda-Runtime-Function-Error-Type", "Init")
                .json(&body)
                .send()
                .await;
            return Err(e);
        }
    };
    info!(runtime_api = %args.runtime_api, "lambda handler ready");
    loop {
        let next = match http.get(format!("{base}/invocation/next")).send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => anyhow::bail!("runtime API: next invocation: {}", r.status()),
            // The runtime is gone (the sandbox is shutting down).
            Err(e) => anyhow::bail!("runtime API: {e}"),
        };
        let header = |name: &str| {
            next.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let request_id = header("Lambda-Runtime-Aws-Request-Id");
        let trace_id = header("Lambda-Runtime-Trace-Id");
        let deadline_ms: i64 = header("Lambda-Runtime-Deadline-Ms").parse().unwrap_or(0);
        let event: Result<Value, _> = next.json().await;
        let span = info_span!("invocation", request_id = %request_id, trace_id = %trace_id);
        let outcome = async {
            let event = event.context("the event is not JSON")?;
            let budget = deadline_budget(deadline_ms);
            match tokio::time::timeout(budget, service.handle(&event)).await {
                Ok(handled) => Ok(handled?),
                Err(_) => anyhow::bail!("out of time: the deadline came first"),
            }
        }
        .instrument(span.clone())
        .await;
        let posted = match outcome {
            Ok((response, metrics)) => {
                // CloudWatch reads EMF lines from stdout.
                println!("{metrics}");
                http.post(format!("{base}/invocation/{request_id}/response"))
                    .json(&response)
                    .send()
                    .await
            }
            Err(e) => {
                span.in_scope(|| error!(error = %format!("{e:#}"), "invocation failed"));
                http.post(format!("{base}/invocation/{request_id}/error"))
                    .header("Lambda-Runtime-Function-Error-Type", "Unhandled")
                    .json(&json!({"errorMessage": format!("{e:#}"), "errorType": "Error"}))
                    .send()
                    .await
            }
        };
        if let Err(e) = posted.and_then(|r| r.error_for_status()) {
            anyhow::bail!("runtime API: posting the result of {request_id}: {e}");
        }
    }
}

async fn start(args: &LambdaArgs) -> anyhow::Result<LambdaService> {
    let file = args
        .config
        .as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("{}", p.display())))
        .transpose()?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = max300_cloud::CloudConfig::load(file.as_deref(), &env)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // A lease holder's name: the sandbox's log stream is unique per function instance.
    let owner = std::env::var("AWS_LAMBDA_LOG_STREAM_NAME")
        .unwrap_or_else(|_| format!("lambda-{:08x}", fastrand::u32(..)));
    Ok(LambdaService::start(config, clock, owner).await?)
}

/// The time left before the deadline, less a margin to post the result; at least a second.
fn deadline_budget(deadline_ms: i64) -> Duration {
    let now_ms = SystemClock.now().as_millisecond();
    let left = deadline_ms.saturating_sub(now_ms).saturating_sub(500);
    if deadline_ms == 0 {
        Duration::from_secs(900)
    } else {
        Duration::from_millis(u64::try_from(left).unwrap_or(0).max(1000))
    }
}
