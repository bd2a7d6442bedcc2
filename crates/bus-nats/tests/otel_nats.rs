//! OpenTelemetry (feature `opentelemetry`, which `cargo xtask test` turns on) against a real
//! nats-server: with a `tracing-opentelemetry` layer, an event published inside a request's span
//! is handled in a `bus.handle` span of the same trace, whose parent is that request span, and
//! what that handler publishes is handled in the same trace again.
#![cfg(feature = "opentelemetry")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bus_core::{handler_fn, Envelope, HandlerError, Publisher, Subscriber, Topic};
use bus_nats::NatsBus;
use bus_testkit::NatsServer;
use common::{test_config, wait_for};
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn topic_of(span: &SpanData) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == "topic")
        .map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_continues_through_the_bus_in_opentelemetry() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("bus-test")))
        .with(tracing::level_filters::LevelFilter::INFO)
        .init();

    let server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let (orders, invoices) = (
        Topic::new("otel.orders").unwrap(),
        Topic::new("otel.invoices").unwrap(),
    );
    let invoiced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let invoicing = {
        let invoiced = invoiced.clone();
        bus.subscribe(
            &invoices,
            Arc::new(handler_fn(move |_e: Envelope| {
                let invoiced = invoiced.clone();
                async move {
                    invoiced.store(true, std::sync::atomic::Ordering::Release);
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    let ordering = {
        let (bus2, invoices) = (bus.clone(), invoices.clone());
        bus.subscribe(
            &orders,
            Arc::new(handler_fn(move |e: Envelope| {
                let (bus, invoices) = (bus2.clone(), invoices.clone());
                async move {
                    let invoice = Envelope::builder(e.aggregate_id().as_str(), "Invoiced", 1)
                        .build()
                        .unwrap();
                    let _receipt = bus
                        .publish(&invoices, invoice)
                        .await
                        .map_err(HandlerError::retryable)?;
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };

    // A request of the publishing service, with its own span.
    async {
        let order = Envelope::builder("order-7", "Placed", 1).build().unwrap();
        bus.publish(&orders, order).await.unwrap().await.unwrap();
    }
    .instrument(tracing::info_span!("request"))
    .await;
    wait_for("the invoice handled", Duration::from_secs(10), || {
        invoiced.load(std::sync::atomic::Ordering::Acquire)
    })
    .await;
    ordering.close().await.unwrap();
    invoicing.close().await.unwrap();
    bus.close().await.unwrap();
    let _ = provider.force_flush();

    let spans = exporter.get_finished_spans().unwrap();
    let request = spans
        .iter()
        .find(|s| s.name == "request")
        .expect("the request span");
    let trace = request.span_context.trace_id();
    let handled: Vec<&SpanData> = spans.iter().filter(|s| s.name == "bus.handle").collect();
    let order_handling = handled
        .iter()
        .find(|s| topic_of(s).as_deref() == Some("otel.orders"))
        .expect("the order's handling span");
    assert_eq!(order_handling.span_context.trace_id(), trace, "same trace");
    assert_eq!(
        order_handling.parent_span_id,
        request.span_context.span_id(),
        "handled as a child of the request that published it"
    );
    let invoice_handling = handled
        .iter()
        .find(|s| topic_of(s).as_deref() == Some("otel.invoices"))
        .expect("the invoice's handling span");
    assert_eq!(
        invoice_handling.span_context.trace_id(),
        trace,
        "and on to the next service"
    );
    assert_eq!(
        invoice_handling.parent_span_id,
        order_handling.span_context.span_id(),
        "the invoice was published inside the order's handling"
    );
}
