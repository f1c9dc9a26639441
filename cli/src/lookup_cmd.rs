//! `bids lookup NAME:VER`: asks the GIS for the hierarchical host list and prints it as JSON.

use crate::keys;
use anyhow::{bail, Result};
use bids_protocols::gis::{GisRequest, GisResponse, HostEntry, ImageQuery};
use bids_protocols::{Idc, ImageRef};
use clap::Args;
use libp2p::Multiaddr;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct LookupArgs {
    /// The image, NAME:VERSION.
    image: String,
    /// GIS address ending in /p2p/<peer id>, as `bids gis` prints it. Repeat it once per
    /// replica of a GIS Raft group: they are asked in turn until one answers.
    #[arg(long, required = true)]
    gis: Vec<String>,
    /// Ask as a host of this IDC.
    #[arg(long)]
    idc: String,
    /// Ask with this identity (a registered bridgehead also sees level 2).
    #[arg(long)]
    key: Option<PathBuf>,
}

fn entry(e: &HostEntry) -> Value {
    json!({
        "peer": e.peer.to_string(),
        "idc": e.idc.to_string(),
        "role": e.role.to_string(),
        "addrs": e.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "chunks_held": e.chunks_held,
        "complete": e.complete,
    })
}

pub async fn run(a: LookupArgs) -> Result<()> {
    let image: ImageRef = a.image.parse().map_err(anyhow::Error::msg)?;
    let idc = Idc::new(&a.idc).map_err(anyhow::Error::msg)?;
    let gis: Vec<Multiaddr> = a
        .gis
        .iter()
        .map(|g| crate::settings::gis_addr(g))
        .collect::<Result<_>>()?;
    let key = match &a.key {
        Some(k) => keys::load(k)?,
        None => libp2p::identity::Keypair::generate_ed25519(),
    };
    let req = GisRequest::Lookup {
        image: ImageQuery::Ref(image.clone()),
        idc: Some(idc),
    };
    let resp = ask_any(&key, &gis, req).await?;
    match resp {
        GisResponse::HostList(l) => {
            let out = json!({
                "image": {
                    "name": l.image.name,
                    "version": l.image.version,
                    "id": l.image.id.to_hex(),
                    "size": l.image.size,
                    "chunk_size": l.image.chunk_size,
                },
                "level0": l.level0.iter().map(entry).collect::<Vec<_>>(),
                "level1": l.level1.iter().map(entry).collect::<Vec<_>>(),
                "level2": l.level2.iter().map(entry).collect::<Vec<_>>(),
            });
            outln!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        GisResponse::Error { message, .. } => bail!("{message}"),
        other => bail!("unexpected answer from the GIS: {other:?}"),
    }
}

/// Asks the GIS replicas in turn until one answers (its answer, a refusal included, is
/// final); each gets `PER_GIS` to answer.
async fn ask_any(
    key: &libp2p::identity::Keypair,
    gis: &[Multiaddr],
    req: GisRequest,
) -> Result<GisResponse> {
    const PER_GIS: Duration = Duration::from_secs(15);
    let mut failures = Vec::new();
    for g in gis {
        match bids_gis::client::request_once(key.clone(), g.clone(), req.clone(), PER_GIS).await {
            Ok(r) => return Ok(r),
            Err(e) => {
                tracing::warn!(gis = %g, error = %e, "GIS did not answer; asking the next one");
                failures.push(format!("{g}: {e:#}"));
            }
        }
    }
    bail!(
        "no GIS answered the lookup ({}); check that a GIS runs at one of the --gis addresses",
        failures.join("; ")
    )
}
