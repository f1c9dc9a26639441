//! Connection gating, as pure decisions: which peers may exchange image data with us. The
//! rule of BIDS: peers of one IDC share freely; across IDCs only two certified bridgeheads
//! talk. The swarm loop applies the verdicts (closing connections, counting refusals).

use bids_protocols::cert::Revocations;
use bids_protocols::hello::Hello;
use bids_protocols::{BridgeheadCert, Idc, Policy};
use libp2p::PeerId;

/// What we know about ourselves when judging a peer.
pub struct Us<'a> {
    pub peer: &'a PeerId,
    pub idc: &'a Idc,
    pub policy: Policy,
    pub cert: Option<&'a BridgeheadCert>,
    pub admin: &'a PeerId,
    pub revocations: &'a Revocations,
    pub now: i64,
}

/// How an accepted peer relates to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Same IDC.
    Lan,
    /// Other IDC (bridgehead to bridgehead, or any host in Baseline mode).
    Wan,
}

/// Why a peer (or its request) was refused: a bounded set, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// Its hello names an invalid IDC.
    BadIdc,
    /// It runs the other policy (bids / baseline).
    PolicyMismatch,
    /// We are an ordinary host and it is of another IDC.
    NotBridgehead,
    /// Our own bridgehead certificate is not valid (expired, revoked).
    OwnCertificate,
    /// A peer of another IDC without a bridgehead certificate.
    NoCertificate,
    /// Its certificate is forged, expired, revoked, or not its own.
    BadCertificate,
    /// The peer refused our hello.
    RefusedByPeer,
    /// It asked for chunks without an accepted hello.
    NoHello,
}

impl RefusalReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            RefusalReason::BadIdc => "bad_idc",
            RefusalReason::PolicyMismatch => "policy_mismatch",
            RefusalReason::NotBridgehead => "not_bridgehead",
            RefusalReason::OwnCertificate => "own_certificate",
            RefusalReason::NoCertificate => "no_certificate",
            RefusalReason::BadCertificate => "bad_certificate",
            RefusalReason::RefusedByPeer => "refused_by_peer",
            RefusalReason::NoHello => "no_hello",
        }
    }
}

/// A refused hello: why, as a category and as a message for the log and the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefusalReason,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn refusal(reason: RefusalReason) -> impl FnOnce(String) -> Refusal {
    move |message| Refusal { reason, message }
}

