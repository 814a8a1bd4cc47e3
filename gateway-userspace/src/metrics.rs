//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//!
//! One [`Metrics`] per gateway process; the data plane updates it on every request, the
//! XDP poller copies the kernel's per-CPU counters into it once a second.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::ConstCounter,
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use gateway_common::stats;

/// Labels of `gateway_requests`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// REST API id (empty when no API matched).
    pub api: String,
    /// Stage name.
    pub stage: String,
    /// Resource path template and declared method, e.g. `/pets/{id}/GET`.
    pub resource: String,
    /// HTTP status code of the response.
    pub status: u16,
    /// What the gateway decided: `allowed`, `forbidden`, `throttled_plan_method`,
    /// `throttled_plan`, `throttled_stage_method`, `throttled_account`, `quota_exceeded`,
    /// `no_route`, `too_large`, `header_too_large`, `upstream_error`, `upstream_timeout`,
    /// `store_unavailable`.
    pub outcome: &'static str,
}

/// Labels of `gateway_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub api: String,
    pub stage: String,
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Responses by status and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Data-plane connections currently open.
    pub open_connections: Gauge,
    /// Time from request head to response head, by API and stage.
    pub latency: Family<LatencyLabels, Histogram>,
    xdp: Arc<XdpCounters>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Data-plane responses by status and outcome",
            requests.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Data-plane connections currently open",
            open_connections.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
        });
        registry.register_with_unit(
            "request_duration",
            "Time from request head to response head",
            Unit::Seconds,
            latency.clone(),
        );
        let xdp = Arc::new(XdpCounters::default());
        registry.register_collector(Box::new(xdp.clone()));
        Self {
            registry,
            requests,
            open_connections,
            latency,
            xdp,
        }
    }

    /// Adds a collector to the exposition (e.g. the fleet store's health).
    pub fn register_collector(&mut self, collector: Box<dyn Collector>) {
        self.registry.register_collector(collector);
    }

    /// Counts one data-plane response and records its latency.
    pub fn request(&self, labels: RequestLabels, elapsed: Duration) {
        self.latency
            .get_or_create(&LatencyLabels {
                api: labels.api.clone(),
                stage: labels.stage.clone(),
            })
            .observe(elapsed.as_secs_f64());
        self.requests.get_or_create(&labels).inc();
    }

    /// Replaces the XDP counters with the kernel's latest totals.
    pub fn set_xdp_counters(&self, totals: &[u64; stats::COUNT as usize]) {
        for (slot, value) in self.xdp.values.iter().zip(totals) {
            slot.store(*value, Ordering::Relaxed);
        }
        self.xdp.attached.store(true, Ordering::Relaxed);
    }

    /// Sets the number of flows bound to keys in the kernel.
    pub fn set_xdp_bound_flows(&self, flows: u64) {
        self.xdp.bound_flows.store(flows, Ordering::Relaxed);
    }

    /// Records one walk of every key that brought the kernel's key buckets in line with the
    /// configuration: how long it took and how many slots it wrote.
    pub fn xdp_key_synced(&self, took: Duration, written: u64) {
        let xdp = &self.xdp;
        xdp.key_sync_nanos.store(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        xdp.key_sync_written.store(written, Ordering::Relaxed);
        xdp.key_syncs.fetch_add(1, Ordering::Relaxed);
    }

    /// The XDP counters as last copied from the kernel.
    pub fn xdp_counters(&self) -> [u64; stats::COUNT as usize] {
        std::array::from_fn(|i| self.xdp.values[i].load(Ordering::Relaxed))
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Kernel counters, exported only once an XDP program has reported.
#[derive(Debug, Default)]
struct XdpCounters {
    attached: AtomicBool,
    values: [AtomicU64; stats::COUNT as usize],
    bound_flows: AtomicU64,
    key_syncs: AtomicU64,
    key_sync_nanos: AtomicU64,
    key_sync_written: AtomicU64,
}

impl Collector for XdpCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if !self.attached.load(Ordering::Relaxed) {
            return Ok(());
        }
        for (name, value) in stats::NAMES.iter().zip(&self.values) {
            one(
                &mut encoder,
                &format!("xdp_{name}"),
                "Packets seen by the XDP program, summed over CPUs",
                ConstCounter::new(value.load(Ordering::Relaxed)),
            )?;
        }
        one(
            &mut encoder,
            "xdp_bound_flows",
            "Data-plane connections bound to an API key in the kernel",
            ConstGauge::new(self.bound_flows.load(Ordering::Relaxed) as i64),
        )?;
        one(
            &mut encoder,
            "xdp_key_syncs",
            "Walks of every API key that brought the kernel key buckets in line with the configuration",
            ConstCounter::new(self.key_syncs.load(Ordering::Relaxed)),
        )?;
        one(
            &mut encoder,
            "xdp_key_sync_last_seconds",
            "Duration of the last kernel key sync (reading every key and writing the changed slots)",
            ConstGauge::new(self.key_sync_nanos.load(Ordering::Relaxed) as f64 / 1e9),
        )?;
        one(
            &mut encoder,
            "xdp_key_sync_last_written",
            "Kernel key slots written by the last kernel key sync",
            ConstGauge::new(self.key_sync_written.load(Ordering::Relaxed) as i64),
        )?;
        Ok(())
    }
}

/// Writes one unlabelled metric with its descriptor.
fn one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}
