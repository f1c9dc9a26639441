//! `bids cert issue|verify|show`: bridgehead certificates signed with the admin key.

use crate::keys;
use anyhow::{bail, Context, Result};
use bids_protocols::cert::{BridgeheadCert, CertBody, Revocations};
use bids_protocols::Idc;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum CertCmd {
    /// Sign a bridgehead certificate with the admin key.
    Issue {
        /// The admin's keypair file (`bids key gen`), whose peer id every GIS and node gets as
        /// --admin-peer.
        #[arg(long)]
        admin_key: PathBuf,
        /// The bridgehead's peer id.
        #[arg(long)]
        peer: String,
        /// The IDC the bridgehead serves (it must run with this --idc).
        #[arg(long)]
        idc: String,
        /// The admin-assigned bridgehead id.
        #[arg(long)]
        db_id: String,
        /// Validity in days from now (default 365).
        #[arg(long, conflicts_with = "not_after")]
        days: Option<u32>,
        /// End of validity, RFC 3339 (e.g. 2027-01-01T00:00:00Z).
        #[arg(long)]
        not_after: Option<String>,
        /// The certificate file to write; an existing file is kept unless --force.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite --out if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Verify a certificate; exit 0 if valid, non-zero with the reason otherwise.
    Verify {
        /// The certificate file.
        file: PathBuf,
        /// Peer id of the admin whose signature it must carry.
        #[arg(long)]
        admin_peer: String,
        /// The peer that presents it.
        #[arg(long)]
        peer: Option<String>,
        /// The IDC the peer claims.
        #[arg(long)]
        idc: Option<String>,
        /// A revocation list: a file of revoked serials, one per line.
        #[arg(long)]
        revoked: Option<PathBuf>,
    },
    /// Print a certificate readably.
    Show {
        /// The certificate file.
        file: PathBuf,
    },
}

pub fn read_cert(path: &std::path::Path) -> Result<BridgeheadCert> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading certificate {}", path.display()))?;
    if meta.len() > bids_protocols::cert::MAX_CERT_BYTES as u64 {
        bail!("{} is too large to be a certificate", path.display());
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("reading certificate {}", path.display()))?;
    BridgeheadCert::from_bytes(&bytes)
        .with_context(|| format!("{} is not a bridgehead certificate", path.display()))
}

/// Writes `bytes` to `out`, which must not exist unless `force` (as `bids key gen` refuses
/// to overwrite a key, so a certificate in use is not replaced by a slip).
fn write_new(out: &std::path::Path, bytes: &[u8], force: bool) -> Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true);
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let mut f = match o.open(out) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "{} already exists; refusing to overwrite a certificate (pass --force to replace it)",
            out.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("creating {}", out.display())),
    };
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", out.display()))
}

fn parse_rfc3339(s: &str) -> Result<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("{s:?} is not an RFC 3339 time (e.g. 2027-01-01T00:00:00Z)"))?;
    Ok(t.unix_timestamp())
}

fn read_revocations(path: &std::path::Path) -> Result<Revocations> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading revocation list {}", path.display()))?;
    let mut r = Revocations::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let serial: u64 = line.parse().with_context(|| {
            format!(
                "{}:{}: {line:?} is not a serial number",
                path.display(),
                n + 1
            )
        })?;
        r.serials.insert(serial);
    }
    Ok(r)
}

pub fn run(cmd: CertCmd) -> Result<()> {
    match cmd {
        CertCmd::Issue {
            admin_key,
            peer,
            idc,
            db_id,
            days,
            not_after,
            out,
            force,
        } => {
            let admin = keys::load(&admin_key)?;
            let peer = keys::parse_peer(&peer)?;
            let idc = Idc::new(&idc).map_err(anyhow::Error::msg)?;
            if db_id.is_empty() || db_id.len() > 64 {
                bail!("--db-id must be 1 to 64 characters");
            }
            let now = bids_protocols::unix_now();
            let not_after = match (days, not_after) {
                (_, Some(s)) => parse_rfc3339(&s)?,
                (Some(d), None) => now + d as i64 * 86_400,
                (None, None) => now + 365 * 86_400,
            };
            if not_after <= now {
                bail!("the certificate would already be expired (not-after is in the past)");
            }
            let body = CertBody {
                peer,
                idc,
                db_id,
                serial: rand::random::<u64>() >> 1,
                not_before: now - 60,
                not_after,
                issuer: peer,
            };
            let cert = BridgeheadCert::issue(&admin, body).map_err(anyhow::Error::msg)?;
            write_new(&out, &cert.to_bytes(), force)?;
            eprint!("{}", cert.describe());
            Ok(())
        }
        CertCmd::Verify {
            file,
            admin_peer,
            peer,
            idc,
            revoked,
        } => {
            let cert = read_cert(&file)?;
            let admin = keys::parse_peer(&admin_peer)?;
            let revs = match revoked {
                Some(p) => read_revocations(&p)?,
                None => Revocations::default(),
            };
            let now = bids_protocols::unix_now();
            cert.verify(&admin, now, &revs)?;
            if let Some(p) = peer {
                let p = keys::parse_peer(&p)?;
                let idc = match idc {
                    Some(i) => Idc::new(&i).map_err(anyhow::Error::msg)?,
                    None => cert.body.idc.clone(),
                };
                cert.verify_for(&admin, &p, &idc, now, &revs)?;
            } else if let Some(i) = idc {
                let idc = Idc::new(&i).map_err(anyhow::Error::msg)?;
                cert.verify_for(&admin, &cert.body.peer, &idc, now, &revs)?;
            }
            outln!(
                "valid: bridgehead {} of IDC {} (db id {}, serial {})",
                cert.body.peer,
                cert.body.idc,
                cert.body.db_id,
                cert.body.serial
            );
            Ok(())
        }
        CertCmd::Show { file } => {
            let cert = read_cert(&file)?;
            out!("{}", cert.describe());
            Ok(())
        }
    }
}
