//! `GET /metrics`: Prometheus text format, through the Prometheus project's Rust client.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub spec: String,
    pub verdict: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteLabels, Counter>,
    pub queue_depth: Gauge,
    pub running: Gauge,
    pub cancelled: Counter,
    pub time_to_first_token: Histogram,
    pub image_encode: Histogram,
    pub prefill_tokens_per_second: Histogram,
    pub decode_tokens_per_second: Histogram,
    pub inspections: Family<VerdictLabels, Counter>,
    pub mqtt_published: Counter,
    pub mqtt_connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("loupe");
        let requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Requests waiting for the model",
            queue_depth.clone(),
        );
        let running = Gauge::default();
        registry.register(
            "running_requests",
            "Answers being generated",
            running.clone(),
        );
        let cancelled = Counter::default();
        registry.register(
            "cancelled_requests",
            "Answers dropped because the client went away",
            cancelled.clone(),
        );
        let seconds = || Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let rate = || Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let time_to_first_token = seconds();
        registry.register(
            "time_to_first_token_seconds",
            "From the request's arrival to its first token",
            time_to_first_token.clone(),
        );
        let image_encode = seconds();
        registry.register(
            "image_encode_seconds",
            "Vision tower time per request with images",
            image_encode.clone(),
        );
        let prefill_tokens_per_second = rate();
        registry.register(
            "prefill_tokens_per_second",
            "Prompt tokens per second of prefill, per request",
            prefill_tokens_per_second.clone(),
        );
        let decode_tokens_per_second = rate();
        registry.register(
            "decode_tokens_per_second",
            "Generated tokens per second after the first, per request",
            decode_tokens_per_second.clone(),
        );
        let inspections = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "inspections",
            "Inspections by spec and verdict (pass, fail, error)",
            inspections.clone(),
        );
        let mqtt_published = Counter::default();
        registry.register(
            "mqtt_published",
            "Verdicts the MQTT broker acknowledged",
            mqtt_published.clone(),
        );
        let mqtt_connected = Gauge::default();
        registry.register(
            "mqtt_connected",
            "1 while connected to the MQTT broker",
            mqtt_connected.clone(),
        );
        Metrics {
            mqtt_published,
            mqtt_connected,
            registry,
            requests,
            queue_depth,
            running,
            cancelled,
            time_to_first_token,
            image_encode,
            prefill_tokens_per_second,
            decode_tokens_per_second,
            inspections,
        }
    }

    /// Records one answer's timings.
    pub fn observe(&self, t: &loupe_core::generate::Timings, prompt_tokens: usize, tokens: usize) {
        if t.vision_ms > 0.0 {
            self.image_encode.observe(t.vision_ms / 1e3);
        }
        if t.prefill_ms > 0.0 {
            self.prefill_tokens_per_second
                .observe(prompt_tokens as f64 / (t.prefill_ms / 1e3));
        }
        if tokens > 1 && t.decode_ms > 0.0 {
            self.decode_tokens_per_second
                .observe((tokens - 1) as f64 / (t.decode_ms / 1e3));
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
