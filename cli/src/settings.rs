//! Layered configuration: a TOML file (`--config`), then `BIDS_…` environment variables,
//! then command-line flags, the later winning (the `config` crate does the merging).

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use std::path::Path;

/// Merges the layers into `T`. `flags` are (key, value) pairs of the flags actually given.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    flags: &[(&str, Option<String>)],
) -> Result<T> {
    let mut b = config::Config::builder();
    if let Some(f) = file {
        if !f.exists() {
            anyhow::bail!("config file {} does not exist", f.display());
        }
        b = b.add_source(config::File::from(f).format(config::FileFormat::Toml));
    }
    b = b.add_source(config::Environment::with_prefix("BIDS").try_parsing(true));
    for (k, v) in flags {
        if let Some(v) = v {
            b = b
                .set_override(*k, v.clone())
                .with_context(|| format!("setting {k}"))?;
        }
    }
    let c = b.build().context("reading configuration")?;
    c.try_deserialize::<T>()
        .context("invalid configuration (file, BIDS_ environment or flags)")
}

/// A setting given in days (certificate validity and warning periods).
pub fn days(n: u64) -> std::time::Duration {
    std::time::Duration::from_secs(n.saturating_mul(86_400))
}

/// Turns a missing required setting into a clear error.
pub fn required<T>(v: Option<T>, name: &str, flag: &str) -> Result<T> {
    v.ok_or_else(|| {
        anyhow::anyhow!(
            "missing setting `{name}`: pass {flag}, set BIDS_{} or put `{name} = …` in the --config file",
            name.to_uppercase()
        )
    })
}

/// The one rule for every `--gis`: a multiaddr that ends in `/p2p/<the GIS's peer id>`,
/// because the connection is authenticated against that id (Noise) before anything is asked.
pub fn gis_addr(s: &str) -> Result<libp2p::Multiaddr> {
    const EXAMPLE: &str = "e.g. --gis /ip4/10.0.0.1/tcp/7000/p2p/12D3KooW… (`bids gis` prints its \
        full address at start; `bids key peer-id gis.key` gives the peer id)";
    let addr: libp2p::Multiaddr = s
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("--gis {s:?} is not a multiaddr ({e}); {EXAMPLE}"))?;
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(_)) => Ok(addr),
        _ => anyhow::bail!(
            "--gis {s:?} lacks the GIS's peer id: the address must end in /p2p/<peer id>, {EXAMPLE}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gis_addresses_need_the_peer_id() {
        let id = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        assert!(gis_addr(&format!("/ip4/127.0.0.1/tcp/7000/p2p/{id}")).is_ok());
        let e = gis_addr("/ip4/127.0.0.1/tcp/7000").unwrap_err().to_string();
        assert!(
            e.contains("/p2p/<peer id>") && e.contains("e.g. --gis /ip4/"),
            "{e}"
        );
        let e = gis_addr("127.0.0.1:7000").unwrap_err().to_string();
        assert!(e.contains("not a multiaddr") && e.contains("e.g."), "{e}");
    }
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    struct T {
        idc: Option<String>,
        store: Option<String>,
        heartbeat_secs: Option<u64>,
    }

    #[test]
    fn flags_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "idc = \"A\"\nstore = \"/s\"\nheartbeat_secs = 3\n").unwrap();
        let t: T = load(Some(&f), &[("idc", Some("B".into())), ("store", None)]).unwrap();
        assert_eq!(t.idc.as_deref(), Some("B"));
        assert_eq!(t.store.as_deref(), Some("/s"));
        assert_eq!(t.heartbeat_secs, Some(3));
        assert!(required::<u8>(None, "idc", "--idc")
            .unwrap_err()
            .to_string()
            .contains("BIDS_IDC"));
    }
}
