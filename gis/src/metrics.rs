//! The GIS's Prometheus metrics: requests by kind and outcome, lookups and their latency,
//! hosts by IDC, role and liveness, images known, state commits, a replica's Raft group
//! (term, leader, log and applied positions, followers' lag); plus libp2p's own swarm,
//! identify, ping and transport-bandwidth metrics in the same registry. The server loop
//! calls one method per event; serving them is `bids_metrics`' business.
//!
//! Labels stay bounded: request kinds, outcomes, IDC names, roles, Raft replica ids (the
//! group's members); never a peer id.

use crate::index::{IdcView, Index};
use bids_metrics::{Endpoint, ReadyFn};
use bids_protocols::gis::{GisRequest, GisResponse};
use libp2p::metrics::Recorder;
use libp2p::swarm::SwarmEvent;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    request: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    idc: String,
    role: &'static str,
    state: &'static str,
}

/// Every metric the GIS exposes.
pub struct GisMetrics {
    p2p: libp2p::metrics::Metrics,
    requests: Family<RequestLabels, Counter>,
    lookup_seconds: Histogram,
    hosts: Family<HostLabels, Gauge>,
    images: Gauge,
    commit_seconds: Histogram,
    index_open: Gauge,
    by_transport: Family<TransportLabels, Counter>,
    sessions: Gauge,
    busy_seconds: Family<WorkLabels, Histogram>,
    /// Only a Raft replica registers these.
    raft: Option<RaftGauges>,
}

