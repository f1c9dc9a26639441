//! The admin control path (the paper's RMC → GIS → host): the console, as the admin identity,
//! asks the GIS what it knows (hosts, images, statistics) and sends commands to hosts through
//! it. Each host command is signed by the admin key, so a host can check it whatever path it
//! took. This module defines the messages, their size limits and the signatures; the GIS
//! decides whom it answers and the node decides what a command does.
//!
//! One protocol, `/bids/admin/1`, carries both legs: the console sends `AdminRequest`s to the
//! GIS, and the GIS forwards `AdminRequest::Command` unchanged to the target host over the
//! host's own connection.

use crate::cert::BridgeheadCert;
use crate::gis::{Counters, ImageInfo, ProvisionTime};
use crate::ids::{Idc, ImageId, ImageRef, Role};
use crate::manifest::ObjectKind;
use crate::peer::public_key_of;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use crate::gis::HostSettings;

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/bids/admin/1");
/// A request is a query or one signed command (a certificate and a file path at most).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// A response may list every host and image of a large deployment.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// Longest file path a `Publish` command may name.
pub const MAX_PATH_BYTES: usize = 4096;
/// A command older (or further in the future) than this is refused as stale, which bounds
/// how long a host must remember nonces to refuse replays.
pub const MAX_COMMAND_AGE_SECS: i64 = 120;

const SIGNING_DOMAIN: &[u8] = b"bids admin command v1\n";

/// What the console asks the GIS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
// Decoded once and handled at once; boxing the command buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum AdminRequest {
    /// Every registered host with liveness, role, settings and counters.
    Hosts,
    /// Every image, version and delta file with its holders per IDC.
    Images,
    /// Totals per IDC.
    Stats,
    /// A signed command for one host; the GIS forwards it and relays the host's answer.
    Command(SignedCommand),
    /// Revoke a bridgehead certificate serial (the GIS refuses it from then on).
    Revoke { serial: u64 },
}

/// The answers. A host's answer to a forwarded command is `Outcome` or `Error`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
// Decoded once and handled at once; boxing buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum AdminResponse {
    Hosts(Vec<HostInfo>),
    Images(Vec<ImageHolders>),
    Stats(Stats),
    Outcome(CommandOutcome),
    /// The registered hosts whose certificate carried the revoked serial.
    Revoked {
        hosts: Vec<PeerId>,
    },
    Error {
        kind: AdminErrorKind,
        message: String,
    },
}

/// Machine-readable refusal kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminErrorKind {
    /// The requester is not the admin, or a command did not come through the GIS.
    Forbidden,
    /// The command's signature does not verify against the admin key.
    BadSignature,
    /// Too old, from the future, or already seen (a replay).
    Stale,
    /// The target is not a registered host.
    UnknownHost,
    /// The target is registered but not connected to the GIS, or did not answer.
    Unreachable,
    /// The command is malformed or cannot apply (e.g. an image the host does not hold).
    BadRequest,
    /// The host tried and failed.
    Failed,
}

/// What a host is told to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostCommand {
    /// Rate limits in bytes/s, 0 = unlimited; applied at once to transfers in progress.
    SetLimits { upload_bps: u64, download_bps: u64 },
    /// Serve chunks to other hosts or not.
    SetSharing { enabled: bool },
    /// Download an image (through a delta chain when that moves fewer bytes).
    Fetch { image: ImageRef },
    /// Import the file at `file` (a path on the host) as `image` and publish it; with
    /// `from` (a version the host holds) also build and publish the delta `from` → `image`.
    /// `chunk_size` 0 takes the default (or `from`'s).
    Publish {
        file: String,
        image: ImageRef,
        from: Option<ImageRef>,
        #[serde(default)]
        chunk_size: u32,
    },
    /// Remove one image from the host by hand.
    Remove { image: ImageRef },
    /// Become a bridgehead of the host's IDC with this certificate (re-registers with it).
    SetCert { cert: BridgeheadCert },
    /// Stop being a bridgehead (drops the certificate, re-registers as an ordinary host).
    DropCert,
    /// Remove images by policy.
    Gc(GcRequest),
}

