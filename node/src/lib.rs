//! The BIDS host daemon: chunk store, download scheduler, swarm event loop, connection
//! gating, accounting, rate limits, the local control API and admin commands relayed by the GIS.

pub mod accounting;
pub mod admin;
pub mod backoff;
pub mod config;
pub mod control;
pub mod engine;
pub mod gate;
pub mod gis_watch;
pub mod metrics;
pub mod payload_cache;
pub mod ratelimit;
pub mod repair;
pub mod scheduler;
pub mod seeding;
pub mod startup;
pub mod store;
pub mod transport;
pub mod versions;

pub use config::NodeConfig;
pub use engine::{start, FetchProgress, ImageReport, NodeHandle, NodeStatus};
