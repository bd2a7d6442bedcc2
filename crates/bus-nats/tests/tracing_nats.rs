//! Tracing against a real nats-server: one `bus.publish` span per publish and one `bus.handle`
//! span per handling, with their fields, and W3C `traceparent` carried from a publish to its
//! handler and on to what that handler publishes.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bus_core::{
    current_delivery, handler_fn, Envelope, HandlerError, Publisher, Subscriber, Topic,
    TraceParent, TRACEPARENT,
};
use bus_nats::NatsBus;
use bus_testkit::NatsServer;
use common::{test_config, wait_for};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[derive(Default, Debug, Clone)]
struct Fields(HashMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// Every closed span named `bus.*`, with its fields as last recorded.
type Closed = Arc<Mutex<Vec<(String, Fields)>>>;

struct Capture(Closed);

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        ctx.span(id).unwrap().extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).unwrap();
        let mut extensions = span.extensions_mut();
        values.record(extensions.get_mut::<Fields>().unwrap());
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).unwrap();
        if span.name().starts_with("bus.") {
            let fields = span.extensions_mut().remove::<Fields>().unwrap();
            self.0
                .lock()
                .unwrap()
                .push((span.name().to_owned(), fields));
        }
    }
}

fn closed() -> &'static Closed {
    static CLOSED: OnceLock<Closed> = OnceLock::new();
    CLOSED.get_or_init(|| {
        let closed = Closed::default();
        tracing_subscriber::registry()
            .with(Capture(closed.clone()).with_filter(tracing::level_filters::LevelFilter::INFO))
            .init();
        closed
    })
}

fn spans(name: &str, topic: &str) -> Vec<Fields> {
    closed()
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, f)| n == name && f.0.get("topic").map(String::as_str) == Some(topic))
        .map(|(_, f)| f.clone())
        .collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_the_event_and_the_trace_continues_across_topics() {
    closed();
    let server = NatsServer::start();
    let bus = NatsBus::connect(test_config(&server.url())).await.unwrap();
    let orders = Topic::new("traced.orders").unwrap();
    let invoices = Topic::new("traced.invoices").unwrap();

    // Invoicing: records the trace context each event arrived with.
    let invoiced = Arc::new(Mutex::new(Vec::new()));
    let invoicing = {
        let invoiced = invoiced.clone();
        bus.subscribe(
            &invoices,
            Arc::new(handler_fn(move |e: Envelope| {
                let invoiced = invoiced.clone();
                async move {
                    let delivery = current_delivery().unwrap();
                    invoiced
                        .lock()
                        .unwrap()
                        .push((e.traceparent(), delivery.traceparent));
                    Ok(())
                }
            })),
        )
        .await
        .unwrap()
    };
    // Ordering: fails its first attempt, then publishes an invoice from inside the handler.
    let order_trace = Arc::new(Mutex::new(None));
    let failed = Arc::new(AtomicBool::new(false));
    let ordering = {
        let (bus2, invoices, order_trace, failed) = (
            bus.clone(),
            invoices.clone(),
            order_trace.clone(),
            failed.clone(),
        );
        bus.subscribe(
            &orders,
            Arc::new(handler_fn(move |e: Envelope| {
                let (bus, invoices, order_trace, failed) = (
                    bus2.clone(),
                    invoices.clone(),
                    order_trace.clone(),
                    failed.clone(),
                );
                async move {
                    if !failed.swap(true, Ordering::AcqRel) {
                        return Err(HandlerError::retryable("first attempt"));
                    }
                    *order_trace.lock().unwrap() = current_delivery().unwrap().traceparent;
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

    let order = Envelope::builder("order-1", "Placed", 1)
        .trace_id(TRACE)
        .build()
        .unwrap();
    let event_id = order.event_id().to_string();
    let receipt = bus.publish(&orders, order).await.unwrap();
    assert_eq!(receipt.await.unwrap().sequence, Some(1));
    wait_for("the invoice handled", Duration::from_secs(10), || {
        !invoiced.lock().unwrap().is_empty()
    })
    .await;

    // The trace went from the publish to the order handler, and on to the invoice, each hop
    // under a new parent.
    let at_order: TraceParent = order_trace
        .lock()
        .unwrap()
        .clone()
        .expect("the order's trace");
    assert_eq!(at_order.trace_id(), TRACE);
    let (invoice_header, at_invoice) = invoiced.lock().unwrap()[0].clone();
    let at_invoice = at_invoice.expect("the invoice's trace");
    assert_eq!(invoice_header.as_ref(), Some(&at_invoice));
    assert_eq!(at_invoice.trace_id(), TRACE);
    assert_ne!(at_invoice.parent_id(), at_order.parent_id());

    // The spans, once closed.
    wait_for("the spans closed", Duration::from_secs(10), || {
        spans("bus.publish", invoices.as_str()).len() == 1
            && spans("bus.handle", invoices.as_str()).len() == 1
    })
    .await;
    let published = spans("bus.publish", orders.as_str());
    assert_eq!(published.len(), 1, "{published:?}");
    let p = &published[0].0;
    assert_eq!(p["aggregate"], "order-1");
    assert_eq!(p["version"], "1");
    assert_eq!(p["event_type"], "Placed");
    assert_eq!(p["event_id"], event_id);
    assert_eq!(p["trace_id"], TRACE);
    assert_eq!(p["traceparent"], at_order.to_string());
    assert_eq!(p["attempt"], "1");
    assert_eq!(p["sequence"], "1");
    assert_eq!(p["outcome"], "stored");

    let handled = spans("bus.handle", orders.as_str());
    assert_eq!(
        handled.len(),
        1,
        "one span for the handling, retries included: {handled:?}"
    );
    let h = &handled[0].0;
    assert_eq!(h["aggregate"], "order-1");
    assert_eq!(h["version"], "1");
    assert_eq!(h["event_id"], event_id);
    assert_eq!(h["trace_id"], TRACE);
    assert_eq!(h["stream_sequence"], "1");
    assert_eq!(h["attempt"], "2", "the retry is recorded");
    assert_eq!(h["outcome"], "handled");

    let invoice_span = &spans("bus.publish", invoices.as_str())[0].0;
    assert_eq!(invoice_span["traceparent"], at_invoice.to_string());
    assert_eq!(
        invoice_span["trace_id"], TRACE,
        "taken from the traceparent"
    );
    assert_eq!(
        spans("bus.handle", invoices.as_str())[0].0["trace_id"],
        TRACE
    );
    // The header is the standard one, readable by any W3C-aware consumer.
    assert_eq!(TRACEPARENT, "traceparent");

    ordering.close().await.unwrap();
    invoicing.close().await.unwrap();
    bus.close().await.unwrap();
}
