//! The in-process testnet: a GIS and several IDCs of BIDS nodes in one process on loopback,
//! with WAN and LAN links emulated between them. Production code never depends on it.

pub mod shaping;
#[cfg(feature = "cluster")]
pub mod cluster;
#[cfg(feature = "cluster")]
pub mod demo;
