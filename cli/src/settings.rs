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

/// Turns a missing required setting into a clear error.
pub fn required<T>(v: Option<T>, name: &str, flag: &str) -> Result<T> {
    v.ok_or_else(|| {
        anyhow::anyhow!(
            "missing setting `{name}`: pass {flag}, set BIDS_{} or put `{name} = …` in the --config file",
            name.to_uppercase()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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