impl HostCommand {
    /// One line for the logs of the GIS and the host: what was ordered.
    pub fn describe(&self) -> String {
        match self {
            HostCommand::SetLimits {
                upload_bps,
                download_bps,
            } => format!(
                "set limits upload={upload_bps} B/s download={download_bps} B/s (0 = unlimited)"
            ),
            HostCommand::SetSharing { enabled } => {
                format!("set sharing {}", if *enabled { "on" } else { "off" })
            }
            HostCommand::Fetch { image } => format!("fetch {image}"),
            HostCommand::Publish {
                file, image, from, ..
            } => match from {
                Some(f) => format!("publish {image} from file {file:?} as a new version of {f}"),
                None => format!("publish {image} from file {file:?}"),
            },
            HostCommand::Remove { image } => format!("remove {image}"),
            HostCommand::SetCert { cert } => format!(
                "set bridgehead certificate serial {} (db id {}, IDC {})",
                cert.body.serial, cert.body.db_id, cert.body.idc
            ),
            HostCommand::DropCert => "drop bridgehead certificate".to_string(),
            HostCommand::Gc(g) => format!(
                "gc policy={} keep={:?} free_target={:?}{}",
                g.policy.as_str(),
                g.keep,
                g.free_target,
                if g.dry_run { " (dry run)" } else { "" }
            ),
        }
    }

    /// Checks what a decoded command must obey before anyone acts on it.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            HostCommand::Fetch { image } | HostCommand::Remove { image } => image.validate(),
            HostCommand::Publish {
                file, image, from, ..
            } => {
                if file.is_empty() || file.len() > MAX_PATH_BYTES {
                    return Err(format!(
                        "the file path must be 1 to {MAX_PATH_BYTES} bytes, got {}",
                        file.len()
                    ));
                }
                image.validate()?;
                if let Some(f) = from {
                    f.validate()?;
                }
                Ok(())
            }
            HostCommand::SetCert { cert } => cert.body.idc.validate(),
            HostCommand::Gc(g) => {
                if g.keep.is_none() && g.free_target.is_none() {
                    Err("a gc needs a keep count, a free-space target or both".into())
                } else {
                    Ok(())
                }
            }
            HostCommand::SetLimits { .. }
            | HostCommand::SetSharing { .. }
            | HostCommand::DropCert => Ok(()),
        }
    }
}

/// Which images go first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GcPolicy {
    /// Added to the store longest ago.
    Oldest,
    /// Least recently used (served or fetched).
    Lru,
    /// A pseudo-random order fixed by `GcRequest::seed`, so a dry run and the real run with
    /// the same seed pick the same images.
    Random,
}

impl GcPolicy {
    pub fn as_str(&self) -> &'static str {
        match self {
            GcPolicy::Oldest => "oldest",
            GcPolicy::Lru => "lru",
            GcPolicy::Random => "random",
        }
    }
}

impl std::str::FromStr for GcPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "oldest" => Ok(GcPolicy::Oldest),
            "lru" => Ok(GcPolicy::Lru),
            "random" => Ok(GcPolicy::Random),
            other => Err(format!(
                "gc policy {other:?} is unknown; use oldest, lru or random"
            )),
        }
    }
}

/// Remove images, in policy order, while more than `keep` remain or until `free_target`
/// bytes are freed (either condition alone, or both). Images being downloaded stay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    pub policy: GcPolicy,
    pub keep: Option<u32>,
    /// Bytes of disk to free.
    pub free_target: Option<u64>,
    pub dry_run: bool,
    #[serde(default)]
    pub seed: u64,
}

/// One image a gc removed (or would remove).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcItem {
    pub image: ImageRef,
    pub id: ImageId,
    pub kind: ObjectKind,
    /// Disk space it occupies (its file is sparse: zero chunks take none).
    pub disk_bytes: u64,
    /// Unix seconds.
    pub added_at: i64,
    /// Unix seconds.
    pub last_used: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// In the order they were (or would be) removed.
    pub removed: Vec<GcItem>,
    pub freed_bytes: u64,
    /// Images left on the host afterwards.
    pub kept: u32,
}

/// What a host did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    /// The host's settings after a `SetLimits` or `SetSharing`.
    Settings(HostSettings),
    /// The download started (or was already running).
    Fetching {
        image: ImageRef,
        id: ImageId,
    },
    /// Imported and published; `delta` is the delta file built from the `from` version.
    Published {
        image: ImageRef,
        id: ImageId,
        delta: Option<ImageId>,
    },
    Removed {
        image: ImageRef,
        id: ImageId,
    },
    /// The role the GIS granted after the host re-registered (with `serial`, or without a
    /// certificate).
    Role {
        role: Role,
        serial: Option<u64>,
    },
    Gc(GcReport),
}

/// The signed content of a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandBody {
    /// The host that must carry it out; any other host refuses it.
    pub target: PeerId,
    pub command: HostCommand,
    /// Unix seconds when the admin signed it.
    pub issued_at: i64,
    /// Unique per command, so a host can refuse a replay within `MAX_COMMAND_AGE_SECS`.
    pub nonce: u64,
    /// The admin that signed it.
    pub issuer: PeerId,
}

