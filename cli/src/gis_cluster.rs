//! `bids gis` as one replica of a Raft group: the `--raft-id`, `--raft-listen`, `--peer`,
//! `--cluster-key` and `--join` flags and the `[cluster]` section of the GIS config file,
//! turned into the `ClusterConfig` the GIS runs with. Without `--raft-id` (or `cluster.node_id`) the GIS
//! is a single process, as before.

use anyhow::{bail, Context, Result};
use bids_gis::cluster::{ClusterConfig, ClusterKey, NodeId};
use clap::Args;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args, Debug, Default)]
pub struct ClusterArgs {
    /// Run as replica N of a GIS Raft group (a small number unique in the group, e.g. 1, 2
    /// or 3). Without it (and without `cluster.node_id` in --config) the GIS runs alone.
    #[arg(long, value_name = "N")]
    raft_id: Option<NodeId>,
    /// Where this replica's Raft listener binds (IP:PORT, e.g. 10.0.0.1:7100); the other
    /// replicas reach it there. Connections must prove the --cluster-key; the traffic is
    /// authenticated, not encrypted.
    #[arg(long, value_name = "IP:PORT")]
    raft_listen: Option<String>,
    /// The file holding the key every replica of the group shares (from `bids key cluster
    /// --out FILE`; copy the same file to each replica). Required with --raft-id.
    #[arg(long, value_name = "FILE")]
    cluster_key: Option<PathBuf>,
    /// Another replica of the group: its --raft-id and --raft-listen, as ID@IP:PORT (e.g.
    /// 2@10.0.0.2:7100). Repeat once per other replica; replaces `cluster.peers`.
    #[arg(long = "peer", value_name = "ID@IP:PORT")]
    peers: Vec<String>,
    /// This replica replaces a lost one, with a new --raft-id and an empty data dir: it does
    /// not form a group of its own but waits for the leader to add it, then catches up from
    /// a snapshot.
    #[arg(long)]
    join: bool,
    /// With --join: the --raft-id of the lost replica this one takes the place of. The
    /// joining replica asks the replicas given by --peer to add it; the leader adds it as a
    /// learner, lets it catch up, then gives it the lost replica's vote.
    #[arg(long, value_name = "ID", requires = "join")]
    replaces: Option<NodeId>,
}

/// The `[cluster]` section of the GIS config file.
#[derive(Deserialize, Debug, Default)]
pub struct ClusterSettings {
    node_id: Option<NodeId>,
    raft_listen: Option<String>,
    /// The cluster key file (`--cluster-key`).
    key_file: Option<PathBuf>,
    #[serde(default)]
    peers: Vec<String>,
    #[serde(default)]
    join: bool,
    replaces: Option<NodeId>,
}

/// Parses one `ID@IP:PORT`.
pub fn parse_peer(s: &str) -> Result<(NodeId, SocketAddr)> {
    let (id, addr) = s.trim().split_once('@').with_context(|| {
        format!("--peer {s:?} must be ID@IP:PORT, e.g. 2@10.0.0.2:7100 (the other replica's --raft-id and --raft-listen)")
    })?;
    let id: NodeId = id
        .parse()
        .with_context(|| format!("--peer {s:?}: {id:?} is not a replica id (a whole number)"))?;
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("--peer {s:?}: {addr:?} is not IP:PORT"))?;
    Ok((id, addr))
}

