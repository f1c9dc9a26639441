//! Search, sort and paging of the host list (`GET /api/hosts?…`), so the pages stay fast with
//! thousands of hosts: the console filters and cuts one page before anything is sent. Pure:
//! parses the query parameters with messages that say what is accepted, and orders views.

use crate::model::HostView;
use std::cmp::Ordering;

/// The most hosts one page may hold.
pub const MAX_LIMIT: usize = 1000;
/// The longest search text accepted.
pub const MAX_SEARCH: usize = 200;

/// What a host list request asks for. The default is every host, ordered by IDC and peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostQuery {
    /// Case-insensitive text in the peer id, IDC, role, addresses or certificate's DB id.
    pub search: Option<String>,
    pub idc: Option<String>,
    /// `host` or `bridgehead`.
    pub role: Option<String>,
    pub alive: Option<bool>,
    pub sort: SortKey,
    pub descending: bool,
    pub offset: usize,
    /// `None`: every matching host.
    pub limit: Option<usize>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    #[default]
    Idc,
    Peer,
    Role,
    Alive,
    LastSeen,
    Images,
    WanIn,
    WanOut,
    LanIn,
    LanOut,
    WanInRate,
    WanOutRate,
    LanInRate,
    LanOutRate,
    CertExpiry,
}

const SORT_KEYS: &[(&str, SortKey)] = &[
    ("idc", SortKey::Idc),
    ("peer", SortKey::Peer),
    ("role", SortKey::Role),
    ("alive", SortKey::Alive),
    ("last_seen", SortKey::LastSeen),
    ("images", SortKey::Images),
    ("wan_in", SortKey::WanIn),
    ("wan_out", SortKey::WanOut),
    ("lan_in", SortKey::LanIn),
    ("lan_out", SortKey::LanOut),
    ("wan_in_rate", SortKey::WanInRate),
    ("wan_out_rate", SortKey::WanOutRate),
    ("lan_in_rate", SortKey::LanInRate),
    ("lan_out_rate", SortKey::LanOutRate),
    ("cert_expiry", SortKey::CertExpiry),
];

fn whole(name: &str, v: &str, min: usize, max: usize) -> Result<usize, String> {
    match v.trim().parse::<i64>() {
        Ok(n) if n >= min as i64 && n <= max as i64 => Ok(n as usize),
        _ => Err(format!(
            "{name} must be a whole number from {min} to {max}, got {v:?}"
        )),
    }
}

