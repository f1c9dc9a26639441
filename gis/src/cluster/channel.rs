//! The Raft port's connections, authenticated by the key the replicas of one group share
//! (`--cluster-key`). A connection opens with a handshake in which each side proves it holds
//! the key (HMAC-SHA256 over both sides' fresh nonces, a different label each way); every
//! frame after it carries an HMAC-SHA256 tag under a key derived for its direction and
//! connection, over its sequence number and bytes. So a peer without the key can neither
//! join, nor inject, replay, reorder or alter a message of a connection. The traffic is
//! not encrypted: host lists and holdings are not secret inside the data centres.
//!
//! Frame on the wire: the `bids_protocols::codec` framing (4-byte big-endian length, then
//! CBOR) followed by the 32-byte tag. The length is checked against the limit before
//! anything is allocated.

use bids_protocols::codec::{decode_body, encode_frame, frame_len};
use hmac::{Hmac, Mac};
use serde::{de::DeserializeOwned, Serialize};
use sha2::Sha256;
use std::fmt;
use std::io;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

type HmacSha256 = Hmac<Sha256>;

/// What a connection starts with, so a peer speaking something else (an older `bids` that
/// sends Raft frames at once, say) is told apart from one with the wrong key.
const MAGIC: &[u8; 12] = b"bids-raft/2\n";
const NONCE: usize = 32;
const TAG: usize = 32;
/// How long the handshake may take on the listening side (a connection that says nothing
/// must not hold a task).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The secret the replicas of one GIS group share: 32 random bytes, kept in a file as 64
/// hex digits (`bids key cluster --out FILE`). Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; 32]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        ClusterKey(rand::random())
    }

    /// The key as 64 hex digits (what its file holds).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<Self, String> {
        let bytes =
            hex::decode(s.trim()).map_err(|e| format!("a cluster key is 64 hex digits: {e}"))?;
        let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            format!(
                "a cluster key is 64 hex digits (32 bytes), this one has {} bytes",
                b.len()
            )
        })?;
        Ok(ClusterKey(key))
    }

    /// Reads a key file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("cannot read the cluster key {}: {e}", path.display()))?;
        if meta.len() > 4096 {
            return Err(format!(
                "{} is {} bytes, too large to be a cluster key (64 hex digits)",
                path.display(),
                meta.len()
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the cluster key {}: {e}", path.display()))?;
        Self::from_hex(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn mac(&self, label: &[u8], mine: &[u8; NONCE], theirs: &[u8; NONCE]) -> HmacSha256 {
        // HMAC takes a key of any length: this cannot fail.
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(label);
        m.update(mine);
        m.update(theirs);
        m
    }

    /// A value derived from the key for `label` and the connection's nonces.
    fn derive(&self, label: &[u8], client: &[u8; NONCE], server: &[u8; NONCE]) -> [u8; 32] {
        self.mac(label, client, server)
            .finalize()
            .into_bytes()
            .into()
    }
}

fn refused(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, what.into())
}

/// One authenticated connection to or from another replica.
pub struct Channel<S> {
    io: S,
    send: HmacSha256,
    recv: HmacSha256,
    sent: u64,
    received: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Channel<S> {
    /// The dialling side's handshake on `io`.
    pub async fn client(mut io: S, key: &ClusterKey) -> io::Result<Self> {
        let client: [u8; NONCE] = rand::random();
        let mut hello = Vec::with_capacity(MAGIC.len() + NONCE);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&client);
        io.write_all(&hello).await?;
        io.flush().await?;
        let mut answer = [0u8; NONCE + TAG];
        io.read_exact(&mut answer).await?;
        let mut server = [0u8; NONCE];
        server.copy_from_slice(&answer[..NONCE]);
        key.mac(b"bids raft server proof", &client, &server)
            .verify_slice(&answer[NONCE..])
            .map_err(|_| refused("the replica does not hold this group's cluster key"))?;
        io.write_all(&key.derive(b"bids raft client proof", &client, &server))
            .await?;
        io.flush().await?;
        Ok(Self::keyed(io, key, &client, &server, true))
    }

    /// The listening side's handshake on `io`.
    pub async fn server(mut io: S, key: &ClusterKey) -> io::Result<Self> {
        let mut hello = [0u8; MAGIC.len() + NONCE];
        io.read_exact(&mut hello).await?;
        if &hello[..MAGIC.len()] != MAGIC {
            return Err(refused(
                "the peer did not open with the cluster handshake (an older bids, or not a replica)",
            ));
        }
        let mut client = [0u8; NONCE];
        client.copy_from_slice(&hello[MAGIC.len()..]);
        let server: [u8; NONCE] = rand::random();
        let mut answer = Vec::with_capacity(NONCE + TAG);
        answer.extend_from_slice(&server);
        answer.extend_from_slice(&key.derive(b"bids raft server proof", &client, &server));
        io.write_all(&answer).await?;
        io.flush().await?;
        let mut proof = [0u8; TAG];
        io.read_exact(&mut proof).await?;
        key.mac(b"bids raft client proof", &client, &server)
            .verify_slice(&proof)
            .map_err(|_| refused("the peer does not hold this group's cluster key"))?;
        Ok(Self::keyed(io, key, &client, &server, false))
    }

    fn keyed(
        io: S,
        key: &ClusterKey,
        client: &[u8; NONCE],
        server: &[u8; NONCE],
        dialled: bool,
    ) -> Self {
        let to_server = key.derive(b"bids raft client to server", client, server);
        let to_client = key.derive(b"bids raft server to client", client, server);
        let (send, recv) = if dialled {
            (to_server, to_client)
        } else {
            (to_client, to_server)
        };
        let new = |k: [u8; 32]| <HmacSha256 as Mac>::new_from_slice(&k).expect("any key");
        Channel {
            io,
            send: new(send),
            recv: new(recv),
            sent: 0,
            received: 0,
        }
    }

    /// Sends one message (at most `limit` bytes framed).
    pub async fn send<T: Serialize>(&mut self, msg: &T, limit: usize) -> io::Result<()> {
        let mut buf = encode_frame(msg, limit)?;
        let mut mac = self.send.clone();
        mac.update(&self.sent.to_be_bytes());
        mac.update(&buf);
        buf.extend_from_slice(&mac.finalize().into_bytes());
        self.sent += 1;
        self.io.write_all(&buf).await?;
        self.io.flush().await
    }

    /// Reads one message of at most `limit` bytes; its tag is checked before it is decoded.
    pub async fn recv<T: DeserializeOwned>(&mut self, limit: usize) -> io::Result<T> {
        let mut len = [0u8; 4];
        self.io.read_exact(&mut len).await?;
        let body = frame_len(len, limit, "Raft message")?;
        let mut buf = vec![0u8; body + TAG];
        self.io.read_exact(&mut buf).await?;
        let (bytes, tag) = buf.split_at(body);
        let mut mac = self.recv.clone();
        mac.update(&self.received.to_be_bytes());
        mac.update(&len);
        mac.update(bytes);
        mac.verify_slice(tag).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a Raft message failed its integrity check (altered, replayed or out of order)",
            )
        })?;
        self.received += 1;
        decode_body(bytes, limit)
    }

    /// The connection itself, for tests that write around the channel.
    #[cfg(test)]
    pub fn io_mut(&mut self) -> &mut S {
        &mut self.io
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, DuplexStream};

    const LIMIT: usize = 1 << 20;

    /// Both ends of a connection that passed the handshake with `key`.
    async fn pair(key: &ClusterKey) -> (Channel<DuplexStream>, Channel<DuplexStream>) {
        let (a, b) = duplex(1 << 16);
        let (c, s) = tokio::join!(Channel::client(a, key), Channel::server(b, key));
        (c.unwrap(), s.unwrap())
    }

    /// The tag `c` would send with `frame` as its message number `seq`.
    fn tag(c: &Channel<DuplexStream>, seq: u64, frame: &[u8]) -> Vec<u8> {
        let mut mac = c.send.clone();
        mac.update(&seq.to_be_bytes());
        mac.update(frame);
        mac.finalize().into_bytes().to_vec()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn keys_round_trip_through_hex_and_files_and_never_show() {
        let k = ClusterKey::generate();
        assert_eq!(
            ClusterKey::from_hex(&format!(" {}\n", k.to_hex())).unwrap(),
            k
        );
        assert_eq!(format!("{k:?}"), "ClusterKey(..)");
        assert!(ClusterKey::from_hex("abcd")
            .unwrap_err()
            .contains("2 bytes"));
        assert!(ClusterKey::from_hex("zz").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cluster.key");
        std::fs::write(&p, k.to_hex()).unwrap();
        assert_eq!(ClusterKey::read(&p).unwrap(), k);
        assert!(ClusterKey::read(&dir.path().join("none"))
            .unwrap_err()
            .contains("cannot read"));
    }

    #[test]
    fn replicas_with_the_key_talk_both_ways() {
        rt().block_on(async {
            let key = ClusterKey::generate();
            let (mut c, mut s) = pair(&key).await;
            for i in 0..3u32 {
                c.send(&(i, "ask".to_string()), LIMIT).await.unwrap();
                let got: (u32, String) = s.recv(LIMIT).await.unwrap();
                assert_eq!(got, (i, "ask".to_string()));
                // Larger than the pipe: sent while the other side reads.
                let big = vec![i; 100_000];
                let (sent, back) = tokio::join!(s.send(&big, LIMIT), c.recv::<Vec<u32>>(LIMIT));
                sent.unwrap();
                assert_eq!(back.unwrap(), big);
            }
        });
    }

    #[test]
    fn a_peer_with_another_key_is_refused_both_ways() {
        rt().block_on(async {
            let (a, b) = duplex(1 << 16);
            let (mine, theirs) = (ClusterKey::generate(), ClusterKey::generate());
            let (c, s) = tokio::join!(Channel::client(a, &mine), Channel::server(b, &theirs));
            // The client finds out first (the server's proof is wrong) and hangs up; the
            // server then never gets a proof.
            let e = c
                .err()
                .expect("the client refuses a server without the key");
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            assert!(s.is_err());
            // A client that answers with a made-up proof is refused by the server.
            let key = ClusterKey::generate();
            let (mut a, b) = duplex(1 << 16);
            let server = tokio::spawn(async move { Channel::server(b, &key).await.map(|_| ()) });
            a.write_all(MAGIC).await.unwrap();
            a.write_all(&[7u8; NONCE]).await.unwrap();
            let mut answer = [0u8; NONCE + TAG];
            a.read_exact(&mut answer).await.unwrap();
            a.write_all(&[9u8; TAG]).await.unwrap();
            let e = server.await.unwrap().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        });
    }

    #[test]
    fn a_plain_raft_frame_is_refused() {
        rt().block_on(async {
            let (mut a, b) = duplex(1 << 16);
            let key = ClusterKey::generate();
            let server = tokio::spawn(async move { Channel::server(b, &key).await.map(|_| ()) });
            // What a replica without the handshake sends first: a frame, not the magic.
            let frame = encode_frame(&"vote for me".to_string(), LIMIT).unwrap();
            a.write_all(&frame).await.unwrap();
            a.write_all(&[0u8; 64]).await.unwrap();
            let e = server.await.unwrap().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            assert!(e.to_string().contains("handshake"), "{e}");
        });
    }

    #[test]
    fn altered_replayed_or_injected_frames_are_refused() {
        rt().block_on(async {
            let key = ClusterKey::generate();
            // One byte of a message changed on the way.
            let (mut c, mut s) = pair(&key).await;
            let mut frame = encode_frame(&"revoke 7".to_string(), LIMIT).unwrap();
            let sent_tag = tag(&c, 0, &frame);
            let last = frame.len() - 1;
            frame[last] ^= 1;
            frame.extend_from_slice(&sent_tag);
            c.io_mut().write_all(&frame).await.unwrap();
            let e = s.recv::<String>(LIMIT).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);

            // A message sent again (its tag was for sequence number 0, this is number 1).
            let (mut c, mut s) = pair(&key).await;
            let frame = encode_frame(&"publish".to_string(), LIMIT).unwrap();
            let mut sealed = frame.clone();
            sealed.extend_from_slice(&tag(&c, 0, &frame));
            c.io_mut().write_all(&sealed).await.unwrap();
            assert_eq!(s.recv::<String>(LIMIT).await.unwrap(), "publish");
            c.io_mut().write_all(&sealed).await.unwrap();
            assert!(s.recv::<String>(LIMIT).await.is_err());

            // A frame with no tag at all, as an outsider would inject it.
            let (mut c, mut s) = pair(&key).await;
            let frame = encode_frame(&"x".repeat(40), LIMIT).unwrap();
            c.io_mut().write_all(&frame).await.unwrap();
            c.io_mut().shutdown().await.unwrap();
            assert!(s.recv::<String>(LIMIT).await.is_err());
        });
    }

    #[test]
    fn an_oversized_length_is_refused_before_reading_the_body() {
        rt().block_on(async {
            let key = ClusterKey::generate();
            let (mut c, mut s) = pair(&key).await;
            c.io_mut()
                .write_all(&(1u32 << 30).to_be_bytes())
                .await
                .unwrap();
            let e = s.recv::<String>(LIMIT).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains("limit"), "{e}");
        });
    }
}