impl CommandBody {
    fn signing_bytes(&self) -> Result<Vec<u8>, CommandError> {
        let mut v = SIGNING_DOMAIN.to_vec();
        serde_cbor::to_writer(&mut v, self).map_err(|e| CommandError::Malformed(e.to_string()))?;
        Ok(v)
    }
}

/// A command plus the admin's ed25519 signature over its canonical bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommand {
    pub body: CommandBody,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a command is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command could not be encoded: {0}")]
    Malformed(String),
    #[error("command was signed by {found}, not by the admin {expected}")]
    WrongAdmin {
        expected: Box<PeerId>,
        found: Box<PeerId>,
    },
    #[error("admin identity {0} carries no ed25519 public key; configure the admin's peer id")]
    AdminKey(PeerId),
    #[error("command signature does not match its content (forged or corrupt)")]
    BadSignature,
    #[error("command is for host {target}, not for {me}")]
    OtherTarget {
        target: Box<PeerId>,
        me: Box<PeerId>,
    },
    #[error("command was issued at {issued_at}, {age} s from now (at most {MAX_COMMAND_AGE_SECS} s allowed); check the clocks")]
    Stale { issued_at: i64, age: i64 },
    #[error("command nonce {0} was already used (a replay)")]
    Replay(u64),
    #[error("signing failed: {0}")]
    Sign(String),
}

impl CommandError {
    /// The wire kind a refusal maps to.
    pub fn kind(&self) -> AdminErrorKind {
        match self {
            CommandError::Malformed(_) | CommandError::Sign(_) => AdminErrorKind::BadRequest,
            CommandError::WrongAdmin { .. }
            | CommandError::AdminKey(_)
            | CommandError::BadSignature => AdminErrorKind::BadSignature,
            CommandError::OtherTarget { .. } => AdminErrorKind::Forbidden,
            CommandError::Stale { .. } | CommandError::Replay(_) => AdminErrorKind::Stale,
        }
    }
}

impl SignedCommand {
    /// Signs `command` for `target` with the admin key at `now` (unix seconds).
    pub fn sign(
        admin: &Keypair,
        target: PeerId,
        command: HostCommand,
        now: i64,
        nonce: u64,
    ) -> Result<Self, CommandError> {
        let body = CommandBody {
            target,
            command,
            issued_at: now,
            nonce,
            issuer: admin.public().to_peer_id(),
        };
        let signature = admin
            .sign(&body.signing_bytes()?)
            .map_err(|e| CommandError::Sign(e.to_string()))?;
        Ok(SignedCommand { body, signature })
    }

    /// Checks the issuer is `admin`, the signature, and that it is fresh at `now` (unix
    /// seconds). Replays within the window are the receiver's to track (by `body.nonce`).
    pub fn verify(&self, admin: &PeerId, now: i64) -> Result<(), CommandError> {
        if &self.body.issuer != admin {
            return Err(CommandError::WrongAdmin {
                expected: Box::new(*admin),
                found: Box::new(self.body.issuer),
            });
        }
        let key = public_key_of(admin).ok_or(CommandError::AdminKey(*admin))?;
        if !key.verify(&self.body.signing_bytes()?, &self.signature) {
            return Err(CommandError::BadSignature);
        }
        let age = now.saturating_sub(self.body.issued_at);
        if age.abs() > MAX_COMMAND_AGE_SECS {
            return Err(CommandError::Stale {
                issued_at: self.body.issued_at,
                age,
            });
        }
        Ok(())
    }

    /// `verify` plus: the command is addressed to `me`.
    pub fn verify_for(&self, admin: &PeerId, me: &PeerId, now: i64) -> Result<(), CommandError> {
        self.verify(admin, now)?;
        if &self.body.target != me {
            return Err(CommandError::OtherTarget {
                target: Box::new(self.body.target),
                me: Box::new(*me),
            });
        }
        Ok(())
    }
}

/// State of a host's bridgehead certificate as the GIS sees it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertStatus {
    Valid,
    NotYetValid,
    Expired,
    Revoked,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    pub serial: u64,
    pub db_id: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    pub status: CertStatus,
}

/// Transfer counters of one image on one host (or summed over an IDC).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCounters {
    pub id: ImageId,
    pub counters: Counters,
}

