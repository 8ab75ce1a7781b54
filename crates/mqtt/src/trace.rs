//! The trace context that travels across the broker. A message's `traceparent` becomes the
//! OpenTelemetry parent of the span that handles it, and a span's own context becomes the
//! `traceparent` of what it sends, so one command's ingestion, publish, ack and reports share
//! one trace. Without an OpenTelemetry layer (no OTLP endpoint) both are no-ops.

use max300_protocol::TraceParent;
use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `parent` the OpenTelemetry parent of `span`, or makes `span` a trace root when
/// `parent` is `None`. Call it on a span made with `parent: None`, before the span is entered
/// or asked for its context; it may be called again to replace the parent until then.
///
/// Returns whether an OpenTelemetry layer records the span, so a caller can skip work that
/// only tracing needs (such as looking up a stored context).
pub fn set_parent(span: &Span, parent: Option<&TraceParent>) -> bool {
    let cx = match parent {
        Some(p) => Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(p.trace_id()),
            SpanId::from_bytes(p.span_id()),
            TraceFlags::new(p.flags()),
            true,
            TraceState::default(),
        )),
        None => Context::new(),
    };
    span.set_parent(cx).is_ok()
}

/// The `traceparent` naming `span`, or `None` when no OpenTelemetry layer records it.
pub fn of(span: &Span) -> Option<TraceParent> {
    let cx = span.context();
    let otel = cx.span();
    let sc = otel.span_context();
    if !sc.is_valid() {
        return None;
    }
    TraceParent::from_parts(
        sc.trace_id().to_bytes(),
        sc.span_id().to_bytes(),
        sc.trace_flags().to_u8(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_opentelemetry_layer_nothing_is_traced() {
        let span = tracing::info_span!(parent: None, "x");
        let tp =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert!(!set_parent(&span, Some(&tp)));
        assert_eq!(of(&span), None);
    }
}
