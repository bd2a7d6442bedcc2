//! OpenTelemetry bridging (feature `opentelemetry`): the caller's span context becomes a
//! publish's W3C `traceparent`, and an event's `traceparent` the remote parent of its
//! `bus.handle` span, through `tracing-opentelemetry`.

use bus_core::{Envelope, TraceParent, TRACEPARENT};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Gives `envelope` the current span's OpenTelemetry context as its `traceparent`, unless it
/// has one or there is no valid context.
pub(crate) fn inject(envelope: &mut Envelope) {
    if envelope.headers().contains_key(TRACEPARENT) {
        return;
    }
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    if !span_context.is_valid() {
        return;
    }
    let text = format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    );
    if let Some(traceparent) = TraceParent::parse(&text) {
        envelope.set_traceparent(&traceparent);
    }
}

/// Makes the context an event carried the remote parent of `span`.
pub(crate) fn set_parent(span: &tracing::Span, traceparent: &TraceParent) {
    let (Ok(trace_id), Ok(span_id)) = (
        TraceId::from_hex(traceparent.trace_id()),
        SpanId::from_hex(traceparent.parent_id()),
    ) else {
        return;
    };
    let flags = if traceparent.sampled() {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let remote = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}
