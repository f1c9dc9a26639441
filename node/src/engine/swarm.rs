//! The node's libp2p swarm: its behaviours and how it is built and bound.

use crate::config::NodeConfig;
use crate::peers::HELLO_TIMEOUT;
use crate::transport::{self, TransportOptions};
use bids_protocols::{admin as adminp, chunk, gis as gisp, gossip, hello};
use futures::StreamExt;
use libp2p::request_response::{self as rr, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{gossipsub, identify, ping, Multiaddr, Swarm};
use prometheus_client::registry::Registry;
use std::time::Duration;
use tracing::debug;

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) gossipsub: gossipsub::Behaviour,
    pub(super) hello: rr::Behaviour<hello::Codec>,
    pub(super) chunk: rr::Behaviour<chunk::Codec>,
    pub(super) gis: rr::Behaviour<gisp::Codec>,
    /// Signed admin commands relayed by the GIS (`crate::admin`).
    pub(super) admin: rr::Behaviour<adminp::Codec>,
    /// GIS sessions this node opens (`super::gis_link`).
    pub(super) session: bids_protocols::gis_session::Behaviour,
}

/// Keeps chunk-sized buffers inside glibc's malloc arenas instead of handing them back to the
/// kernel after every chunk.
///
/// By default glibc serves blocks above a dynamic threshold with fresh `mmap`s and trims an
/// arena (`madvise`) once about 2 × 1 MiB sits free at its top. Chunk buffers (read,
/// encoded, framed, decrypted) are allocated and freed on different threads, so with the
/// defaults every chunk costs hundreds of page faults and page clears: `bids bench loopback`
/// measured a fifth of a node's CPU time there. Fixed thresholds stop that; what an arena
/// keeps is bounded by the buffers once in flight at the same time, not by image sizes
/// (`bids bench rss`: about +4 MiB peak). Process-wide, set once.
pub(super) fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// Above the largest buffer of a default 1 MiB chunk and its framing.
        const MMAP_THRESHOLD: libc::c_int = 4 << 20;
        /// Free memory an arena may keep at its top.
        const TRIM_THRESHOLD: libc::c_int = 32 << 20;
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters (under glibc's own locks);
            // it touches no memory of ours.
            let ok = unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                    && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            };
            if !ok {
                debug!("malloc thresholds not changed; chunk buffers may be re-faulted");
            }
        });
    }
}

/// A node's swarm, subscribed to `topic` and listening on the configuration's addresses;
/// returns it with the addresses it listens on (the real ports, ending in our peer id).
pub(super) async fn build(
    cfg: &NodeConfig,
    registry: &mut Registry,
    topic: &gossipsub::IdentTopic,
) -> anyhow::Result<(Swarm<Behaviour>, Vec<Multiaddr>)> {
    use anyhow::Context;
    let me = cfg.keypair.public().to_peer_id();
    let topts = TransportOptions {
        bind_ip: cfg.bind_ip,
        shaper: cfg.shaper.clone(),
        ..Default::default()
    };
    let keypair = cfg.keypair.clone();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
        .with_tokio()
        .with_other_transport(|k| {
            transport::build(k, topts)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .context("building transport")?
        .with_bandwidth_metrics(registry)
        .with_behaviour(|k| {
            let gcfg = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .mesh_n(6)
                .mesh_n_low(1)
                .mesh_n_high(12)
                .mesh_outbound_min(0)
                .flood_publish(true)
                .max_transmit_size(gossip::MAX_SEALED_BYTES)
                // Our announcements carry their own signature, checked only on a copy not
                // delivered by its author (`gossip::open`): gossipsub's would be checked on
                // every copy. Permissive: a message needs no gossipsub signature.
                .validation_mode(gossipsub::ValidationMode::Permissive)
                .message_id_fn(|m| {
                    gossipsub::MessageId::from(gossip::message_id(m.source.as_ref(), &m.data))
                })
                .build()
                .map_err(|e| format!("gossipsub config: {e}"))?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Author(k.public().to_peer_id()),
                gcfg,
            )?
            .with_metrics(
                registry.sub_registry_with_prefix("libp2p_gossipsub"),
                Default::default(),
            );
            let chunk_cfg = rr::Config::default()
                .with_request_timeout(Duration::from_secs(180))
                .with_max_concurrent_streams(1024);
            Ok(Behaviour {
                identify: identify::Behaviour::new(
                    identify::Config::new("/bids/id/1".into(), k.public())
                        .with_agent_version(crate::transport::agent_version()),
                ),
                ping: ping::Behaviour::default(),
                gossipsub,
                hello: rr::Behaviour::with_codec(
                    hello::codec(),
                    [(hello::PROTOCOL, ProtocolSupport::Full)],
                    rr::Config::default().with_request_timeout(HELLO_TIMEOUT),
                ),
                chunk: rr::Behaviour::with_codec(
                    chunk::codec(),
                    [(chunk::PROTOCOL, ProtocolSupport::Full)],
                    chunk_cfg,
                ),
                gis: rr::Behaviour::with_codec(
                    gisp::codec(),
                    [(gisp::PROTOCOL, ProtocolSupport::Outbound)],
                    rr::Config::default().with_request_timeout(Duration::from_secs(30)),
                ),
                admin: rr::Behaviour::with_codec(
                    adminp::codec(),
                    [(adminp::PROTOCOL, ProtocolSupport::Inbound)],
                    rr::Config::default().with_request_timeout(Duration::from_secs(110)),
                ),
                session: bids_protocols::gis_session::Behaviour::new(false),
            })
        })
        .map_err(|e| anyhow::anyhow!("building behaviours: {e}"))?
        // 0-RTT stream negotiation (see `bids_protocols::STREAM_NEGOTIATION`).
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(3600))
                .with_substream_upgrade_protocol_override(bids_protocols::STREAM_NEGOTIATION)
        })
        .build();

    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(topic)
        .map_err(|e| anyhow::anyhow!("subscribing to {topic}: {e:?}"))?;
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .with_context(|| format!("listening on {addr}"))?;
    }
    // Wait for the listeners to bind, so callers learn the real ports.
    let mut listen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while listen.len() < cfg.listen.len() {
        match tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => {
                listen.push(address.with_p2p(me).unwrap_or_else(|a| a));
            }
            Ok(SwarmEvent::ListenerError { error, .. })
            | Ok(SwarmEvent::ListenerClosed {
                reason: Err(error), ..
            }) => {
                anyhow::bail!("listening failed: {error}");
            }
            Ok(_) => {}
            Err(_) => anyhow::bail!("listening on {:?} did not succeed within 10 s", cfg.listen),
        }
    }
    Ok((swarm, listen))
}
