//! What a run reports, per host and per IDC.

use super::*;

impl World {
    pub(super) fn report(&mut self) -> Report {
        let s = self.p.size as f64;
        let bound = s / (self.p.wan_mbit * 1e6 / 8.0);
        let mut hosts = Vec::new();
        for node in &self.nodes {
            let info = &self.idcs[node.idc];
            let c = node.core.accounting().image(&self.image);
            let rate = (c.lan_available_ms > 0)
                .then(|| c.lan_available_recv_bytes as f64 / (c.lan_available_ms as f64 / 1000.0));
            hosts.push(HostRow {
                idc: info.name.to_string(),
                host: node.index_in_idc,
                role: match node.kind {
                    Kind::Bridgehead => "bridgehead".into(),
                    Kind::Host => "host".into(),
                },
                fetching: !info.provider,
                start_s: node.fetch.as_ref().map(|f| f.start),
                provision_s: node
                    .fetch
                    .as_ref()
                    .and_then(|f| f.done.map(|d| d - f.start)),
                lan_recv_bytes: node.lan_recv,
                wan_recv_bytes: node.wan_recv,
                lan_sent_bytes: node.lan_sent,
                wan_sent_bytes: node.wan_sent,
                lan_rate_while_available: rate,
                alive: node.alive,
            });
        }
        let mut idcs = Vec::new();
        for info in &self.idcs {
            let rows: Vec<&HostRow> = info.nodes.iter().map(|&n| &hosts[n]).collect();
            let done = rows.iter().filter(|r| r.provision_s.is_some()).count();
            let bridgehead_s = rows
                .iter()
                .find(|r| r.role == "bridgehead")
                .and_then(|r| r.provision_s);
            let others: Vec<&&HostRow> = rows.iter().filter(|r| r.role != "bridgehead").collect();
            let times: Vec<f64> = if others.is_empty() {
                bridgehead_s.into_iter().collect()
            } else {
                others.iter().filter_map(|r| r.provision_s).collect()
            };
            let ends: Vec<f64> = info
                .nodes
                .iter()
                .filter_map(|&n| self.nodes[n].fetch.as_ref().and_then(|f| f.done))
                .collect();
            let first_start = info
                .nodes
                .iter()
                .filter_map(|&n| self.nodes[n].fetch.as_ref().map(|f| f.start))
                .fold(f64::INFINITY, f64::min);
            let last = times
                .iter()
                .copied()
                .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
            let makespan = ends
                .iter()
                .copied()
                .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))))
                .map(|e| e - first_start);
            let bh = info
                .nodes
                .iter()
                .find(|&&n| self.nodes[n].kind == Kind::Bridgehead)
                .map(|&n| self.nodes[n].lan_sent)
                .unwrap_or(0);
            idcs.push(IdcRow {
                idc: info.name.to_string(),
                provider: info.provider,
                hosts: info.nodes.len(),
                done,
                mean_s: (!times.is_empty()).then(|| times.iter().sum::<f64>() / times.len() as f64),
                last_s: last,
                bridgehead_s,
                makespan_s: makespan,
                bound_s: bound,
                last_over_bound: last.map(|l| l / bound),
                wan_in_bytes: info.wan_in,
                wan_in_over_size: info.wan_in as f64 / s,
                bridgehead_lan_sent_bytes: bh,
                bridgehead_lan_over_size: bh as f64 / s,
            });
        }
        let fetching_hosts = hosts.iter().filter(|h| h.fetching).count();
        let done_hosts = hosts.iter().filter(|h| h.provision_s.is_some()).count();
        Report {
            params: self.p.clone(),
            hosts,
            idcs,
            gis_requests_per_s: self.gis_requests.clone(),
            sim_s: self.now,
            events: self.handled,
            fetching_hosts,
            done_hosts,
            answers: self.counts.clone(),
        }
    }
}
