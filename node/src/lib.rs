//! The BIDS host daemon: chunk store, download scheduler, swarm event loop, connection
//! gating and the local control API.

pub mod scheduler;
pub mod store;
pub mod transport;
