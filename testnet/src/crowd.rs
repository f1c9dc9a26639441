//! Many idle hosts for a cluster's GIS: each with its own identity registers over its own
//! connection and sends one heartbeat, then leaves, exactly as a real node would start. For
//! seeing the console (and the GIS) with thousands of hosts without running thousands of nodes;
//! they hold no image, so no host list ever names them.

use anyhow::{Context, Result};
use bids_protocols::gis::{GisRequest, GisResponse, HostStats};
use bids_protocols::{Idc, Policy};
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use std::time::Duration;

/// How many registrations run at once.
const PARALLEL: usize = 16;

/// Registers `n` idle hosts spread round-robin over `idcs` with the GIS at `gis` (ending in
/// `/p2p/…`), under `policy`; returns their peer ids. Host `k` of an IDC numbered `i` says it
/// listens on 127.(i+1).(k/250+1)… port 9: nothing is ever dialled there.
pub async fn register_idle_hosts(
    gis: &Multiaddr,
    idcs: &[Idc],
    policy: Policy,
    n: usize,
) -> Result<Vec<PeerId>> {
    anyhow::ensure!(!idcs.is_empty(), "no IDC to register hosts in");
    let jobs = (0..n).map(|k| {
        let i = k % idcs.len();
        let idc = idcs[i].clone();
        let gis = gis.clone();
        async move {
            let key = Keypair::generate_ed25519();
            let peer = key.public().to_peer_id();
            let j = k / idcs.len();
            let addr: Multiaddr = format!(
                "/ip4/127.{}.{}.{}/tcp/9",
                (i + 1).min(255),
                (j / 250 + 100).min(255),
                j % 250 + 1
            )
            .parse()
            .context("idle host address")?;
            let reqs = vec![
                GisRequest::Register {
                    idc,
                    addrs: vec![addr],
                    cert: None,
                    policy,
                },
                GisRequest::Heartbeat {
                    stats: HostStats::default(),
                },
            ];
            let out = bids_gis::client::request_many(key, gis, reqs, Duration::from_secs(30))
                .await
                .with_context(|| format!("registering idle host {k}"))?;
            if let Some(GisResponse::Error { kind, message }) = out.first() {
                anyhow::bail!("the GIS refused idle host {k}: {kind:?}: {message}");
            }
            Ok(peer)
        }
    });
    let done: Vec<Result<PeerId>> = futures::stream::iter(jobs)
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    done.into_iter().collect()
}
