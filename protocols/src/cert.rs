//! Bridgehead certificates: an admin-signed statement that a peer is a designated bridgehead
//! of an IDC for a time window. Verification is pure: the caller supplies the clock.

use crate::ids::Idc;
use crate::peer::public_key_of;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Largest encoded certificate accepted.
pub const MAX_CERT_BYTES: usize = 4096;
const SIGNING_DOMAIN: &[u8] = b"bids bridgehead certificate v1\n";

/// The signed content of a certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertBody {
    /// The bridgehead's identity.
    pub peer: PeerId,
    pub idc: Idc,
    /// The admin-assigned bridgehead id, unique per IDC (the paper's "unique DB ID").
    pub db_id: String,
    /// Unique per certificate; revocation names serials.
    pub serial: u64,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// The admin that signed it.
    pub issuer: PeerId,
}

/// A certificate: body plus the admin's ed25519 signature over its canonical bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeheadCert {
    pub body: CertBody,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a certificate is not accepted. Messages say what failed and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("certificate is not valid CBOR: {0}")]
    Malformed(String),
    #[error("certificate was issued by {found}, not by the admin {expected}; ask the admin for a new one")]
    WrongAdmin {
        expected: Box<PeerId>,
        found: Box<PeerId>,
    },
    #[error("certificate signature does not match its content (tampered or corrupt); ask the admin for a new one")]
    BadSignature,
    #[error("admin identity {0} carries no ed25519 public key; configure the admin's peer id")]
    AdminKey(PeerId),
    #[error("bridgehead certificate for {peer} expired {at}; ask the admin for a new one")]
    Expired { peer: PeerId, at: String },
    #[error("bridgehead certificate for {peer} is not valid before {at}; check the clock or wait")]
    NotYetValid { peer: PeerId, at: String },
    #[error("certificate is for peer {found}, presented by {expected}")]
    OtherPeer {
        expected: Box<PeerId>,
        found: Box<PeerId>,
    },
    #[error("certificate is for IDC {found}, but the peer claims IDC {expected}")]
    OtherIdc { expected: Idc, found: Idc },
    #[error("certificate serial {serial} for {peer} was revoked by the admin")]
    Revoked { peer: PeerId, serial: u64 },
}

/// Serials the admin has revoked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    pub serials: BTreeSet<u64>,
}

impl Revocations {
    pub fn is_revoked(&self, serial: u64) -> bool {
        self.serials.contains(&serial)
    }
}

