//! The raw-TCP reference of the netns evaluation: the same number of bytes, pulled from the
//! same source hosts over the same emulated WAN path as a BIDS fetch, by plain TCP with no
//! encryption, multiplexing, hashing or disk. A fetch's time divided by this one's says what
//! BIDS costs on top of what TCP itself gets out of the link (headers, slow start, the round
//! trip), which the bound S/B_wan leaves out.
//!
//! Wire: the client sends its share as 8 bytes big-endian, the server answers that many
//! bytes and closes. A share above [`MAX_SHARE`] is refused.

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The most one connection may ask for (the evaluation's images are far smaller).
pub const MAX_SHARE: u64 = 64 << 30;
/// Size of the writes and reads.
const BUF: usize = 256 << 10;
/// How long one client connection may take to say what it wants.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves every connection on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener) -> Result<()> {
    loop {
        let (stream, peer) = listener.accept().await.context("accepting")?;
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream).await {
                tracing::warn!(%peer, error = %e, "raw TCP reference connection failed");
            }
        });
    }
}

async fn serve_one(mut stream: TcpStream) -> Result<()> {
    let mut ask = [0u8; 8];
    tokio::time::timeout(ASK_TIMEOUT, stream.read_exact(&mut ask))
        .await
        .context("the client did not say how many bytes it wants")?
        .context("reading the request")?;
    let mut left = u64::from_be_bytes(ask);
    if left > MAX_SHARE {
        bail!("asked for {left} bytes, more than {MAX_SHARE}");
    }
    let buf = vec![0x5au8; BUF];
    while left > 0 {
        let n = left.min(BUF as u64) as usize;
        stream.write_all(&buf[..n]).await.context("writing")?;
        left -= n as u64;
    }
    stream.shutdown().await.context("closing")?;
    Ok(())
}

/// What one reference transfer took.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Transfer {
    pub bytes: u64,
    pub sources: usize,
    /// From the first connect to the last byte of the slowest source.
    pub secs: f64,
}

/// Pulls `bytes` split evenly over `sources` (the first ones take the remainder), all at
/// once, each over its own connection; fails on a short answer.
pub async fn fetch(sources: &[SocketAddr], bytes: u64) -> Result<Transfer> {
    if sources.is_empty() {
        bail!("no source to fetch from");
    }
    let k = sources.len() as u64;
    let start = Instant::now();
    let tasks: Vec<_> = sources
        .iter()
        .enumerate()
        .map(|(i, &addr)| {
            let share = bytes / k + u64::from((i as u64) < bytes % k);
            tokio::spawn(fetch_one(addr, share))
        })
        .collect();
    for t in tasks {
        t.await.context("reference transfer task")??;
    }
    Ok(Transfer {
        bytes,
        sources: sources.len(),
        secs: start.elapsed().as_secs_f64(),
    })
}

async fn fetch_one(addr: SocketAddr, share: u64) -> Result<()> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.write_all(&share.to_be_bytes()).await?;
    let mut buf = vec![0u8; BUF];
    let mut got = 0u64;
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .with_context(|| format!("reading from {addr}"))?;
        if n == 0 {
            break;
        }
        got += n as u64;
        if got > share {
            bail!("{addr} sent more than the {share} bytes asked");
        }
    }
    if got != share {
        bail!("{addr} sent {got} of {share} bytes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_transfer_split_over_sources_brings_every_byte() {
        let mut addrs = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..3 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(l.local_addr().unwrap());
            servers.push(tokio::spawn(serve(l)));
        }
        let t = fetch(&addrs, 5_000_001).await.unwrap();
        assert_eq!((t.bytes, t.sources), (5_000_001, 3));
        assert!(t.secs > 0.0);
        for s in servers {
            s.abort();
        }
    }

    #[tokio::test]
    async fn a_share_above_the_limit_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(serve(l));
        let err = fetch(&[addr], MAX_SHARE + 1).await.unwrap_err();
        assert!(err.to_string().contains("sent 0 of"), "{err:#}");
        server.abort();
    }
}
