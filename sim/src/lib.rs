//! `bids sim`: a deterministic discrete-event simulator that drives the node's real sans-IO
//! core (`bids_node::nodecore`) and the GIS's real `Index` over a flow-level network
//! model (`flow`), on which simulated transfers share links max-min fairly. It holds no
//! copy of their logic: `world` only moves bytes and messages and tells the cores what
//! happened; `store` holds which chunks a simulated host has.

pub mod flow;
pub mod store;
pub mod validate;
pub mod world;

pub use flow::{FlowId, FlowNet, LinkId};
pub use world::{Fault, HostRow, IdcRow, Params, Progress, Report, World};
