//! Key files: an ed25519 libp2p keypair in its protobuf encoding, mode 0600.

use anyhow::{bail, Context, Result};
use libp2p::identity::Keypair;
use libp2p::PeerId;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const MAX_KEY_FILE: u64 = 4096;

pub fn generate(out: &Path) -> Result<Keypair> {
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .context("encoding the new keypair")?;
    write_new(out, &bytes)?;
    Ok(key)
}

/// Writes a new GIS cluster key (64 hex digits and a newline), mode 0600.
pub fn generate_cluster(out: &Path) -> Result<()> {
    let key = bids_gis::cluster::ClusterKey::generate();
    write_new(out, format!("{}\n", key.to_hex()).as_bytes())
}

/// Creates `out` (never over an existing file), mode 0600, with `bytes`, synced.
fn write_new(out: &Path, bytes: &[u8]) -> Result<()> {
    if out.exists() {
        bail!(
            "{} already exists; refusing to overwrite a key (remove it first)",
            out.display()
        );
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating key file {}", out.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing key file {}", out.display()))
}

pub fn load(path: &Path) -> Result<Keypair> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("reading key file {}", path.display()))?;
    if meta.len() > MAX_KEY_FILE {
        bail!(
            "{} is {} bytes, too large to be a key file",
            path.display(),
            meta.len()
        );
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("reading key file {}", path.display()))?;
    let key = Keypair::from_protobuf_encoding(&bytes).with_context(|| {
        format!(
            "{} is not a libp2p keypair (make one with `bids key gen`)",
            path.display()
        )
    })?;
    if key.clone().try_into_ed25519().is_err() {
        bail!(
            "{} holds a non-ed25519 key; BIDS needs ed25519 (`bids key gen`)",
            path.display()
        );
    }
    Ok(key)
}

pub fn parse_peer(s: &str) -> Result<PeerId> {
    s.parse::<PeerId>()
        .with_context(|| format!("{s:?} is not a peer id (see `bids key peer-id FILE`)"))
}