/// Flags over the file's `[cluster]`; `None` when no replica id is set anywhere.
pub fn config(a: &ClusterArgs, file: Option<ClusterSettings>) -> Result<Option<ClusterConfig>> {
    let file = file.unwrap_or_default();
    let Some(node_id) = a.raft_id.or(file.node_id) else {
        if !a.peers.is_empty() || a.raft_listen.is_some() || a.join || a.cluster_key.is_some() {
            bail!("--peer, --raft-listen, --cluster-key and --join need --raft-id (this replica's id in the GIS Raft group)");
        }
        return Ok(None);
    };
    let listen = a
        .raft_listen
        .clone()
        .or(file.raft_listen)
        .with_context(|| {
            format!("replica {node_id} needs --raft-listen IP:PORT (or `raft_listen` in [cluster]): where the other replicas reach it")
        })?;
    let raft_listen: SocketAddr = listen
        .parse()
        .with_context(|| format!("--raft-listen {listen:?} is not IP:PORT"))?;
    let peers = if a.peers.is_empty() {
        file.peers
    } else {
        a.peers.clone()
    };
    let key_file = a.cluster_key.clone().or(file.key_file).with_context(|| {
        format!("replica {node_id} needs --cluster-key FILE (or `key_file` in [cluster]): the key the replicas share, made once with `bids key cluster --out FILE` and copied to each")
    })?;
    let key = ClusterKey::read(&key_file).map_err(anyhow::Error::msg)?;
    let mut members = BTreeMap::from([(node_id, raft_listen)]);
    for p in &peers {
        let (id, addr) = parse_peer(p)?;
        if members.insert(id, addr).is_some() {
            bail!("replica id {id} appears twice among --raft-id and --peer; every replica needs its own id");
        }
    }
    Ok(Some(ClusterConfig {
        node_id,
        raft_listen,
        members,
        join: a.join || file.join,
        replaces: a.replaces.or(file.replaces),
        key,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh key file in a directory that goes away with the returned guard.
    fn key_file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cluster.key");
        std::fs::write(&p, ClusterKey::generate().to_hex()).unwrap();
        (dir, p)
    }

    fn args(
        key: &(tempfile::TempDir, PathBuf),
        id: Option<NodeId>,
        listen: Option<&str>,
        peers: &[&str],
    ) -> ClusterArgs {
        ClusterArgs {
            raft_id: id,
            raft_listen: listen.map(String::from),
            cluster_key: Some(key.1.clone()),
            peers: peers.iter().map(|s| s.to_string()).collect(),
            join: false,
            replaces: None,
        }
    }

    #[test]
    fn no_id_means_a_single_gis() {
        let key = key_file();
        let mut alone = args(&key, None, None, &[]);
        alone.cluster_key = None;
        assert_eq!(config(&alone, None).unwrap(), None);
        let e = config(&args(&key, None, None, &["2@127.0.0.1:1"]), None).unwrap_err();
        assert!(e.to_string().contains("--raft-id"), "{e}");
    }

    #[test]
    fn flags_make_the_membership_and_win_over_the_file() {
        let key = key_file();
        let file = ClusterSettings {
            node_id: Some(9),
            raft_listen: Some("127.0.0.1:9".into()),
            key_file: None,
            peers: vec!["8@127.0.0.1:8".into()],
            join: false,
            replaces: None,
        };
        let c = config(
            &args(
                &key,
                Some(1),
                Some("127.0.0.1:7101"),
                &["2@127.0.0.1:7102", "3@127.0.0.1:7103"],
            ),
            Some(file),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(c.members.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(c.members[&3], "127.0.0.1:7103".parse().unwrap());
    }

    #[test]
    fn the_file_alone_is_enough() {
        let key = key_file();
        let file = ClusterSettings {
            node_id: Some(2),
            raft_listen: Some("127.0.0.1:7102".into()),
            key_file: Some(key.1.clone()),
            peers: vec!["1@127.0.0.1:7101".into()],
            join: true,
            replaces: Some(3),
        };
        let c = config(&ClusterArgs::default(), Some(file))
            .unwrap()
            .unwrap();
        assert_eq!(c.node_id, 2);
        assert!(c.join);
        assert_eq!(c.replaces, Some(3));
        assert_eq!(c.members.len(), 2);
    }

    #[test]
    fn bad_peers_say_what_is_wrong() {
        let key = key_file();
        for (p, says) in [
            ("2-127.0.0.1:1", "ID@IP:PORT"),
            ("x@127.0.0.1:1", "not a replica id"),
            ("2@localhost", "not IP:PORT"),
            ("1@127.0.0.1:2", "twice"),
        ] {
            let e = config(&args(&key, Some(1), Some("127.0.0.1:1"), &[p]), None).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{p}: {e:#}");
        }
        let e = config(&args(&key, Some(1), None, &[]), None).unwrap_err();
        assert!(e.to_string().contains("--raft-listen"), "{e}");
    }

    #[test]
    fn a_replica_needs_a_readable_key() {
        let key = key_file();
        let mut a = args(&key, Some(1), Some("127.0.0.1:1"), &[]);
        a.cluster_key = None;
        let e = config(&a, None).unwrap_err();
        assert!(e.to_string().contains("bids key cluster"), "{e}");
        a.cluster_key = Some(std::env::temp_dir().join("bids-no-such-cluster-key"));
        let e = config(&a, None).unwrap_err();
        assert!(e.to_string().contains("cannot read the cluster key"), "{e}");
        std::fs::write(&key.1, "not hex").unwrap();
        a.cluster_key = Some(key.1.clone());
        let e = config(&a, None).unwrap_err();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
    }
}