/// A host as the console shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub peer: PeerId,
    pub idc: Idc,
    /// `Bridgehead` only while its certificate is valid.
    pub role: Role,
    /// Heartbeats arrive within the GIS's timeout.
    pub alive: bool,
    /// Connected to the GIS now, so commands can reach it.
    pub connected: bool,
    pub addrs: Vec<Multiaddr>,
    /// Unix ms of the last register or heartbeat since the GIS started.
    pub last_seen_ms: Option<i64>,
    pub registered_ms: i64,
    pub cert: Option<CertInfo>,
    /// Rate limits and sharing as of its last heartbeat (`None`: not reported yet).
    pub settings: Option<HostSettings>,
    /// Totals since the host started.
    pub counters: Counters,
    /// Per image.
    pub image_counters: Vec<ImageCounters>,
    /// Cross-IDC connections it refused.
    pub refusals: u64,
    /// Images it holds any part of.
    pub images: u32,
    /// How long each image it downloaded took, as it reported (absent from older GISes).
    #[serde(default)]
    pub provisions: Vec<ImageProvision>,
}

/// A host's provision time of one image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageProvision {
    pub id: ImageId,
    pub time: ProvisionTime,
}

/// The provision time of one image on one host of an IDC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProvision {
    pub peer: PeerId,
    pub id: ImageId,
    pub time: ProvisionTime,
}

/// One holder of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub peer: PeerId,
    pub alive: bool,
    pub chunks_held: u32,
    pub complete: bool,
    /// Downloading it now (progress = `chunks_held` / `ImageHolders::chunks`).
    pub fetching: bool,
}

/// An image version or delta file with its holders grouped by IDC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageHolders {
    pub info: ImageInfo,
    pub kind: ObjectKind,
    /// The version it derives from.
    pub base: Option<ImageRef>,
    pub chunks: u32,
    pub publisher: PeerId,
    pub published_ms: i64,
    pub holders: BTreeMap<Idc, Vec<Holder>>,
}

/// Totals of one IDC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdcStats {
    pub idc: Idc,
    pub hosts: u32,
    pub live_hosts: u32,
    /// Hosts with a currently valid certificate.
    pub bridgeheads: u32,
    pub live_bridgeheads: u32,
    /// Sum of its hosts' counters (as of their last heartbeats). `wan_recv_bytes` is what
    /// entered the IDC over the WAN.
    pub counters: Counters,
    /// The same per image.
    pub images: Vec<ImageCounters>,
    /// Provision times its hosts reported, per host and image (absent from older GISes).
    #[serde(default)]
    pub provisions: Vec<HostProvision>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// The GIS's clock (unix ms) when it answered.
    pub now_ms: i64,
    pub hosts: u32,
    pub live_hosts: u32,
    pub images: u32,
    pub idcs: Vec<IdcStats>,
    /// The distribution policy the GIS runs (absent from older GISes).
    #[serde(default)]
    pub policy: Option<crate::Policy>,
}

pub type Codec = crate::codec::CborCodec<AdminRequest, AdminResponse>;

