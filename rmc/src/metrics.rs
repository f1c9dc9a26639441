//! The console's own Prometheus metrics: how sampling the GIS goes (outcomes and latency),
//! whether the last sample worked (readiness). Served beside `/healthz` and `/readyz` on
//! the `--metrics` address by `bids_metrics`; the web console itself is not involved.

use bids_metrics::{Endpoint, ReadyFn};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

pub struct RmcMetrics {
    samples: Family<OutcomeLabel, Counter>,
    sample_seconds: Histogram,
    gis_ok: Gauge,
}

impl RmcMetrics {
    /// Registers the console's metrics (prefix `bids_rmc_`).
    pub fn new(registry: &mut Registry) -> Self {
        let m = RmcMetrics {
            samples: Family::default(),
            // 1 ms .. about 33 s.
            sample_seconds: Histogram::new(exponential_buckets(1e-3, 2.0, 16)),
            gis_ok: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("bids_rmc");
        r.register(
            "gis_samples",
            "Samples of the GIS's state taken, by outcome (ok, failed)",
            m.samples.clone(),
        );
        r.register(
            "gis_sample_seconds",
            "Time one sample of the GIS took",
            m.sample_seconds.clone(),
        );
        r.register(
            "gis_reachable",
            "1 when the last sample of the GIS succeeded",
            m.gis_ok.clone(),
        );
        m
    }

    /// One sample of the GIS, and how it went.
    pub fn sampled(&self, ok: bool, took: Duration) {
        let outcome = if ok { "ok" } else { "failed" };
        self.samples.get_or_create(&OutcomeLabel { outcome }).inc();
        self.sample_seconds.observe(took.as_secs_f64());
        self.gis_ok.set(i64::from(ok));
    }

    /// Ready once the last sample of the GIS succeeded.
    pub fn endpoint(self: &Arc<Self>, registry: Arc<Registry>) -> Endpoint {
        let me = self.clone();
        let ready: ReadyFn = Arc::new(move || {
            if me.gis_ok.get() == 1 {
                Ok(())
            } else {
                Err("the last sample of the GIS failed (or none was taken yet)".into())
            }
        });
        Endpoint {
            registry,
            ready,
            refresh: None,
        }
    }
}
