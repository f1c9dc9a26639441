//! The BIDS host daemon: chunk store, download scheduler, swarm event loop, connection
//! gating, accounting, rate limits and the local control API.

pub mod accounting;
#[cfg(feature = "engine")]
pub mod config;
#[cfg(feature = "engine")]
pub mod control;
#[cfg(feature = "engine")]
pub mod engine;
pub mod gate;
pub mod ratelimit;
pub mod scheduler;
pub mod store;
pub mod transport;

#[cfg(feature = "engine")]
pub use config::NodeConfig;
#[cfg(feature = "engine")]
pub use engine::{start, FetchProgress, ImageReport, NodeHandle, NodeStatus};
