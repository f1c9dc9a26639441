//! Whether and how a node answers a chunk request from an accepted peer, sans-IO: refused
//! (sharing off), busy, an unknown image or index, not held, deferred until the chunk
//! arrives (a bridgehead relaying for its IDC or for another IDC's bridgehead), or served
//! from the store. The caller gathers the facts, carries the answer out, and applies
//! super-seeding (`crate::seeding`) to what is served into a bridgehead's LAN.

use crate::gate::Link;

/// What the node knows when a chunk request comes.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    /// The asker's link (it was accepted).
    pub link: Link,
    /// Whether this host shares chunks at all.
    pub sharing: bool,
    /// Whether the store's reads in flight are at their bound.
    pub busy: bool,
    /// The image's chunk count, if its manifest is known here.
    pub chunks: Option<u32>,
    /// The chunk asked for.
    pub index: u32,
    /// Whether the store holds that chunk.
    pub held: bool,
    /// Whether this node pulls images on the asker's behalf (a certified bridgehead under
    /// BIDS, for an accepted peer).
    pub may_relay: bool,
    /// Whether this node is downloading the image, and if so whether a host of its own IDC
    /// holds the chunk (the download's scheduler knows).
    pub downloading: Option<bool>,
}

/// The answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serve {
    Refused(&'static str),
    Busy,
    UnknownImage,
    BadIndex,
    /// Not held here; `fetch`: start pulling the image (the asker will ask again).
    NotHeld {
        fetch: bool,
    },
    /// Answer once the chunk arrives, and fetch it first; `fetch`: start pulling the
    /// image, which is not downloading yet.
    Defer {
        fetch: bool,
    },
    /// Read it from the store and send it.
    Read,
}

/// Decides the answer to a chunk request from these facts.
pub fn decide(f: &Facts) -> Serve {
    if !f.sharing {
        return Serve::Refused("sharing is switched off on this host");
    }
    if f.busy {
        return Serve::Busy;
    }
    let Some(chunks) = f.chunks else {
        // A bridgehead pulls an image it lacks when its IDC (or a peer bridgehead) asks.
        return if f.may_relay {
            Serve::Defer {
                fetch: f.downloading.is_none(),
            }
        } else {
            Serve::UnknownImage
        };
    };
    if f.index >= chunks {
        return Serve::BadIndex;
    }
    if f.held {
        return Serve::Read;
    }
    if !f.may_relay {
        return Serve::NotHeld { fetch: false };
    }
    match f.downloading {
        None => Serve::NotHeld { fetch: true },
        // A remote bridgehead waits only for chunks our own IDC can supply; otherwise two
        // fetching IDCs could wait on each other.
        Some(lan_available) if f.link == Link::Lan || lan_available => {
            Serve::Defer { fetch: false }
        }
        Some(_) => Serve::NotHeld { fetch: false },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            link: Link::Lan,
            sharing: true,
            busy: false,
            chunks: Some(10),
            index: 3,
            held: true,
            may_relay: false,
            downloading: None,
        }
    }

    #[test]
    fn a_host_serves_what_it_holds_and_refuses_the_rest_plainly() {
        assert_eq!(decide(&facts()), Serve::Read);
        let f = Facts {
            sharing: false,
            ..facts()
        };
        assert!(matches!(decide(&f), Serve::Refused(_)));
        let f = Facts {
            busy: true,
            ..facts()
        };
        assert_eq!(decide(&f), Serve::Busy);
        let f = Facts {
            index: 10,
            ..facts()
        };
        assert_eq!(decide(&f), Serve::BadIndex);
        let f = Facts {
            chunks: None,
            ..facts()
        };
        assert_eq!(decide(&f), Serve::UnknownImage);
        let f = Facts {
            held: false,
            downloading: Some(true),
            ..facts()
        };
        assert_eq!(decide(&f), Serve::NotHeld { fetch: false });
    }

    #[test]
    fn a_bridgehead_defers_for_its_lan_and_for_remote_bridgeheads_only_what_its_idc_can_supply() {
        let bh = Facts {
            held: false,
            may_relay: true,
            ..facts()
        };
        // Not downloading: start, and the asker asks again (or waits, if the image is new).
        assert_eq!(decide(&bh), Serve::NotHeld { fetch: true });
        let unknown = Facts { chunks: None, ..bh };
        assert_eq!(decide(&unknown), Serve::Defer { fetch: true });
        let unknown_fetching = Facts {
            downloading: Some(false),
            ..unknown
        };
        assert_eq!(decide(&unknown_fetching), Serve::Defer { fetch: false });
        // Downloading: a LAN host waits for any chunk.
        let lan = Facts {
            downloading: Some(false),
            ..bh
        };
        assert_eq!(decide(&lan), Serve::Defer { fetch: false });
        // A remote bridgehead waits only if a host of our IDC holds it.
        let wan = Facts {
            link: Link::Wan,
            ..lan
        };
        assert_eq!(decide(&wan), Serve::NotHeld { fetch: false });
        let wan_available = Facts {
            downloading: Some(true),
            ..wan
        };
        assert_eq!(decide(&wan_available), Serve::Defer { fetch: false });
    }
}
