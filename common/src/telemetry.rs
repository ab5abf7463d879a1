//! How a Flotilla process is observed (feature `telemetry`): logs (text, or JSON lines that carry the trace
//! and span ids of the span they are written in), OpenTelemetry traces exported over OTLP/gRPC, W3C trace
//! context carried in protocol messages, and the plain-HTTP endpoint that serves `/metrics`, `/healthz` and
//! `/readyz`.
//!
//! Only spans with the target [`TARGET`] become trace spans: the spans of every task (one per agent session,
//! per request) stay in the logs, so a trace holds the steps of a commit and nothing of the fleet's chatter.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt, TraceFlags, Tracer};
use opentelemetry::{global, Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use std::collections::HashMap;
use std::time::SystemTime;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

pub mod endpoint;

/// The target of the `tracing` spans that are trace spans.
pub const TARGET: &str = "flotilla::trace";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line, with `trace_id` and `span_id` inside a trace span.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?}: expected text or json")),
        }
    }
}

/// Which root spans a process starts itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roots {
    /// Every root span is kept (the hub: it starts one trace per commit and nothing else).
    Keep,
    /// Only spans whose parent came from elsewhere and was sampled (the agent: its spans are part of a
    /// commit's trace, and the hub decides which clusters' spans are kept).
    FollowOnly,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// `service.name` of the traces ("flotilla-hub", "flotilla-agent").
    pub service: &'static str,
    /// `service.instance.id`: the cluster of an agent, the replica of a hub.
    pub instance: String,
    /// OTLP/gRPC collector (`http://host:4317`); no traces are exported without one.
    pub otlp_endpoint: Option<String>,
    pub log_format: LogFormat,
    pub roots: Roots,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the OTLP exporter for {endpoint} could not be built: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Flushes and stops the trace exporter when dropped (at the end of `main`).
pub struct Guard(Option<SdkTracerProvider>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("flushing traces failed: {e}");
            }
        }
    }
}

/// Sets up logging (filtered by RUST_LOG, default `info`) and, with an OTLP endpoint, trace export. Must be
/// called inside a tokio runtime (the exporter's client runs on it).
pub fn init(opts: &Options) -> Result<Guard, TelemetryError> {
    let filter = || tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = match opts.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
    };
    let Some(endpoint) = &opts.otlp_endpoint else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Guard(None));
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|source| TelemetryError::Exporter { endpoint: endpoint.clone(), source })?;
    let root = match opts.roots {
        Roots::Keep => Sampler::AlwaysOn,
        Roots::FollowOnly => Sampler::AlwaysOff,
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(opts.service)
        .with_attribute(KeyValue::new("service.instance.id", opts.instance.clone()))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(root)))
        .with_resource(resource)
        .build();
    global::set_tracer_provider(provider.clone());
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(opts.service))
        .with_filter(tracing_subscriber::filter::filter_fn(|m| m.target() == TARGET));
    tracing_subscriber::registry().with(logs).with(traces).init();
    Ok(Guard(Some(provider)))
}

// ---------------------------------------------------------------------------------------------------------
// Spans made directly (steps whose start and end are known only afterwards, or outlive any task)
// ---------------------------------------------------------------------------------------------------------

/// Starts a span as a child of `parent` (a root when `parent` holds no span), at `start`; the returned
/// context holds it: end it with `cx.span().end()`.
pub fn start(name: &'static str, parent: &Context, start: SystemTime, attrs: Vec<KeyValue>) -> Context {
    let tracer = global::tracer("flotilla");
    let span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attrs)
        .start_with_context(&tracer, parent);
    parent.with_span(span)
}

/// A span that is over already: from `from` to `to`.
pub fn record(name: &'static str, parent: &Context, from: SystemTime, to: SystemTime, attrs: Vec<KeyValue>) {
    start(name, parent, from, attrs).span().end_with_timestamp(to);
}

/// Whether the context holds a span that is recorded (exported).
pub fn recording(cx: &Context) -> bool {
    cx.span().is_recording()
}