/// Unix seconds as RFC 3339 (the number itself if out of range).
pub fn fmt_time(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

impl CertBody {
    fn signing_bytes(&self) -> Vec<u8> {
        let mut v = SIGNING_DOMAIN.to_vec();
        v.extend(serde_cbor::to_vec(self).expect("a cert body always encodes"));
        v
    }
}

impl BridgeheadCert {
    /// Signs `body` with the admin key (its `issuer` is set to the admin's peer id).
    pub fn issue(admin: &Keypair, mut body: CertBody) -> Result<Self, String> {
        body.issuer = admin.public().to_peer_id();
        let signature = admin
            .sign(&body.signing_bytes())
            .map_err(|e| format!("signing failed: {e}"))?;
        Ok(BridgeheadCert { body, signature })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).expect("a cert always encodes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CertError> {
        if bytes.len() > MAX_CERT_BYTES {
            return Err(CertError::Malformed(format!(
                "{} bytes, more than {MAX_CERT_BYTES}",
                bytes.len()
            )));
        }
        serde_cbor::from_slice(bytes).map_err(|e| CertError::Malformed(e.to_string()))
    }

    /// Checks the signature against `admin`, the time window against `now` (unix seconds)
    /// and the revocation list. Identity checks are separate (`verify_for`).
    pub fn verify(&self, admin: &PeerId, now: i64, revoked: &Revocations) -> Result<(), CertError> {
        if &self.body.issuer != admin {
            return Err(CertError::WrongAdmin {
                expected: Box::new(*admin),
                found: Box::new(self.body.issuer),
            });
        }
        let key = public_key_of(admin).ok_or(CertError::AdminKey(*admin))?;
        if !key.verify(&self.body.signing_bytes(), &self.signature) {
            return Err(CertError::BadSignature);
        }
        if revoked.is_revoked(self.body.serial) {
            return Err(CertError::Revoked {
                peer: self.body.peer,
                serial: self.body.serial,
            });
        }
        if now < self.body.not_before {
            return Err(CertError::NotYetValid {
                peer: self.body.peer,
                at: fmt_time(self.body.not_before),
            });
        }
        if now > self.body.not_after {
            return Err(CertError::Expired {
                peer: self.body.peer,
                at: fmt_time(self.body.not_after),
            });
        }
        Ok(())
    }

    /// `verify` plus: the cert belongs to `peer` and names `idc`.
    pub fn verify_for(
        &self,
        admin: &PeerId,
        peer: &PeerId,
        idc: &Idc,
        now: i64,
        revoked: &Revocations,
    ) -> Result<(), CertError> {
        self.verify(admin, now, revoked)?;
        if &self.body.peer != peer {
            return Err(CertError::OtherPeer {
                expected: Box::new(*peer),
                found: Box::new(self.body.peer),
            });
        }
        if &self.body.idc != idc {
            return Err(CertError::OtherIdc {
                expected: idc.clone(),
                found: self.body.idc.clone(),
            });
        }
        Ok(())
    }

    /// Human-readable rendering for `bids cert show`.
    pub fn describe(&self) -> String {
        format!(
            "bridgehead certificate\n  peer:       {}\n  idc:        {}\n  db id:      {}\n  serial:     {}\n  not before: {}\n  not after:  {}\n  issuer:     {}\n",
            self.body.peer,
            self.body.idc,
            self.body.db_id,
            self.body.serial,
            fmt_time(self.body.not_before),
            fmt_time(self.body.not_after),
            self.body.issuer
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn setup() -> (Keypair, PeerId, BridgeheadCert) {
        let admin = Keypair::generate_ed25519();
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let cert = BridgeheadCert::issue(
            &admin,
            CertBody {
                peer,
                idc: Idc::new("B").unwrap(),
                db_id: "b-1".into(),
                serial: 42,
                not_before: 1000,
                not_after: 2000,
                issuer: peer,
            },
        )
        .unwrap();
        (admin, peer, cert)
    }

    #[test]
    fn valid_cert_verifies() {
        let (admin, peer, cert) = setup();
        let a = admin.public().to_peer_id();
        let c = BridgeheadCert::from_bytes(&cert.to_bytes()).unwrap();
        c.verify_for(
            &a,
            &peer,
            &Idc::new("B").unwrap(),
            1500,
            &Revocations::default(),
        )
        .unwrap();
    }

    #[test]
    fn every_failure_mode() {
        let (admin, peer, cert) = setup();
        let a = admin.public().to_peer_id();
        let none = Revocations::default();
        let b = Idc::new("B").unwrap();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        assert!(matches!(
            cert.verify(&other, 1500, &none),
            Err(CertError::WrongAdmin { .. })
        ));
        let mut forged = cert.clone();
        forged.body.not_after = 9999;
        assert_eq!(forged.verify(&a, 1500, &none), Err(CertError::BadSignature));
        assert!(matches!(
            cert.verify(&a, 2001, &none),
            Err(CertError::Expired { .. })
        ));
        assert!(matches!(
            cert.verify(&a, 999, &none),
            Err(CertError::NotYetValid { .. })
        ));
        assert!(matches!(
            cert.verify_for(&a, &other, &b, 1500, &none),
            Err(CertError::OtherPeer { .. })
        ));
        assert!(matches!(
            cert.verify_for(&a, &peer, &Idc::new("C").unwrap(), 1500, &none),
            Err(CertError::OtherIdc { .. })
        ));
        let mut rev = Revocations::default();
        rev.serials.insert(42);
        assert!(matches!(
            cert.verify(&a, 1500, &rev),
            Err(CertError::Revoked { .. })
        ));
        // A self-signed cert claiming the admin as issuer fails the signature check.
        let mut self_signed =
            BridgeheadCert::issue(&Keypair::generate_ed25519(), cert.body.clone()).unwrap();
        self_signed.body.issuer = a;
        assert_eq!(
            self_signed.verify(&a, 1500, &none),
            Err(CertError::BadSignature)
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = BridgeheadCert::from_bytes(&bytes);
        }
    }
}
