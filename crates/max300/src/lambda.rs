//! `max300 lambda`: the cloud's Lambda handler under `lambda_runtime`, which speaks the Lambda
//! Runtime API at `AWS_LAMBDA_RUNTIME_API` (take the next invocation, post its response or its
//! error). The function is packaged as `bootstrap`, which Lambda starts with no arguments (see
//! `main`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use max300_cloud::CloudError;
use max300_cloud::lambda::{Event, LambdaService, Response};
use max300_protocol::{Clock, SystemClock};
use tracing::{Instrument, error, info, info_span};

/// What Lambda sets in every function's environment, and `lambda_runtime` reads (it panics
/// without them, so they are checked first).
const LAMBDA_ENV: [&str; 4] = [
    "AWS_LAMBDA_RUNTIME_API",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
];

/// `max300 lambda`
#[derive(Args, Debug, Clone, Default)]
pub struct LambdaArgs {
    /// A TOML config file; `MAX300_*` variables override it, as for `max300 cloud`.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

/// Serves invocations until the Runtime API goes away.
pub async fn run(args: LambdaArgs) -> anyhow::Result<ExitCode> {
    if let Some(missing) = LAMBDA_ENV
        .iter()
        .find(|name| std::env::var_os(name).is_none())
    {
        anyhow::bail!(
            "{missing} is not set: `max300 lambda` runs inside AWS Lambda (or its runtime \
             interface emulator), which sets it"
        );
    }
    let service = match start(&args).await {
        Ok(service) => service,
        Err(e) => {
            // Lambda shows this to whoever invoked; the process ends either way.
            report_init_error(&e).await;
            return Err(e);
        }
    };
    info!("lambda handler ready");
    let service = &service;
    lambda_runtime::run(service_fn(move |event| handle(service, event)))
        .await
        // The Runtime API is gone (the sandbox is shutting down).
        .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

/// One invocation, within its deadline; on success, the invocation's metrics line goes to
/// stdout, where CloudWatch reads EMF.
async fn handle(
    service: &LambdaService,
    event: LambdaEvent<Event>,
) -> Result<Response, Diagnostic> {
    let span = info_span!(
        "invocation",
        request_id = %event.context.request_id,
        trace_id = event.context.xray_trace_id.as_deref().unwrap_or(""),
    );
    let budget = deadline_budget(event.context.deadline);
    let outcome = async {
        match tokio::time::timeout(budget, service.handle(event)).await {
            Ok(Ok(handled)) => Ok(handled),
            Ok(Err(e)) => Err(diagnostic(&e)),
            Err(_) => Err(Diagnostic {
                error_type: "Timeout".into(),
                error_message: "out of time: the deadline came first".into(),
            }),
        }
    }
    .instrument(span.clone())
    .await;
    match outcome {
        Ok((response, metrics)) => {
            println!("{metrics}");
            Ok(response)
        }
        Err(diagnostic) => {
            span.in_scope(|| error!(error = %diagnostic.error_message, "invocation failed"));
            Err(diagnostic)
        }
    }
}

/// The `errorType` says which part failed; the message is the error's, with its causes.
fn diagnostic(e: &CloudError) -> Diagnostic {
    let error_type = match e {
        CloudError::Event(_) => "Event",
        CloudError::Config(_) => "Config",
        _ => "Error",
    };
    Diagnostic {
        error_type: error_type.into(),
        error_message: format!("{e:#}"),
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

/// Posts a failed start to `/runtime/init/error` with `lambda_runtime`'s own client, since
/// `lambda_runtime` reports only its own (SnapStart) init failures there. Best effort: the
/// process exits after it anyway, and Lambda records that too.
async fn report_init_error(e: &anyhow::Error) {
    let diagnostic = Diagnostic {
        error_type: "Runtime.InitError".into(),
        error_message: format!("{e:#}"),
    };
    let sent = async {
        let client = lambda_runtime_api_client::PooledClient::builder().build();
        let request = lambda_runtime_api_client::build_request()
            .method("POST")
            .uri("/2018-06-01/runtime/init/error")
            .header("lambda-runtime-function-error-type", "Runtime.InitError")
            .body(serde_json::to_vec(&diagnostic)?.into())?;
        let response = client
            .call(request)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(response.status().is_success(), "{}", response.status());
        Ok::<_, anyhow::Error>(())
    };
    if let Err(report) = sent.await {
        error!(error = %format!("{report:#}"), "init error not reported to the runtime API");
    }
}

/// The time left before the deadline, less a margin to post the result; at least a second.
fn deadline_budget(deadline_ms: u64) -> Duration {
    if deadline_ms == 0 {
        return Duration::from_secs(900);
    }
    let now_ms = u64::try_from(SystemClock.now().as_millisecond()).unwrap_or(0);
    let left = deadline_ms.saturating_sub(now_ms).saturating_sub(500);
    Duration::from_millis(left.max(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_deadline_the_budget_is_lambdas_longest_run() {
        assert_eq!(deadline_budget(0), Duration::from_secs(900));
    }

    #[test]
    fn the_budget_keeps_half_a_second_to_post_the_result_and_is_never_under_a_second() {
        let now_ms = u64::try_from(SystemClock.now().as_millisecond()).unwrap();
        let budget = deadline_budget(now_ms + 10_000);
        assert!(
            budget <= Duration::from_millis(9_500) && budget >= Duration::from_millis(9_000),
            "{budget:?}"
        );
        assert_eq!(deadline_budget(now_ms - 5_000), Duration::from_secs(1));
    }
}
