//! The Remote Management Console (the paper's RMC, §2.4 and §3.3): a web server that shows
//! the network's state with charts and lets the admin control hosts, bridgeheads and images.
//! It reaches the system only as the admin identity through the GIS (see [`gis_link`]).
//!
//! Layers, after the paper's MVC split:
//! - view: the embedded pages ([`assets`]) and the JSON API ([`api`], described in
//!   `rmc/openapi.yaml`), with login, sessions and CSRF checks from [`auth`];
//! - model: the API's JSON types ([`model`]) and the sampled history ([`history`]);
//! - service: [`console::Console`], one method per operation, including the bridgehead
//!   change flow (issue, push, revoke, demote);
//! - persistence: none of its own; the GIS holds the state, the console only a bounded
//!   in-memory history.

pub mod api;
pub mod assets;
pub mod auth;
pub mod console;
pub mod gis_link;
pub mod history;
pub mod metrics;
pub mod model;
pub mod query;
pub mod server;

pub use auth::AuthConfig;
pub use console::Console;
pub use gis_link::{AdminGis, GisCallError};
pub use server::{start, RmcConfig, RmcError, RmcHandle};
