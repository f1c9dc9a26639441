//! The BIDS host daemon: chunk store, download scheduler, swarm event loop, connection
//! gating, accounting, rate limits, the local control API and admin commands relayed by the GIS.

pub mod accounting;
pub mod admin;
pub mod admin_gate;
pub mod announcer;
pub mod backoff;
pub mod cadence;
pub mod config;
pub mod control;
pub mod engine;
pub mod gate;
pub mod gis_session;
pub mod gis_watch;
pub mod heard;
pub mod metrics;
pub mod nodecore;
pub mod payload_cache;
pub mod peers;
pub mod ratelimit;
pub mod repair;
pub mod scheduler;
pub mod seeding;
pub mod serving;
pub mod startup;
pub mod store;
pub mod transport;
pub mod uploads;
pub mod versions;

pub use config::NodeConfig;
pub use engine::{FetchProgress, ImageReport, NodeHandle, NodeStatus};

/// Starts a node: its event loop (`engine`), and above it the executor of the admin
/// commands the loop admits (`admin`), which drives the node through a `NodeHandle` as any
/// caller would. Returns once the node listens.
pub async fn start(cfg: NodeConfig) -> anyhow::Result<(NodeHandle, tokio::task::JoinHandle<()>)> {
    let (admin_tx, admin_rx) = tokio::sync::mpsc::channel(engine::ADMIN_QUEUE);
    let (node, task) = engine::start(cfg, admin_tx).await?;
    tokio::spawn(admin::serve(node.downgrade(), admin_rx));
    Ok((node, task))
}
