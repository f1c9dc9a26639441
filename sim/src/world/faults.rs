//! Failures at given times: hosts and bridgeheads stopped and started again, the GIS down.

use super::*;

impl World {
    pub(super) fn fault(&mut self, i: usize) {
        let Some(f) = self.p.faults.get(i).cloned() else {
            return;
        };
        match f {
            Fault::Bridgehead { idc, for_s, .. } => self.kill_fetching(idc, 0, for_s),
            Fault::Host {
                idc, host, for_s, ..
            } => self.kill_fetching(idc, host, for_s),
            Fault::Gis { for_s, .. } if self.gis_up && for_s > 0.0 => {
                self.gis_up = false;
                let now = self.instant(self.now);
                for n in 0..self.nodes.len() {
                    if self.nodes[n].alive {
                        self.nodes[n].core.handle_gis_disconnected(now);
                        self.drain(n);
                    }
                }
                self.at(self.now + for_s, Ev::GisBack);
            }
            Fault::Gis { .. } => {}
        }
    }

    /// The GIS runs again with the index it had (the real one keeps it on disk); hosts
    /// reconnect as their redials come due.
    pub(super) fn gis_back(&mut self) {
        self.gis_up = true;
        self.index.restart_liveness_clock(self.wall_ms());
    }

    /// Stops host `host` of fetching IDC `idc`; it starts again after `for_s` (0: never).
    pub(super) fn kill_fetching(&mut self, idc: usize, host: usize, for_s: f64) {
        let Some(info) = self.idcs.iter().filter(|i| !i.provider).nth(idc) else {
            return;
        };
        let Some(&n) = info.nodes.get(host) else {
            return;
        };
        if !self.nodes[n].alive {
            return;
        }
        let peers: Vec<usize> = self
            .conns
            .iter()
            .filter(|(a, b)| *a == n || *b == n)
            .map(|(a, b)| if *a == n { *b } else { *a })
            .collect();
        self.nodes[n].alive = false;
        for m in peers {
            self.disconnect(n, m);
        }
        let own: Vec<FlowId> = self
            .flows
            .iter()
            .filter(|(_, t)| t.from == n || t.to == n)
            .map(|(id, _)| *id)
            .collect();
        for id in own {
            self.net.cancel(self.now, id);
            self.flows.remove(&id);
        }
        if for_s > 0.0 {
            self.restarts += 1;
            self.at(self.now + for_s, Ev::Restart(n));
        }
    }

    /// Node `n` starts again: a new core with the same key, configuration and store; a
    /// fetch it had not finished starts again (its provision time counts from the first).
    pub(super) fn restart(&mut self, n: usize) {
        self.restarts = self.restarts.saturating_sub(1);
        let now = self.instant(self.now);
        let seed = self.rng.gen();
        let wall = self.wall_ms();
        let node = &mut self.nodes[n];
        let store: Arc<dyn ChunkStore> = node.store.clone();
        let core = match NodeCore::new(node.cfg.clone(), store, None, now, wall, seed) {
            Ok(c) => c,
            Err(_) => return,
        };
        node.core = core;
        node.alive = true;
        node.bridgeheads_topic = false;
        let fetching = node.fetch.as_ref().is_some_and(|f| f.done.is_none());
        self.nodes[n].core.start(now);
        self.drain(n);
        self.at(self.now + self.p.tick_ms / 1000.0, Ev::Tick(n));
        if fetching {
            self.at(self.now, Ev::Start(n));
        }
    }
}