/// A replica's view of its Raft group.
struct RaftGauges {
    term: Gauge,
    leader: Gauge,
    last_log_index: Gauge,
    applied_index: Gauge,
    snapshot_index: Gauge,
    follower_lag: Family<ReplicaLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkLabels {
    work: &'static str,
}

impl GisMetrics {
    /// Registers the GIS's metrics (prefix `bids_gis_`) and libp2p's (prefix `libp2p_`);
    /// a Raft replica (`replicated`) also its group's (`bids_gis_raft_`).
    pub fn new(registry: &mut Registry, replicated: bool) -> Self {
        let m = GisMetrics {
            p2p: libp2p::metrics::Metrics::new(registry),
            requests: Family::default(),
            // 10 µs .. about 0.33 s.
            lookup_seconds: Histogram::new(exponential_buckets(1e-5, 2.0, 16)),
            hosts: Family::default(),
            images: Gauge::default(),
            // 100 µs .. about 3.3 s.
            commit_seconds: Histogram::new(exponential_buckets(1e-4, 2.0, 16)),
            index_open: Gauge::default(),
            by_transport: Family::default(),
            sessions: Gauge::default(),
            // 10 µs .. about 0.33 s.
            busy_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1e-5, 2.0, 16))
            }),
            raft: replicated.then(|| RaftGauges {
                term: Gauge::default(),
                leader: Gauge::default(),
                last_log_index: Gauge::default(),
                applied_index: Gauge::default(),
                snapshot_index: Gauge::default(),
                follower_lag: Family::default(),
            }),
        };
        let r = registry.sub_registry_with_prefix("bids_gis");
        if let Some(g) = &m.raft {
            let r = r.sub_registry_with_prefix("raft");
            r.register("term", "This replica's current Raft term", g.term.clone());
            r.register(
                "leader",
                "1 while this replica is the group's leader (writes go through it), else 0",
                g.leader.clone(),
            );
            r.register(
                "last_log_index",
                "Index of the last entry in this replica's Raft log",
                g.last_log_index.clone(),
            );
            r.register(
                "applied_index",
                "Index of the last entry applied to this replica's index (what its lookups answer from)",
                g.applied_index.clone(),
            );
            r.register(
                "snapshot_index",
                "Last entry covered by this replica's latest snapshot (0: none)",
                g.snapshot_index.clone(),
            );
            r.register(
                "follower_lag_entries",
                "On the leader: entries of its log each other replica has not yet acknowledged",
                g.follower_lag.clone(),
            );
        }
        r.register(
            "requests",
            "GIS requests handled, by kind (register, heartbeat, publish, unpublish, lookup, refresh, revoke, upgrade_path) and outcome (ok, error, or unchanged: a refresh whose host already had the list)",
            m.requests.clone(),
        );
        r.register(
            "lookup_seconds",
            "Time to answer a lookup (or refresh) in the index",
            m.lookup_seconds.clone(),
        );
        r.register(
            "hosts",
            "Registered hosts by IDC, role (host, bridgehead: certificate valid now) and state (live, dead)",
            m.hosts.clone(),
        );
        r.register("images", "Images and delta files known", m.images.clone());
        r.register(
            "commit_seconds",
            "Time to make one batch of index changes durable",
            m.commit_seconds.clone(),
        );
        r.register(
            "requests_by_transport",
            "GIS requests received, by how they came: session (a host's long-lived GIS session) or stream (a stream per request: tools, and nodes while their session opens or with a GIS without sessions)",
            m.by_transport.clone(),
        );
        r.register(
            "loop_busy_seconds",
            "Time the GIS's event loop spent on one piece of work without answering anything else: a batch of requests and events (batch) or the once-a-second liveness pass (liveness)",
            m.busy_seconds.clone(),
        );
        r.register(
            "sessions",
            "GIS sessions open now (one per connected node)",
            m.sessions.clone(),
        );
        r.register(
            "index_open",
            "1 while the index and its storage are open",
            m.index_open.clone(),
        );
        m
    }

    /// The endpoint to serve: ready while the index and its storage are open.
    pub fn endpoint(self: &Arc<Self>, registry: Arc<Registry>) -> Endpoint {
        let me = self.clone();
        let ready: ReadyFn = Arc::new(move || {
            if me.index_open.get() == 1 {
                Ok(())
            } else {
                Err("the index or its storage is not open".into())
            }
        });
        Endpoint {
            registry,
            ready,
            refresh: None,
        }
    }

    /// A request arrived on a session (`true`) or a stream of its own.
    pub fn received(&self, on_session: bool) {
        let transport = if on_session { "session" } else { "stream" };
        self.by_transport
            .get_or_create(&TransportLabels { transport })
            .inc();
    }

    /// A session opened (`true`) or ended.
    pub fn session(&self, opened: bool) {
        if opened {
            self.sessions.inc();
        } else {
            self.sessions.dec();
        }
    }

    /// Index loaded from storage and the listener up (`true`), or the loop ended (`false`).
    pub fn set_open(&self, open: bool) {
        self.index_open.set(i64::from(open));
    }

    pub fn record<E>(&self, ev: &SwarmEvent<E>) {
        self.p2p.record(ev);
    }

    pub fn record_identify(&self, ev: &libp2p::identify::Event) {
        self.p2p.record(ev);
    }

    pub fn record_ping(&self, ev: &libp2p::ping::Event) {
        self.p2p.record(ev);
    }

    /// A request was answered with `resp` after `took` in the index.
    pub fn request(&self, kind: &'static str, resp: &GisResponse, took: Duration) {
        let outcome = match resp {
            GisResponse::Error { .. } => "error",
            GisResponse::Unchanged => "unchanged",
            _ => "ok",
        };
        self.requests
            .get_or_create(&RequestLabels {
                request: kind,
                outcome,
            })
            .inc();
        if matches!(kind, "lookup" | "refresh") {
            self.lookup_seconds.observe(took.as_secs_f64());
        }
    }

    /// The event loop spent `took` on one piece of `work` ("batch", "liveness").
    pub fn busy(&self, work: &'static str, took: Duration) {
        self.busy_seconds
            .get_or_create(&WorkLabels { work })
            .observe(took.as_secs_f64());
    }

    pub fn committed(&self, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// Samples a replica's Raft metrics (no-op for a lone GIS).
    pub fn sample_raft(
        &self,
        m: &openraft::RaftMetrics<crate::cluster::NodeId, openraft::BasicNode>,
    ) {
        let Some(g) = &self.raft else { return };
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        g.term.set(int(m.current_term));
        let leading = m.current_leader == Some(m.id);
        g.leader.set(i64::from(leading));
        let last = m.last_log_index.unwrap_or(0);
        g.last_log_index.set(int(last));
        g.applied_index
            .set(int(m.last_applied.map_or(0, |l| l.index)));
        g.snapshot_index.set(int(m.snapshot.map_or(0, |l| l.index)));
        g.follower_lag.clear();
        if let (true, Some(replication)) = (leading, &m.replication) {
            for (id, matched) in replication.iter().filter(|(id, _)| **id != m.id) {
                let acked = matched.map_or(0, |l| l.index);
                g.follower_lag
                    .get_or_create(&ReplicaLabels {
                        replica: id.to_string(),
                    })
                    .set(int(last.saturating_sub(acked)));
            }
        }
    }

    /// Samples the index: hosts per IDC, role and state; images.
    pub fn sample(&self, index: &Index, now_ms: i64) {
        for v in index.idcs(now_ms) {
            let IdcView {
                idc,
                hosts,
                live_hosts,
                bridgeheads,
                live_bridgeheads,
            } = v;
            let live_plain = live_hosts.saturating_sub(live_bridgeheads);
            let dead_bridgeheads = bridgeheads.saturating_sub(live_bridgeheads);
            let dead_plain = hosts
                .saturating_sub(live_hosts)
                .saturating_sub(dead_bridgeheads);
            for (role, state, n) in [
                ("host", "live", live_plain),
                ("host", "dead", dead_plain),
                ("bridgehead", "live", live_bridgeheads),
                ("bridgehead", "dead", dead_bridgeheads),
            ] {
                self.hosts
                    .get_or_create(&HostLabels {
                        idc: idc.to_string(),
                        role,
                        state,
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        self.images
            .set(i64::try_from(index.image_count()).unwrap_or(i64::MAX));
    }
}

/// The metric label of a request kind.
pub fn request_kind(req: &GisRequest) -> &'static str {
    match req {
        GisRequest::Register { .. } => "register",
        GisRequest::Heartbeat { .. } => "heartbeat",
        GisRequest::Publish { .. } => "publish",
        GisRequest::Unpublish { .. } => "unpublish",
        GisRequest::Lookup { .. } => "lookup",
        GisRequest::Refresh { .. } => "refresh",
        GisRequest::Revoke { .. } => "revoke",
        GisRequest::UpgradePath { .. } => "upgrade_path",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_answered_unchanged_are_counted_apart() {
        let mut registry = Registry::default();
        let m = GisMetrics::new(&mut registry, false);
        for _ in 0..2 {
            m.request(
                "refresh",
                &GisResponse::Unchanged,
                Duration::from_micros(20),
            );
        }
        m.request(
            "refresh",
            &GisResponse::Error {
                kind: bids_protocols::gis::ErrorKind::UnknownImage,
                message: "no such image".into(),
            },
            Duration::from_micros(20),
        );
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &registry).unwrap();
        let s = bids_metrics::text::parse(&body).unwrap();
        let count = |outcome| {
            s.value(
                "bids_gis_requests_total",
                &[("request", "refresh"), ("outcome", outcome)],
            )
        };
        assert_eq!(count("unchanged"), Some(2.0));
        assert_eq!(count("error"), Some(1.0));
        assert_eq!(count("ok"), None);
        assert_eq!(s.value("bids_gis_lookup_seconds_count", &[]), Some(3.0));
    }
}
