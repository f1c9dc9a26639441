//! The General Index Server: knows which hosts of which IDC hold which image, which
//! bridgeheads are certified, and answers each lookup with the paper's hierarchical host list.
//!
//! - [`index`]: the pure, deterministic `Index` (sans-IO; the caller passes the time).
//! - [`storage`]: the `Storage` trait that makes the index's changes durable (sled by default).
//! - [`server`]: the libp2p peer; one event loop owns the swarm, the index and the storage.
//! - `session`: hosts' long-lived GIS sessions, read and written by a task each.
//! - [`cluster`]: several GIS replicas as one Raft group (openraft), optional.
//! - [`client`]: a one-shot client for tools and tests.
//! - [`loadgen`]: `bids bench gis`, thousands of virtual hosts on the real protocol.
//! - [`admin`]: the admin control path at the GIS: queries, revocations, command relay.
//! - [`admin_client`]: the console's long-lived client for the admin control path.
//!
//! A lookup by requester R (IDC I) for image X answers, under the default `bids` policy:
//! - level 0: live hosts of I holding or fetching X, complete ones first, then by chunks held;
//! - level 1: when no live host of I holds X completely, the bridgehead of I chosen for X
//!   (unless that is R);
//! - level 2: only for that chosen bridgehead (and only while X is not complete in I): for
//!   each other IDC that holds any of X, or whose chosen bridgehead is fetching it, that IDC's
//!   chosen bridgehead.
//!
//! The chosen bridgehead of an IDC for an image is, among its live hosts with a valid
//! certificate, the one with the highest `sha256(peer id bytes || image id)` (rendezvous
//! hashing). Under the `baseline` policy level 0 lists live holders of every IDC (R's own
//! first) and levels 1 and 2 stay empty. Hosts whose certificate was revoked are never listed.

pub mod admin;
pub mod admin_client;
pub mod client;
pub mod cluster;
pub mod index;
pub mod loadgen;
pub mod metrics;
pub mod server;
mod session;
pub mod storage;

pub use index::{GisError, Index, IndexConfig};
pub use server::{run, spawn, GisConfig, GisHandle};
pub use storage::{MemStorage, SledStorage, Storage};
