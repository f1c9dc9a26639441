//! The in-process testnet: a GIS and several IDCs of BIDS nodes in one process on loopback,
//! with WAN and LAN links emulated between them. Production code never depends on it.

pub mod bench;
pub mod cluster;
pub mod crowd;
pub mod demo;
pub mod evalplot;
pub mod linkemu;
pub mod shaping;
pub mod tcpref;