/// The W3C `traceparent` of the context's span; empty when it holds none.
pub fn traceparent(cx: &Context) -> String {
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

/// A `traceparent` in the same trace that asks the receiver not to record its spans: the trace id still
/// joins its log lines to the commit.
pub fn traceparent_unsampled(cx: &Context) -> String {
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return String::new();
    }
    let quiet = SpanContext::new(sc.trace_id(), sc.span_id(), TraceFlags::default(), true, sc.trace_state().clone());
    traceparent(&Context::new().with_remote_span_context(quiet))
}

/// The context a `traceparent` names (an empty context for an empty or malformed one).
pub fn from_traceparent(traceparent: &str) -> Context {
    if traceparent.is_empty() {
        return Context::new();
    }
    let carrier: HashMap<String, String> = [("traceparent".to_string(), traceparent.to_string())].into();
    TraceContextPropagator::new().extract(&carrier)
}

/// The trace id of a context, as hex (empty when it holds no span).
pub fn trace_id(cx: &Context) -> String {
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}

// ---------------------------------------------------------------------------------------------------------
// JSON log lines
// ---------------------------------------------------------------------------------------------------------

/// One JSON object per event: `timestamp`, `level`, `target`, the event's fields (`message` among them),
/// `span` (the innermost span's name) and `spans` (name and fields of each, outermost first), and inside a
/// trace span `trace_id` and `span_id`.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing_subscriber::fmt::time::FormatTime;
        let mut line = serde_json::Map::new();
        let mut ts = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut ts))?;
        line.insert("timestamp".into(), ts.into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        let mut fields = Fields(serde_json::Map::new());
        event.record(&mut fields);
        line.extend(fields.0);
        if let Some(scope) = ctx.event_scope() {
            let mut spans = Vec::new();
            for span in scope.from_root() {
                let mut s = serde_json::Map::new();
                s.insert("name".into(), span.name().into());
                if let Some(f) = span.extensions().get::<FormattedFields<N>>() {
                    if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(f) {
                        s.extend(m);
                    }
                }
                spans.push(serde_json::Value::Object(s));
            }
            if let Some(serde_json::Value::Object(last)) = spans.last() {
                line.insert("span".into(), last.get("name").cloned().unwrap_or_default());
            }
            line.insert("spans".into(), spans.into());
        }
        let cx = Context::current();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            line.insert("trace_id".into(), sc.trace_id().to_string().into());
            line.insert("span_id".into(), sc.span_id().to_string().into());
        }
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

struct Fields(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_i64(&mut self, f: &tracing::field::Field, v: i64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_u64(&mut self, f: &tracing::field::Field, v: u64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_bool(&mut self, f: &tracing::field::Field, v: bool) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_f64(&mut self, f: &tracing::field::Field, v: f64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().into(), format!("{v:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_inside_a_traced_context_carry_its_trace_and_span_ids() {
        let buf = Buf::default();
        let b = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .with_writer(move || b.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        let cx = from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("engine", cluster = "eu-1");
            let _s = span.enter();
            tracing::info!(app = "shop", "outside");
            let _g = cx.attach();
            tracing::info!(app = "shop", objects = 2, "inside");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["message"], "outside");
        assert!(lines[0].get("trace_id").is_none());
        assert_eq!(lines[0]["spans"][0]["cluster"], "eu-1");
        assert_eq!(lines[1]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(lines[1]["span_id"], "00f067aa0ba902b7");
        assert_eq!(lines[1]["objects"], 2);
        assert_eq!(lines[1]["level"], "INFO");
    }

    #[test]
    fn traceparent_round_trips_and_an_unsampled_one_keeps_the_trace() {
        let sc = SpanContext::new(
            opentelemetry::trace::TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            opentelemetry::trace::SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            Default::default(),
        );
        let cx = Context::new().with_remote_span_context(sc);
        let tp = traceparent(&cx);
        assert_eq!(tp, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let back = from_traceparent(&tp);
        assert_eq!(back.span().span_context().trace_id(), cx.span().span_context().trace_id());
        assert!(back.span().span_context().is_sampled());
        let quiet = traceparent_unsampled(&cx);
        assert_eq!(quiet, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert!(!from_traceparent(&quiet).span().span_context().is_sampled());
        assert!(!from_traceparent("garbage").span().span_context().is_valid());
        assert_eq!(traceparent(&Context::new()), "");
    }
}