impl HostQuery {
    /// Parses `key=value` pairs of a query string; an unknown key or a bad value is an error
    /// that names it and says what is accepted.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, String> {
        let mut q = HostQuery::default();
        for (k, v) in pairs {
            match k.as_str() {
                "q" => {
                    if v.chars().count() > MAX_SEARCH {
                        return Err(format!("q (search text) must be at most {MAX_SEARCH} characters"));
                    }
                    let t = v.trim();
                    q.search = (!t.is_empty()).then(|| t.to_lowercase());
                }
                "idc" => q.idc = (!v.is_empty()).then(|| v.clone()),
                "role" => {
                    q.role = match v.as_str() {
                        "" => None,
                        "host" | "bridgehead" => Some(v.clone()),
                        _ => return Err(format!("role must be host or bridgehead, got {v:?}")),
                    }
                }
                "alive" => {
                    q.alive = match v.as_str() {
                        "" => None,
                        "true" => Some(true),
                        "false" => Some(false),
                        _ => return Err(format!("alive must be true or false, got {v:?}")),
                    }
                }
                "sort" => {
                    q.sort = SORT_KEYS
                        .iter()
                        .find(|(n, _)| n == v)
                        .map(|(_, k)| *k)
                        .ok_or_else(|| {
                            let names: Vec<_> = SORT_KEYS.iter().map(|(n, _)| *n).collect();
                            format!("sort must be one of {}, got {v:?}", names.join(", "))
                        })?
                }
                "order" => {
                    q.descending = match v.as_str() {
                        "asc" => false,
                        "desc" => true,
                        _ => return Err(format!("order must be asc or desc, got {v:?}")),
                    }
                }
                "offset" => q.offset = whole("offset", v, 0, 1_000_000_000)?,
                "limit" => q.limit = Some(whole("limit", v, 1, MAX_LIMIT)?),
                other => {
                    return Err(format!(
                        "unknown query parameter {other:?}; known: q, idc, role, alive, sort, order, offset, limit"
                    ))
                }
            }
        }
        Ok(q)
    }

    fn matches(&self, h: &HostView) -> bool {
        if self.idc.as_ref().is_some_and(|i| &h.idc != i)
            || self.role.as_ref().is_some_and(|r| &h.role != r)
            || self.alive.is_some_and(|a| h.alive != a)
        {
            return false;
        }
        let Some(s) = &self.search else {
            return true;
        };
        h.peer.to_lowercase().contains(s)
            || h.idc.to_lowercase().contains(s)
            || h.role.contains(s)
            || h.addrs.iter().any(|a| a.to_lowercase().contains(s))
            || h.cert
                .as_ref()
                .is_some_and(|c| c.db_id.to_lowercase().contains(s))
    }

    fn compare(&self, a: &HostView, b: &HostView) -> Ordering {
        let rate = |h: &HostView, f: fn(&crate::history::HostRates) -> f64| {
            h.rates.as_ref().map_or(0.0, f)
        };
        let by = match self.sort {
            SortKey::Idc => a.idc.cmp(&b.idc),
            SortKey::Peer => Ordering::Equal,
            SortKey::Role => a.role.cmp(&b.role),
            SortKey::Alive => a.alive.cmp(&b.alive),
            SortKey::LastSeen => a.last_seen_ms.cmp(&b.last_seen_ms),
            SortKey::Images => a.images.cmp(&b.images),
            SortKey::WanIn => a.counters.wan_recv_bytes.cmp(&b.counters.wan_recv_bytes),
            SortKey::WanOut => a.counters.wan_sent_bytes.cmp(&b.counters.wan_sent_bytes),
            SortKey::LanIn => a.counters.lan_recv_bytes.cmp(&b.counters.lan_recv_bytes),
            SortKey::LanOut => a.counters.lan_sent_bytes.cmp(&b.counters.lan_sent_bytes),
            SortKey::WanInRate => rate(a, |r| r.wan_in_bps).total_cmp(&rate(b, |r| r.wan_in_bps)),
            SortKey::WanOutRate => {
                rate(a, |r| r.wan_out_bps).total_cmp(&rate(b, |r| r.wan_out_bps))
            }
            SortKey::LanInRate => rate(a, |r| r.lan_in_bps).total_cmp(&rate(b, |r| r.lan_in_bps)),
            SortKey::LanOutRate => {
                rate(a, |r| r.lan_out_bps).total_cmp(&rate(b, |r| r.lan_out_bps))
            }
            // Hosts without a certificate after every one with.
            SortKey::CertExpiry => {
                let end = |h: &HostView| h.cert.as_ref().map_or(i64::MAX, |c| c.not_after);
                end(a).cmp(&end(b))
            }
        };
        // The peer id breaks ties, so pages do not shuffle between refreshes.
        let by = by.then_with(|| a.peer.cmp(&b.peer));
        if self.descending {
            by.reverse()
        } else {
            by
        }
    }

    /// The matching hosts in order, and the page asked for; returns the number that matched
    /// before paging too.
    pub fn apply(&self, hosts: Vec<HostView>) -> (usize, Vec<HostView>) {
        let mut hit: Vec<HostView> = hosts.into_iter().filter(|h| self.matches(h)).collect();
        hit.sort_by(|a, b| self.compare(a, b));
        let total = hit.len();
        let page = hit
            .into_iter()
            .skip(self.offset)
            .take(self.limit.unwrap_or(usize::MAX))
            .collect();
        (total, page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bids_protocols::gis::Counters;

    fn pairs(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn host(n: usize) -> HostView {
        HostView {
            peer: format!("peer{n:04}"),
            idc: ["A", "B", "C"][n % 3].into(),
            role: if n.is_multiple_of(10) {
                "bridgehead"
            } else {
                "host"
            }
            .into(),
            alive: n.is_multiple_of(2),
            connected: true,
            last_seen_ms: Some(n as i64),
            addrs: vec![format!("/ip4/10.0.{}.{}/tcp/4001", n / 250, n % 250)],
            limits: None,
            sharing: None,
            counters: Counters {
                wan_recv_bytes: (n * 7 % 13) as u64,
                ..Counters::default()
            },
            rates: None,
            refusals: 0,
            images: 0,
            cert: None,
            cert_expiring: false,
            cert_expires_in_s: None,
            demoted: None,
            provisions: Vec::new(),
        }
    }

    #[test]
    fn bad_values_are_refused_with_what_is_accepted() {
        let e = HostQuery::parse(&pairs(&[("limit", "-1")])).unwrap_err();
        assert!(
            e.contains("limit must be a whole number from 1 to 1000"),
            "{e}"
        );
        assert!(HostQuery::parse(&pairs(&[("limit", "0")])).is_err());
        assert!(HostQuery::parse(&pairs(&[("limit", "1001")])).is_err());
        assert!(HostQuery::parse(&pairs(&[("offset", "x")])).is_err());
        let e = HostQuery::parse(&pairs(&[("sort", "colour")])).unwrap_err();
        assert!(e.contains("wan_in_rate"), "{e}");
        assert!(HostQuery::parse(&pairs(&[("order", "up")])).is_err());
        assert!(HostQuery::parse(&pairs(&[("role", "king")])).is_err());
        assert!(HostQuery::parse(&pairs(&[("limt", "5")]))
            .unwrap_err()
            .contains("unknown"));
        let long = "x".repeat(MAX_SEARCH + 1);
        assert!(HostQuery::parse(&pairs(&[("q", long.as_str())])).is_err());
    }

    #[test]
    fn pages_cover_every_match_once_in_order() {
        let hosts: Vec<HostView> = (0..2000).map(host).collect();
        let q = HostQuery::parse(&pairs(&[("sort", "wan_in"), ("order", "desc")])).unwrap();
        let (total, all) = q.apply(hosts.clone());
        assert_eq!((total, all.len()), (2000, 2000));
        let mut seen = Vec::new();
        for page in 0..20 {
            let off = (page * 100).to_string();
            let q = HostQuery::parse(&pairs(&[
                ("sort", "wan_in"),
                ("order", "desc"),
                ("offset", off.as_str()),
                ("limit", "100"),
            ]))
            .unwrap();
            let (t, p) = q.apply(hosts.clone());
            assert_eq!((t, p.len()), (2000, 100));
            seen.extend(p.into_iter().map(|h| h.peer));
        }
        assert_eq!(seen, all.iter().map(|h| h.peer.clone()).collect::<Vec<_>>());
        assert!(all
            .windows(2)
            .all(|w| w[0].counters.wan_recv_bytes >= w[1].counters.wan_recv_bytes));
    }

    #[test]
    fn search_and_filters_narrow_the_list() {
        let hosts: Vec<HostView> = (0..2000).map(host).collect();
        let q = HostQuery::parse(&pairs(&[("q", "PEER1999")])).unwrap();
        let (t, p) = q.apply(hosts.clone());
        assert_eq!((t, p[0].peer.as_str()), (1, "peer1999"));
        // By address.
        let q = HostQuery::parse(&pairs(&[("q", "/10.0.7.")])).unwrap();
        assert_eq!(q.apply(hosts.clone()).0, 2000 - 7 * 250);
        let q = HostQuery::parse(&pairs(&[
            ("idc", "B"),
            ("role", "bridgehead"),
            ("alive", "true"),
        ]))
        .unwrap();
        let (t, p) = q.apply(hosts);
        assert!(t > 0);
        assert!(p
            .iter()
            .all(|h| h.idc == "B" && h.role == "bridgehead" && h.alive));
    }
}
