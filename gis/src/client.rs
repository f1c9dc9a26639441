//! A throwaway GIS client: builds its own small swarm, dials the GIS, sends requests one
//! after another and returns the responses. For the CLI (`bids lookup`, `bids cert revoke`)
//! and tests; nodes keep their own long-lived swarm and connection instead.

use anyhow::{bail, Context};
use bids_protocols::gis::{self, GisRequest, GisResponse};
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use std::time::Duration;

type Behaviour = request_response::Behaviour<gis::Codec>;

/// Sends one request to the GIS at `gis_addr` as the identity `keypair` and returns its
/// response. `timeout` bounds the whole exchange, dial included.
pub async fn request_once(
    keypair: Keypair,
    gis_addr: Multiaddr,
    req: GisRequest,
    timeout: Duration,
) -> anyhow::Result<GisResponse> {
    let mut out = request_many(keypair, gis_addr, vec![req], timeout).await?;
    out.pop()
        .context("the GIS connection ended without a response")
}

/// Sends `reqs` in order over one connection, each after the previous one was answered (so
/// a `Register` takes effect before the `Lookup` that follows it).
pub async fn request_many(
    keypair: Keypair,
    gis_addr: Multiaddr,
    reqs: Vec<GisRequest>,
    timeout: Duration,
) -> anyhow::Result<Vec<GisResponse>> {
    let expected = gis_addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    });
    let mut swarm = build_swarm(keypair, timeout)?;
    let exchange = exchange(&mut swarm, gis_addr.clone(), expected, reqs);
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r.with_context(|| format!("talking to the GIS at {gis_addr}")),
        Err(_) => bail!("the GIS at {gis_addr} did not answer within {timeout:?}"),
    }
}

fn build_swarm(keypair: Keypair, timeout: Duration) -> anyhow::Result<Swarm<Behaviour>> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .context("building the tcp/noise/yamux transport")?
        .with_behaviour(|_| {
            Behaviour::with_codec(
                gis::codec(),
                [(gis::PROTOCOL, ProtocolSupport::Outbound)],
                request_response::Config::default().with_request_timeout(timeout),
            )
        })
        .context("building the GIS client behaviour")?
        // Each request opens a stream: settle its protocol without waiting a round trip
        // for the GIS to confirm it (V1 would cost one RTT more per request).
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(timeout)
                .with_substream_upgrade_protocol_override(bids_protocols::STREAM_NEGOTIATION)
        })
        .build())
}

async fn exchange(
    swarm: &mut Swarm<Behaviour>,
    addr: Multiaddr,
    expected: Option<PeerId>,
    reqs: Vec<GisRequest>,
) -> anyhow::Result<Vec<GisResponse>> {
    let total = reqs.len();
    let mut pending = reqs.into_iter();
    let mut responses = Vec::with_capacity(total);
    if total == 0 {
        return Ok(responses);
    }
    swarm.dial(addr).context("dialing")?;
    let mut gis: Option<PeerId> = None;
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if gis.is_none() => {
                if let Some(want) = expected {
                    if want != peer_id {
                        bail!("the peer at this address is {peer_id}, not the GIS {want}");
                    }
                }
                gis = Some(peer_id);
                if let Some(req) = pending.next() {
                    swarm.behaviour_mut().send_request(&peer_id, req);
                }
            }
            SwarmEvent::Behaviour(request_response::Event::Message {
                peer,
                message: request_response::Message::Response { response, .. },
                ..
            }) => {
                responses.push(response);
                match pending.next() {
                    Some(req) => {
                        swarm.behaviour_mut().send_request(&peer, req);
                    }
                    None => return Ok(responses),
                }
            }
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                bail!("request {} of {total} failed: {error}", responses.len() + 1);
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                bail!("could not connect: {error}");
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, .. } if Some(peer_id) == gis => {
                bail!(
                    "the GIS closed the connection after {} of {total} responses ({cause:?})",
                    responses.len()
                );
            }
            _ => {}
        }
    }
}
