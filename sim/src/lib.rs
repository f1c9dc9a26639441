//! Building blocks of `bids sim`, the discrete-event simulator of issue 20: a flow-level
//! network model (`flow`) on which simulated transfers share links max-min fairly. The
//! simulator proper drives the node's sans-IO core and the GIS `Index` over it; this crate
//! holds no copy of their logic.

pub mod flow;

pub use flow::{FlowId, FlowNet, LinkId};
