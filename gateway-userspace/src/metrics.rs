//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//!
//! One [`Metrics`] per gateway process; the data plane updates it on every request, the
//! XDP poller copies the kernel's per-CPU counters into it once a second.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use gateway_common::stats;

/// Labels of `gateway_requests`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP status code of the response.
    pub status: u16,
    /// What the gateway decided: `allowed`, `forbidden`, `throttled`, `quota_exceeded`,
    /// `not_found`, `upstream_error`, ...
    pub outcome: &'static str,
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Responses by status and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Data-plane connections currently open.
    pub open_connections: Gauge,
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
        let xdp = Arc::new(XdpCounters::default());
        registry.register_collector(Box::new(xdp.clone()));
        Self {
            registry,
            requests,
            open_connections,
            xdp,
        }
    }

    /// Counts one data-plane response.
    pub fn request(&self, status: u16, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { status, outcome })
            .inc();
    }

    /// Replaces the XDP counters with the kernel's latest totals.
    pub fn set_xdp_counters(&self, totals: &[u64; stats::COUNT as usize]) {
        for (slot, value) in self.xdp.values.iter().zip(totals) {
            slot.store(*value, Ordering::Relaxed);
        }
        self.xdp.attached.store(true, Ordering::Relaxed);
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
}

impl Collector for XdpCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if !self.attached.load(Ordering::Relaxed) {
            return Ok(());
        }
        for (name, value) in stats::NAMES.iter().zip(&self.values) {
            let counter = ConstCounter::new(value.load(Ordering::Relaxed));
            let name = format!("xdp_{name}");
            let metric = encoder.encode_descriptor(
                &name,
                "Packets seen by the XDP program, summed over CPUs",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}
