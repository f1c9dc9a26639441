//! Carrying out what a core asked for: messages, flows, connections, gossip.

use super::*;

impl World {
    pub(super) fn alive_pair(&self, a: usize, b: usize) -> bool {
        self.nodes[a].alive && self.nodes[b].alive
    }

    /// Carries out what node `n`'s core asked for.
    pub(super) fn drain(&mut self, n: usize) {
        while let Some(a) = self.nodes[n].core.poll_action() {
            self.act(n, a);
        }
    }

    pub(super) fn act(&mut self, n: usize, a: Action) {
        let now = self.instant(self.now);
        match a {
            Action::Dial { peer, .. } => match self.by_peer.get(&peer).copied() {
                Some(b) if b != n => {
                    let rtt = 2.0 * self.delay(n, b);
                    self.at(self.now + 2.0 * rtt, Ev::Connected { a: n, b });
                }
                _ => self.nodes[n].core.handle_dial_failed(now, peer),
            },
            Action::DialGis { .. } => {
                let rtt = 2.0 * self.gis_delay();
                self.at(self.now + 2.0 * rtt, Ev::GisDial(n));
            }
            Action::Disconnect(peer) => {
                if let Some(&b) = self.by_peer.get(&peer) {
                    self.disconnect(n, b);
                }
            }
            Action::Request { key, peer, req } => match self.by_peer.get(&peer).copied() {
                Some(b) => {
                    self.pending.insert((n, key), b);
                    let d = self.delay(n, b);
                    self.at(
                        self.now + d,
                        Ev::ChunkReq {
                            to: b,
                            from: n,
                            req,
                            key,
                        },
                    );
                }
                None => {
                    let why = Failure::Disconnected;
                    self.nodes[n]
                        .core
                        .handle_request_failed(now, peer, key, why);
                }
            },
            Action::Respond { token, peer, resp } => {
                let Some((to, key)) = self.tokens.remove(&token) else {
                    self.nodes[n].core.handle_response_done(now, peer);
                    return;
                };
                if !self.nodes[to].alive {
                    self.nodes[n].core.handle_response_done(now, peer);
                    return;
                }
                let what = match &resp {
                    ChunkResponse::Data { .. } => "data",
                    ChunkResponse::NotHeld => "not-held",
                    ChunkResponse::Busy => "busy",
                    ChunkResponse::UnknownImage => "unknown-image",
                    ChunkResponse::BadIndex => "bad-index",
                    ChunkResponse::Refused(_) => "refused",
                };
                let label = format!("{what} {}->{}", self.role(n), self.role(to));
                self.count(&label);
                match &resp {
                    ChunkResponse::Data { payload, .. } => {
                        let wire = payload.len() as f64 * (1.0 + self.p.wire_overhead.max(0.0));
                        let bytes = wire.round() as u64;
                        let links = self.path(n, to);
                        let id = self.net.start(self.now, &links, bytes);
                        self.flows.insert(
                            id,
                            Transfer {
                                from: n,
                                to,
                                key,
                                resp,
                            },
                        );
                    }
                    _ => {
                        self.nodes[n].core.handle_response_done(now, peer);
                        let d = self.delay(n, to);
                        self.at(
                            self.now + d,
                            Ev::ChunkResp {
                                to,
                                from: n,
                                key,
                                resp,
                            },
                        );
                    }
                }
            }
            Action::Read { token, peer, req } => {
                let len = self.manifest.chunk_len(req.index);
                let payload = self.zeros.slice(..len.min(self.zeros.len()));
                let resp = ChunkResponse::Data {
                    encoding: Encoding::Raw,
                    payload,
                };
                self.nodes[n].core.handle_read(now, token, peer, req, resp);
            }
            Action::Store {
                image,
                idx,
                peer,
                encoding,
                payload,
                ..
            } => {
                self.mark_held(n, &image, idx);
                let result = Ok((encoding, payload));
                self.nodes[n]
                    .core
                    .handle_stored(now, image, idx, peer, result);
            }
            Action::Prepare { manifest, times } => {
                self.at(
                    self.now,
                    Ev::Prepared {
                        node: n,
                        manifest,
                        times,
                    },
                );
            }
            Action::Touch(_) | Action::SaveCounters(_) => {}
            Action::GisSend { key, req, .. } => {
                if self.gis_up {
                    let d = self.gis_delay();
                    self.at(
                        self.now + d,
                        Ev::GisReq {
                            from: n,
                            key,
                            req: *req,
                        },
                    );
                } else {
                    let e = "the connection to the GIS is closed".to_string();
                    self.nodes[n].core.handle_gis_request_failed(now, key, e);
                }
            }
            Action::Hello { peer, hello } => {
                if let Some(&b) = self.by_peer.get(&peer) {
                    let d = self.delay(n, b);
                    self.at(
                        self.now + d,
                        Ev::Hello {
                            to: b,
                            from: n,
                            hello,
                        },
                    );
                }
            }
            Action::HelloReply { token, reply } => {
                if let Some(to) = self.hello_tokens.remove(&token) {
                    let d = self.delay(n, to);
                    self.at(self.now + d, Ev::HelloReply { to, from: n, reply });
                }
            }
            Action::Gossip { bytes, bridgeheads } => self.gossip(n, bytes, bridgeheads),
            Action::JoinBridgeheads => self.nodes[n].bridgeheads_topic = true,
            Action::LeaveBridgeheads => self.nodes[n].bridgeheads_topic = false,
            Action::Admin { .. } | Action::AdminAnswer { .. } => {}
        }
    }