/// Judges a peer's hello. `Err` carries the reason, for the log, the metrics and the peer.
pub fn judge(us: &Us<'_>, peer: &PeerId, hello: &Hello) -> Result<Link, Refusal> {
    hello
        .idc
        .validate()
        .map_err(refusal(RefusalReason::BadIdc))?;
    if hello.policy != us.policy {
        return Err(refusal(RefusalReason::PolicyMismatch)(format!(
            "peer runs policy {} but this node runs {}; all nodes of a testnet must agree",
            hello.policy, us.policy
        )));
    }
    if &hello.idc == us.idc {
        return Ok(Link::Lan);
    }
    if us.policy == Policy::Baseline {
        return Ok(Link::Wan);
    }
    // Cross-IDC under BIDS: both ends must be certified bridgeheads of their own IDCs.
    let ours = us.cert.ok_or_else(|| {
        refusal(RefusalReason::NotBridgehead)(format!(
            "this node is an ordinary host of IDC {}; it exchanges no data with IDC {}",
            us.idc, hello.idc
        ))
    })?;
    ours.verify_for(us.admin, us.peer, us.idc, us.now, us.revocations)
        .map_err(|e| {
            refusal(RefusalReason::OwnCertificate)(format!(
                "this node's own bridgehead certificate is not valid: {e}"
            ))
        })?;
    let theirs = hello.cert.as_ref().ok_or_else(|| {
        refusal(RefusalReason::NoCertificate)(format!(
            "peer of IDC {} presents no bridgehead certificate; only bridgeheads cross IDCs",
            hello.idc
        ))
    })?;
    theirs
        .verify_for(us.admin, peer, &hello.idc, us.now, us.revocations)
        .map_err(|e| refusal(RefusalReason::BadCertificate)(e.to_string()))?;
    Ok(Link::Wan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bids_protocols::cert::CertBody;
    use libp2p::identity::Keypair;

    struct World {
        admin: Keypair,
        a: Keypair,
        b: Keypair,
    }

    fn cert(admin: &Keypair, k: &Keypair, idc: &str, not_after: i64) -> BridgeheadCert {
        let peer = k.public().to_peer_id();
        BridgeheadCert::issue(
            admin,
            CertBody {
                peer,
                idc: Idc::new(idc).unwrap(),
                db_id: format!("{idc}-1"),
                serial: 7,
                not_before: 0,
                not_after,
                issuer: peer,
            },
        )
        .unwrap()
    }

    fn world() -> World {
        World {
            admin: Keypair::generate_ed25519(),
            a: Keypair::generate_ed25519(),
            b: Keypair::generate_ed25519(),
        }
    }

    fn hello(idc: &str, cert: Option<BridgeheadCert>) -> Hello {
        Hello {
            idc: Idc::new(idc).unwrap(),
            policy: Policy::Bids,
            cert,
        }
    }

    #[test]
    fn rules() {
        let w = world();
        let admin = w.admin.public().to_peer_id();
        let a = w.a.public().to_peer_id();
        let b = w.b.public().to_peer_id();
        let idc_a = Idc::new("A").unwrap();
        let none = Revocations::default();
        let ca = cert(&w.admin, &w.a, "A", 1000);
        let cb = cert(&w.admin, &w.b, "B", 1000);
        let host = Us {
            peer: &a,
            idc: &idc_a,
            policy: Policy::Bids,
            cert: None,
            admin: &admin,
            revocations: &none,
            now: 10,
        };
        let db = Us {
            cert: Some(&ca),
            ..host
        };
        // Same IDC: always.
        assert_eq!(judge(&host, &b, &hello("A", None)), Ok(Link::Lan));
        // Ordinary host: never another IDC.
        assert_eq!(
            judge(&host, &b, &hello("B", Some(cb.clone()))).map_err(|r| r.reason),
            Err(RefusalReason::NotBridgehead)
        );
        // Bridgehead to certified bridgehead: yes.
        assert_eq!(judge(&db, &b, &hello("B", Some(cb.clone()))), Ok(Link::Wan));
        // Bridgehead to uncertified host of another IDC: no.
        assert_eq!(
            judge(&db, &b, &hello("B", None)).map_err(|r| r.reason),
            Err(RefusalReason::NoCertificate)
        );
        // Cert of another peer presented: no.
        assert!(judge(&db, &b, &hello("B", Some(ca.clone()))).is_err());
        // Forged (self-signed) cert: no.
        let forged = cert(&w.b, &w.b, "B", 1000);
        assert!(judge(&db, &b, &hello("B", Some(forged))).is_err());
        // Expired cert: no.
        let old = cert(&w.admin, &w.b, "B", 5);
        let r = judge(&db, &b, &hello("B", Some(old))).unwrap_err();
        assert!(r.message.contains("expired"));
        assert_eq!(r.reason, RefusalReason::BadCertificate);
        // Revoked: no.
        let mut rev = Revocations::default();
        rev.serials.insert(7);
        let db_rev = Us {
            revocations: &rev,
            ..db
        };
        assert!(judge(&db_rev, &b, &hello("B", Some(cb.clone()))).is_err());
        // Baseline: anyone.
        let base = Us {
            policy: Policy::Baseline,
            ..host
        };
        let mut h = hello("B", None);
        h.policy = Policy::Baseline;
        assert_eq!(judge(&base, &b, &h), Ok(Link::Wan));
        // Policy mismatch: no.
        assert_eq!(
            judge(&host, &b, &h).map_err(|r| r.reason),
            Err(RefusalReason::PolicyMismatch)
        );
    }
}