pub fn codec() -> Codec {
    Codec::new(MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::CertBody;
    use crate::codec::{decode_body, encode_frame};
    use proptest::prelude::*;

    fn round_trip_req(r: &AdminRequest) -> AdminRequest {
        let f = encode_frame(r, MAX_REQUEST_BYTES).unwrap();
        decode_body(&f[4..], MAX_REQUEST_BYTES).unwrap()
    }

    fn commands(admin: &Keypair) -> Vec<HostCommand> {
        let cert = BridgeheadCert::issue(
            admin,
            CertBody {
                peer: PeerId::random(),
                idc: Idc::new("B").unwrap(),
                db_id: "b-2".into(),
                serial: 7,
                not_before: 0,
                not_after: i64::MAX,
                issuer: PeerId::random(),
            },
        )
        .unwrap();
        vec![
            HostCommand::SetLimits {
                upload_bps: 1,
                download_bps: 0,
            },
            HostCommand::SetSharing { enabled: false },
            HostCommand::Fetch {
                image: "a:1".parse().unwrap(),
            },
            HostCommand::Publish {
                file: "img.raw".into(),
                image: "a:2".parse().unwrap(),
                from: Some("a:1".parse().unwrap()),
                chunk_size: 0,
            },
            HostCommand::Remove {
                image: "a:1".parse().unwrap(),
            },
            HostCommand::SetCert { cert },
            HostCommand::DropCert,
            HostCommand::Gc(GcRequest {
                policy: GcPolicy::Lru,
                keep: Some(1),
                free_target: None,
                dry_run: true,
                seed: 3,
            }),
        ]
    }

    #[test]
    fn every_command_round_trips_and_verifies() {
        let admin = Keypair::generate_ed25519();
        let a = admin.public().to_peer_id();
        let target = PeerId::random();
        for (i, c) in commands(&admin).into_iter().enumerate() {
            c.validate().unwrap();
            assert!(!c.describe().is_empty());
            let s = SignedCommand::sign(&admin, target, c, 1000, i as u64).unwrap();
            let back = round_trip_req(&AdminRequest::Command(s.clone()));
            assert_eq!(back, AdminRequest::Command(s.clone()));
            let AdminRequest::Command(back) = back else {
                unreachable!()
            };
            back.verify_for(&a, &target, 1000).unwrap();
        }
    }

    #[test]
    fn forged_stale_and_misaddressed_commands_are_refused() {
        let admin = Keypair::generate_ed25519();
        let a = admin.public().to_peer_id();
        let target = PeerId::random();
        let cmd = HostCommand::SetSharing { enabled: true };
        let s = SignedCommand::sign(&admin, target, cmd.clone(), 1000, 1).unwrap();

        // Content changed after signing.
        let mut forged = s.clone();
        forged.body.command = HostCommand::SetSharing { enabled: false };
        assert_eq!(forged.verify(&a, 1000), Err(CommandError::BadSignature));
        // Signed by someone else who claims to be the admin.
        let mut other =
            SignedCommand::sign(&Keypair::generate_ed25519(), target, cmd, 1000, 1).unwrap();
        assert!(matches!(
            other.verify(&a, 1000),
            Err(CommandError::WrongAdmin { .. })
        ));
        other.body.issuer = a;
        assert_eq!(other.verify(&a, 1000), Err(CommandError::BadSignature));
        // Too old, too far ahead.
        assert!(matches!(
            s.verify(&a, 1000 + MAX_COMMAND_AGE_SECS + 1),
            Err(CommandError::Stale { .. })
        ));
        assert!(matches!(
            s.verify(&a, 1000 - MAX_COMMAND_AGE_SECS - 1),
            Err(CommandError::Stale { .. })
        ));
        // For another host.
        let e = s.verify_for(&a, &PeerId::random(), 1000).unwrap_err();
        assert_eq!(e.kind(), AdminErrorKind::Forbidden);
    }

    #[test]
    fn validation_refuses_bad_commands() {
        let gc = HostCommand::Gc(GcRequest {
            policy: GcPolicy::Oldest,
            keep: None,
            free_target: None,
            dry_run: false,
            seed: 0,
        });
        assert!(gc.validate().is_err());
        let long = HostCommand::Publish {
            file: "x".repeat(MAX_PATH_BYTES + 1),
            image: "a:1".parse().unwrap(),
            from: None,
            chunk_size: 0,
        };
        assert!(long.validate().is_err());
        let bad_ref = HostCommand::Fetch {
            image: ImageRef {
                name: "a b".into(),
                version: "1".into(),
            },
        };
        assert!(bad_ref.validate().is_err());
        assert_eq!("lru".parse::<GcPolicy>(), Ok(GcPolicy::Lru));
        assert!("newest".parse::<GcPolicy>().is_err());
    }

    #[test]
    fn oversized_requests_are_refused() {
        let admin = Keypair::generate_ed25519();
        let s = SignedCommand::sign(
            &admin,
            PeerId::random(),
            HostCommand::Publish {
                file: "x".repeat(MAX_REQUEST_BYTES),
                image: "a:1".parse().unwrap(),
                from: None,
                chunk_size: 0,
            },
            0,
            0,
        )
        .unwrap();
        assert!(encode_frame(&AdminRequest::Command(s), MAX_REQUEST_BYTES).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_body::<AdminRequest>(&bytes, MAX_REQUEST_BYTES);
            let _ = decode_body::<AdminResponse>(&bytes, MAX_RESPONSE_BYTES);
        }

        #[test]
        fn corrupted_commands_never_panic_and_never_verify_changed(
            flip in 0usize..4096, bit in 0u8..8
        ) {
            let admin = Keypair::generate_ed25519();
            let a = admin.public().to_peer_id();
            let s = SignedCommand::sign(&admin, a, HostCommand::SetLimits { upload_bps: 5, download_bps: 6 }, 0, 9).unwrap();
            let mut f = encode_frame(&AdminRequest::Command(s.clone()), MAX_REQUEST_BYTES).unwrap();
            let i = 4 + flip % (f.len() - 4);
            f[i] ^= 1 << bit;
            if let Ok(AdminRequest::Command(c)) = decode_body::<AdminRequest>(&f[4..], MAX_REQUEST_BYTES) {
                if c != s {
                    prop_assert!(c.verify(&a, 0).is_err());
                }
            }
        }
    }
}