    /// The store of node `n` now holds the chunk (the engine's verified write).
    pub(super) fn mark_held(&mut self, n: usize, image: &ImageId, idx: u32) {
        self.nodes[n].store.mark(image, idx);
    }

    /// The links a chunk from `from` to `to` crosses.
    pub(super) fn path(&self, from: usize, to: usize) -> Vec<LinkId> {
        let (a, b) = (&self.nodes[from], &self.nodes[to]);
        if a.idc == b.idc {
            vec![a.up, b.down]
        } else {
            vec![a.up, self.idcs[a.idc].up, self.idcs[b.idc].down, b.down]
        }
    }

    /// A chunk's last byte left the sender: it is done writing, and the answer arrives
    /// one delay later.
    pub(super) fn flow_done(&mut self, f: FlowId) {
        let Some(t) = self.flows.remove(&f) else {
            return;
        };
        let now = self.instant(self.now);
        let bytes = match &t.resp {
            ChunkResponse::Data { payload, .. } => payload.len() as u64,
            _ => 0,
        };
        let (fi, ti) = (self.nodes[t.from].idc, self.nodes[t.to].idc);
        if fi == ti {
            self.nodes[t.from].lan_sent += bytes;
            self.nodes[t.to].lan_recv += bytes;
        } else {
            self.nodes[t.from].wan_sent += bytes;
            self.nodes[t.to].wan_recv += bytes;
            self.idcs[ti].wan_in += bytes;
        }
        if self.nodes[t.from].alive {
            let pt = self.nodes[t.to].peer;
            self.nodes[t.from].core.handle_response_done(now, pt);
            self.drain(t.from);
        }
        let d = self.delay(t.from, t.to);
        self.at(
            self.now + d,
            Ev::ChunkResp {
                to: t.to,
                from: t.from,
                key: t.key,
                resp: t.resp,
            },
        );
    }

    /// A chunk request of `from` to `to` fails: the connection is gone.
    pub(super) fn fail_request(&mut self, from: usize, to: usize, key: ReqKey) {
        if self.pending.remove(&(from, key)).is_none() {
            return;
        }
        let now = self.instant(self.now);
        let pt = self.nodes[to].peer;
        self.nodes[from]
            .core
            .handle_request_failed(now, pt, key, Failure::Disconnected);
        self.drain(from);
    }

    /// Closes the connection between `a` and `b`: both cores hear of it, the chunk
    /// requests between them fail and their flows stop.
    pub(super) fn disconnect(&mut self, a: usize, b: usize) {
        if !self.conns.remove(&(a.min(b), a.max(b))) {
            return;
        }
        let now = self.instant(self.now);
        let cut: Vec<FlowId> = self
            .flows
            .iter()
            .filter(|(_, t)| (t.from == a && t.to == b) || (t.from == b && t.to == a))
            .map(|(id, _)| *id)
            .collect();
        for id in cut {
            self.net.cancel(self.now, id);
            self.flows.remove(&id);
        }
        let stuck: Vec<(usize, ReqKey, usize)> = self
            .pending
            .iter()
            .filter(|((r, _), s)| (*r == a && **s == b) || (*r == b && **s == a))
            .map(|((r, k), s)| (*r, *k, *s))
            .collect();
        for (r, k, s) in stuck {
            if self.nodes[r].alive {
                self.fail_request(r, s, k);
            } else {
                self.pending.remove(&(r, k));
            }
        }
        for (x, y) in [(a, b), (b, a)] {
            if self.nodes[x].alive {
                let py = self.nodes[y].peer;
                self.nodes[x].core.handle_closed(now, py);
                self.drain(x);
            }
        }
    }

    /// An announcement of `n` reaches every other subscriber of its topics.
    pub(super) fn gossip(&mut self, n: usize, bytes: Vec<u8>, bridgeheads: bool) {
        let bytes = Arc::new(bytes);
        let idc = self.nodes[n].idc;
        let (near, far): (Vec<usize>, Vec<usize>) = match self.p.policy {
            Policy::Bids => (self.idcs[idc].nodes.clone(), Vec::new()),
            // Baseline: one topic for everyone.
            Policy::Baseline => (0..self.nodes.len()).partition(|&m| self.nodes[m].idc == idc),
        };
        let near: Vec<usize> = near.into_iter().filter(|&m| m != n).collect();
        let lan = self.p.lan_delay_ms / 1000.0;
        let wan = self.p.delay_ms / 1000.0;
        if !near.is_empty() {
            let ev = Ev::Gossip {
                from: n,
                bytes: bytes.clone(),
                to: near,
                remote: false,
            };
            self.at(self.now + lan, ev);
        }
        if !far.is_empty() {
            let ev = Ev::Gossip {
                from: n,
                bytes: bytes.clone(),
                to: far,
                remote: false,
            };
            self.at(self.now + wan, ev);
        }
        if bridgeheads {
            let (near, far): (Vec<usize>, Vec<usize>) = (0..self.nodes.len())
                .filter(|&m| m != n && self.nodes[m].bridgeheads_topic)
                .partition(|&m| self.nodes[m].idc == idc);
            for (to, d) in [(near, lan), (far, wan)] {
                if !to.is_empty() {
                    let ev = Ev::Gossip {
                        from: n,
                        bytes: bytes.clone(),
                        to,
                        remote: true,
                    };
                    self.at(self.now + d, ev);
                }
            }
        }
    }
}
