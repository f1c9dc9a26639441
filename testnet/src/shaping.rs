//! WAN/LAN link emulation for the in-process testnet: a [`Topology`] of IDCs and hosts
//! whose [`LinkShaper`] wraps every node's TCP streams, pacing writes through shared token
//! buckets (LAN and WAN rates) and a per-stream delay line (WAN latency), and counting the
//! bytes that cross each IDC's WAN link. Building the cluster itself is left to others.
//!
//! Model: a stream from host L to host R of another IDC passes L's LAN uplink, L's IDC WAN
//! egress, R's IDC WAN ingress and R's LAN downlink, and is delayed by
//! `delay(IDC L) + delay(IDC R)`; between hosts of one IDC only the two LAN links apply and
//! there is no delay. Each end shapes its own writes, so both directions are shaped once.
//! An IP outside the topology (the GIS, say) adds no link of its own and belongs to no
//! WAN: its traffic with a host passes only that host's LAN link, undelayed and uncounted.
//! Rates of 0 mean unlimited.

use bids_node::transport::{BoxedStream, LinkShaper};
use futures::io::{ReadHalf, WriteHalf};
use futures::{ready, AsyncRead, AsyncReadExt, AsyncWrite};
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// A write whose tokens are due within this long proceeds at once: Tokio's timer has 1 ms
/// resolution, and the bucket's debt keeps the long-run rate exact anyway.
const SLACK: Duration = Duration::from_millis(1);
/// Bucket depth, as time at the bucket's rate, clamped to [`MIN_BURST`, `MAX_BURST`]: small
/// enough that the rate holds at a few milliseconds' scale, deep enough that a sender
/// woken a little late by the timer catches up instead of losing the link time.
const BURST_TIME: Duration = Duration::from_millis(4);
const MIN_BURST: f64 = (16 * KIB) as f64;
const MAX_BURST: f64 = (512 * KIB) as f64;
/// Tokens a stream reserves at a time, as time at the path's bottleneck rate, clamped to
/// [`MIN_GRANT`, `MAX_GRANT`]: one timer wake-up per ~2 ms of link time at most, so a
/// 1 Gbit/s LAN costs ~500 wake-ups a second, not one per write.
const GRANT_TIME: Duration = Duration::from_millis(2);
const MIN_GRANT: usize = 16 * KIB;
const MAX_GRANT: usize = 256 * KIB;
/// A rate-limited sender woken later than its tokens were due (a busy CPU, many nodes in
/// one process) may take back up to this much lateness beyond the burst, so the emulated
/// link does not slow down because the emulator was late. Idle senders get nothing back.
const MAX_CATCH_UP: Duration = Duration::from_millis(50);
/// Writes released within this long of each other travel as one socket write.
const COALESCE: Duration = Duration::from_millis(1);
/// Largest segment of a delay line (and largest single write it accepts).
const SEGMENT_MAX: usize = 64 * KIB;
/// Delay-line capacity beyond the bandwidth-delay product, so a sender is never throttled
/// by the queue rather than by the rate.
const QUEUE_HEADROOM: usize = 256 * KIB;
/// Delay-line capacity on a path without a rate limit (a window of 16 MiB per delay).
const UNLIMITED_QUEUE: usize = 16 * MIB;
/// Segment buffers a delay line keeps for reuse.
const SPARE_BUFFERS: usize = 8;

/// Misconfiguration of a [`Topology`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    #[error("IDC {0:?} is already in the topology; IDC names must be unique")]
    DuplicateIdc(String),
    #[error("IDC {0:?} is not in the topology; add it with add_idc first")]
    UnknownIdc(String),
    #[error("host {0} is already in the topology; each IP belongs to one host")]
    DuplicateHost(IpAddr),
}

/// The emulated network: IDCs with a WAN link each, and hosts with a LAN link each.
///
/// Rates are in bytes per second; 0 means unlimited. Build it, put it in an [`Arc`], and
/// give [`Topology::shaper`] to every node of the testnet.
#[derive(Debug, Default)]
pub struct Topology {
    idcs: Vec<IdcLink>,
    hosts: HashMap<IpAddr, Host>,
}

#[derive(Debug)]
struct IdcLink {
    name: String,
    delay: Duration,
    egress: Option<Arc<TokenBucket>>,
    ingress: Option<Arc<TokenBucket>>,
    bytes_out: Arc<AtomicI64>,
    bytes_in: Arc<AtomicI64>,
}

#[derive(Debug)]
struct Host {
    idc: usize,
    uplink: Option<Arc<TokenBucket>>,
    downlink: Option<Arc<TokenBucket>>,
}

impl Topology {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an IDC whose WAN link carries `wan_bps` bytes/s in each direction, shared by all
    /// of its cross-IDC traffic, with one-way delay `wan_delay`. Returns its index.
    pub fn add_idc(
        &mut self,
        name: &str,
        wan_bps: u64,
        wan_delay: Duration,
    ) -> Result<usize, TopologyError> {
        if self.idc_index(name).is_some() {
            return Err(TopologyError::DuplicateIdc(name.to_string()));
        }
        self.idcs.push(IdcLink {
            name: name.to_string(),
            delay: wan_delay,
            egress: TokenBucket::limited(wan_bps),
            ingress: TokenBucket::limited(wan_bps),
            bytes_out: Arc::default(),
            bytes_in: Arc::default(),
        });
        Ok(self.idcs.len() - 1)
    }

    /// Adds a host of IDC `idc` at `ip` whose LAN link carries `lan_bps` bytes/s each way.
    pub fn add_host(&mut self, ip: IpAddr, idc: &str, lan_bps: u64) -> Result<(), TopologyError> {
        let ip = ip.to_canonical();
        let idc = self
            .idc_index(idc)
            .ok_or_else(|| TopologyError::UnknownIdc(idc.to_string()))?;
        if self.hosts.contains_key(&ip) {
            return Err(TopologyError::DuplicateHost(ip));
        }
        self.hosts.insert(
            ip,
            Host {
                idc,
                uplink: TokenBucket::limited(lan_bps),
                downlink: TokenBucket::limited(lan_bps),
            },
        );
        Ok(())
    }

    /// The shaper to hand to every node's transport; all of them share this topology's links.
    pub fn shaper(self: &Arc<Self>) -> Arc<dyn LinkShaper> {
        self.clone()
    }

    /// The IDC a host belongs to, if it is in the topology.
    pub fn idc_of(&self, ip: IpAddr) -> Option<&str> {
        let host = self.hosts.get(&ip.to_canonical())?;
        Some(self.idcs[host.idc].name.as_str())
    }

    /// Payload bytes (of the TCP streams, as a router counter sees them) that entered IDC
    /// `idc` over its WAN link since the start or the last [`Topology::reset_counters`].
    pub fn wan_in_bytes(&self, idc: &str) -> u64 {
        self.counter(idc, |l| &l.bytes_in)
    }

    /// Payload bytes that left IDC `idc` over its WAN link.
    pub fn wan_out_bytes(&self, idc: &str) -> u64 {
        self.counter(idc, |l| &l.bytes_out)
    }

    /// Sets every WAN counter back to zero.
    pub fn reset_counters(&self) {
        for link in &self.idcs {
            link.bytes_in.store(0, Ordering::Relaxed);
            link.bytes_out.store(0, Ordering::Relaxed);
        }
    }

    fn counter(&self, idc: &str, which: impl Fn(&IdcLink) -> &Arc<AtomicI64>) -> u64 {
        self.idc_index(idc)
            .map(|i| {
                // A write counts its bytes before it reaches the socket and takes back what
                // the socket refused, so a reset in between can leave a small negative.
                u64::try_from(which(&self.idcs[i]).load(Ordering::Relaxed)).unwrap_or(0)
            })
            .unwrap_or(0)
    }

    fn idc_index(&self, name: &str) -> Option<usize> {
        self.idcs.iter().position(|l| l.name == name)
    }

    /// The links that bytes written by `from` to `to` pass.
    fn path(&self, from: IpAddr, to: IpAddr) -> Path {
        let src = self.hosts.get(&from.to_canonical());
        let dst = self.hosts.get(&to.to_canonical());
        let mut buckets = Vec::with_capacity(4);
        let mut delay = Duration::ZERO;
        let mut wan = None;
        buckets.extend(src.and_then(|h| h.uplink.clone()));
        if let (Some(s), Some(d)) = (src, dst) {
            if s.idc != d.idc {
                let (out, inb) = (&self.idcs[s.idc], &self.idcs[d.idc]);
                buckets.extend(out.egress.clone());
                buckets.extend(inb.ingress.clone());
                delay = out.delay + inb.delay;
                wan = Some(WanCounters {
                    out: out.bytes_out.clone(),
                    inbound: inb.bytes_in.clone(),
                });
            }
        }
        buckets.extend(dst.and_then(|h| h.downlink.clone()));
        Path {
            buckets,
            delay,
            wan,
        }
    }
}

impl LinkShaper for Topology {
    fn wrap(&self, local: SocketAddr, remote: SocketAddr, stream: BoxedStream) -> BoxedStream {
        let path = self.path(local.ip(), remote.ip());
        if path.buckets.is_empty() && path.delay.is_zero() && path.wan.is_none() {
            return stream;
        }
        // Timers and the delay line's pump need a Tokio runtime; libp2p drives the
        // transport inside one, so its absence is a testnet wiring bug worth a warning.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(%local, %remote, "no Tokio runtime: stream left unshaped");
            return stream;
        };
        tracing::debug!(
            %local, %remote, links = path.buckets.len(), delay = ?path.delay,
            wan = path.wan.is_some(), "shaping stream"
        );
        if path.delay.is_zero() {
            Box::new(PacedStream::new(stream, path))
        } else {
            Box::new(DelayedStream::spawn(&runtime, stream, path))
        }
    }
}

/// A token bucket shared by every stream crossing one link. Reservations may drive it into
/// debt: the debt says when the reserved bytes may go, which queues streams fairly in the
/// order they asked. The lock is held for arithmetic only.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket of `bps` bytes/s, or none if `bps` is 0 (unlimited).
    fn limited(bps: u64) -> Option<Arc<TokenBucket>> {
        (bps > 0).then(|| {
            let rate = bps as f64;
            let burst = (rate * BURST_TIME.as_secs_f64()).clamp(MIN_BURST, MAX_BURST);
            Arc::new(TokenBucket {
                rate,
                burst,
                state: Mutex::new(BucketState {
                    tokens: burst,
                    last: Instant::now(),
                }),
            })
        })
    }

    /// Takes `n` tokens and returns when they are paid for: `now` if the bucket held them,
    /// later if it had to go into debt. `late` is how late the caller woke for its previous
    /// reservation; the bucket may refill that much past its burst (see [`MAX_CATCH_UP`]).
    fn reserve(&self, n: usize, now: Instant, late: Duration) -> Instant {
        let cap = self.burst + late.min(MAX_CATCH_UP).as_secs_f64() * self.rate;
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now > s.last {
            let refill = (now - s.last).as_secs_f64() * self.rate;
            // Never take away tokens the bucket already holds.
            s.tokens = (s.tokens + refill).min(cap.max(s.tokens));
            s.last = now;
        }
        s.tokens -= n as f64;
        if s.tokens >= 0.0 {
            now
        } else {
            s.last + Duration::from_secs_f64(-s.tokens / self.rate)
        }
    }
}

/// The WAN counters a cross-IDC stream adds its bytes to.
#[derive(Clone, Debug)]
struct WanCounters {
    out: Arc<AtomicI64>,
    inbound: Arc<AtomicI64>,
}

impl WanCounters {
    fn add(&self, n: usize) {
        let n = n as i64;
        self.out.fetch_add(n, Ordering::Relaxed);
        self.inbound.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        let n = n as i64;
        self.out.fetch_sub(n, Ordering::Relaxed);
        self.inbound.fetch_sub(n, Ordering::Relaxed);
    }
}

/// What the bytes of one direction of one stream pass.
#[derive(Debug)]
struct Path {
    buckets: Vec<Arc<TokenBucket>>,
    delay: Duration,
    wan: Option<WanCounters>,
}

impl Path {
    /// The slowest rate on the path, if any is limited.
    fn bottleneck(&self) -> Option<f64> {
        self.buckets.iter().map(|b| b.rate).reduce(f64::min)
    }

    /// Delay-line capacity: the bytes in flight at the bottleneck rate plus headroom.
    fn queue_capacity(&self) -> usize {
        match self.bottleneck() {
            Some(rate) => (rate * self.delay.as_secs_f64()) as usize + QUEUE_HEADROOM,
            None => UNLIMITED_QUEUE + QUEUE_HEADROOM,
        }
    }
}

/// Paces one stream's writes: reserves a grant of tokens from every bucket on its path and
/// lets bytes through once all of them are paid.
struct Pacer {
    buckets: Box<[Arc<TokenBucket>]>,
    grant: usize,
    /// Bytes already paid for and not yet written.
    credit: usize,
    /// When the credit was (or will be) paid: the bytes' transmission time.
    credit_at: Instant,
    waiting: bool,
    /// How late the timer woke us for the last grant we had to wait for.
    late: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Pacer {
    fn new(path: &Path) -> Self {
        let grant = path.bottleneck().map_or(MAX_GRANT, |rate| {
            ((rate * GRANT_TIME.as_secs_f64()) as usize).clamp(MIN_GRANT, MAX_GRANT)
        });
        Pacer {
            buckets: path.buckets.clone().into_boxed_slice(),
            grant,
            credit: 0,
            credit_at: Instant::now(),
            waiting: false,
            late: Duration::ZERO,
            timer: None,
        }
    }

    /// How many of `want` (> 0) bytes may go now, and their transmission time.
    fn poll_credit(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<(usize, Instant)> {
        if self.buckets.is_empty() {
            return Poll::Ready((want, Instant::now()));
        }
        if self.credit == 0 {
            let now = Instant::now();
            let grant = want.min(self.grant);
            let at = self
                .buckets
                .iter()
                .map(|b| b.reserve(grant, now, self.late))
                .max()
                .unwrap_or(now);
            self.credit = grant;
            self.credit_at = at;
            self.late = Duration::ZERO;
            if at > now + SLACK {
                let deadline = tokio::time::Instant::from_std(at);
                match &mut self.timer {
                    Some(t) => t.as_mut().reset(deadline),
                    None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
                self.waiting = true;
            }
        }
        if self.waiting {
            if let Some(timer) = &mut self.timer {
                ready!(timer.as_mut().poll(cx));
            }
            self.waiting = false;
            self.late = Instant::now().saturating_duration_since(self.credit_at);
        }
        Poll::Ready((want.min(self.credit), self.credit_at))
    }

    fn consume(&mut self, n: usize) {
        self.credit -= n.min(self.credit);
    }
}

/// A stream on a path without delay: writes are paced, then go straight to the socket.
struct PacedStream {
    inner: BoxedStream,
    pacer: Pacer,
    wan: Option<WanCounters>,
}

impl PacedStream {
    fn new(inner: BoxedStream, path: Path) -> Self {
        PacedStream {
            pacer: Pacer::new(&path),
            wan: path.wan,
            inner,
        }
    }
}

impl AsyncRead for PacedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PacedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        let (n, _) = ready!(this.pacer.poll_credit(cx, buf.len()));
        // Counted before the write so that a reader never sees bytes the counter lacks;
        // what the socket does not take is taken back.
        if let Some(w) = &this.wan {
            w.add(n);
        }
        let res = Pin::new(&mut this.inner).poll_write(cx, &buf[..n]);
        let written = match &res {
            Poll::Ready(Ok(w)) => *w,
            _ => 0,
        };
        if let Some(w) = &this.wan {
            w.sub(n - written);
        }
        this.pacer.consume(written);
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// A stream on a path with delay: paced writes enter a bounded delay line, and a pump task
/// releases them to the socket when due, like a link with latency.
struct DelayedStream {
    reader: ReadHalf<BoxedStream>,
    line: Arc<DelayLine>,
    pacer: Pacer,
    delay: Duration,
}

impl DelayedStream {
    fn spawn(runtime: &tokio::runtime::Handle, stream: BoxedStream, path: Path) -> Self {
        let (reader, writer) = stream.split();
        let line = Arc::new(DelayLine::new(path.queue_capacity()));
        runtime.spawn(pump(line.clone(), writer, path.wan.clone()));
        DelayedStream {
            reader,
            line,
            pacer: Pacer::new(&path),
            delay: path.delay,
        }
    }
}

impl Drop for DelayedStream {
    fn drop(&mut self) {
        self.line.drop_writer();
    }
}

impl AsyncRead for DelayedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for DelayedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let space = ready!(this.line.poll_space(cx))?;
        let want = buf.len().min(space).min(SEGMENT_MAX);
        let (n, at) = ready!(this.pacer.poll_credit(cx, want));
        let due = at.max(Instant::now()) + this.delay;
        let n = this.line.push(&buf[..n], due);
        this.pacer.consume(n);
        Poll::Ready(Ok(n))
    }

    /// Ready once everything written so far has reached the socket.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.line.poll_drained(cx)
    }

    /// Ready once everything written has reached the socket and its write side is shut.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.line.poll_close(cx)
    }
}

/// The queue between a [`DelayedStream`] and its pump.
struct DelayLine {
    capacity: usize,
    state: Mutex<LineState>,
}

struct LineState {
    segments: VecDeque<Segment>,
    /// Bytes accepted and not yet in the socket, including the segment the pump holds.
    queued: usize,
    writer: Option<Waker>,
    pump: Option<Waker>,
    shutdown: Shutdown,
    /// The pump has shut the socket's write side.
    closed: bool,
    error: Option<(io::ErrorKind, String)>,
    spare: Vec<Vec<u8>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shutdown {
    Open,
    /// The writer called `poll_close`.
    Close,
    /// The writer is gone: drain, then shut the socket.
    Dropped,
}

struct Segment {
    due: Instant,
    data: Vec<u8>,
}

enum Next {
    Segment(Segment),
    Close,
    Dropped,
}

impl LineState {
    fn error(&self) -> Option<io::Error> {
        self.error
            .as_ref()
            .map(|(kind, msg)| io::Error::new(*kind, msg.clone()))
    }

    fn wake_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    fn wake_pump(&mut self) {
        if let Some(w) = self.pump.take() {
            w.wake();
        }
    }
}

impl DelayLine {
    fn new(capacity: usize) -> Self {
        DelayLine {
            capacity,
            state: Mutex::new(LineState {
                segments: VecDeque::new(),
                queued: 0,
                writer: None,
                pump: None,
                shutdown: Shutdown::Open,
                closed: false,
                error: None,
                spare: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Free space in the queue, waiting while there is none.
    fn poll_space(&self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut s = self.lock();
        if let Some(e) = s.error() {
            return Poll::Ready(Err(e));
        }
        if s.shutdown != Shutdown::Open {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write on an emulated link after close",
            )));
        }
        let space = self.capacity.saturating_sub(s.queued);
        if space > 0 {
            Poll::Ready(Ok(space))
        } else {
            s.writer = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// Queues as much of `data` as fits, to be released at `due`. Returns the bytes taken.
    fn push(&self, data: &[u8], due: Instant) -> usize {
        let mut s = self.lock();
        let n = data.len().min(self.capacity.saturating_sub(s.queued));
        if n == 0 {
            return 0;
        }
        let data = &data[..n];
        // The back segment is never the one the pump is writing (it pops before writing).
        let merged = match s.segments.back_mut() {
            Some(last) if last.data.len() + n <= SEGMENT_MAX && due <= last.due + COALESCE => {
                last.data.extend_from_slice(data);
                true
            }
            _ => false,
        };
        if !merged {
            let mut buf = s
                .spare
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(SEGMENT_MAX));
            buf.extend_from_slice(data);
            s.segments.push_back(Segment { due, data: buf });
        }
        s.queued += n;
        s.wake_pump();
        n
    }

    fn poll_drained(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.lock();
        if let Some(e) = s.error() {
            return Poll::Ready(Err(e));
        }
        if s.queued == 0 {
            Poll::Ready(Ok(()))
        } else {
            s.writer = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    fn poll_close(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.lock();
        if let Some(e) = s.error() {
            return Poll::Ready(Err(e));
        }
        if s.closed {
            return Poll::Ready(Ok(()));
        }
        if s.shutdown == Shutdown::Open {
            s.shutdown = Shutdown::Close;
            s.wake_pump();
        }
        s.writer = Some(cx.waker().clone());
        Poll::Pending
    }

    fn drop_writer(&self) {
        let mut s = self.lock();
        if s.shutdown == Shutdown::Open {
            s.shutdown = Shutdown::Dropped;
        }
        s.wake_pump();
    }

    /// The pump's next job: queued data first, then the shutdown the writer asked for.
    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Next> {
        let mut s = self.lock();
        if let Some(seg) = s.segments.pop_front() {
            return Poll::Ready(Next::Segment(seg));
        }
        match s.shutdown {
            Shutdown::Close => Poll::Ready(Next::Close),
            Shutdown::Dropped => Poll::Ready(Next::Dropped),
            Shutdown::Open => {
                s.pump = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.lock().segments.is_empty()
    }

    /// A segment reached the socket: free its room and keep its buffer.
    fn release(&self, mut buf: Vec<u8>) {
        let mut s = self.lock();
        s.queued -= buf.len().min(s.queued);
        if s.spare.len() < SPARE_BUFFERS && buf.capacity() <= 2 * SEGMENT_MAX {
            buf.clear();
            s.spare.push(buf);
        }
        s.wake_writer();
    }

    fn fail(&self, e: &io::Error) {
        let mut s = self.lock();
        s.error = Some((e.kind(), e.to_string()));
        s.segments.clear();
        s.queued = 0;
        s.wake_writer();
    }

    fn finish_close(&self, result: io::Result<()>) {
        let mut s = self.lock();
        if let Err(e) = result {
            s.error = Some((e.kind(), e.to_string()));
        }
        s.closed = true;
        s.wake_writer();
    }
}

/// Releases a delay line's segments to the socket when due, in order; ends after the
/// writer closes or goes away and the queue is drained, or on a socket error.
async fn pump(line: Arc<DelayLine>, mut sink: WriteHalf<BoxedStream>, wan: Option<WanCounters>) {
    let mut timer = std::pin::pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
    loop {
        match poll_fn(|cx| line.poll_next(cx)).await {
            Next::Segment(seg) => {
                if seg.due > Instant::now() {
                    timer
                        .as_mut()
                        .reset(tokio::time::Instant::from_std(seg.due));
                    timer.as_mut().await;
                }
                if let Err(e) = write_counted(&mut sink, &seg.data, wan.as_ref()).await {
                    tracing::debug!(error = %e, "emulated link: socket write failed");
                    line.fail(&e);
                    return;
                }
                if line.is_empty() {
                    if let Err(e) = poll_fn(|cx| Pin::new(&mut sink).poll_flush(cx)).await {
                        line.fail(&e);
                        return;
                    }
                }
                line.release(seg.data);
            }
            Next::Close => {
                let result = poll_fn(|cx| Pin::new(&mut sink).poll_close(cx)).await;
                line.finish_close(result);
                return;
            }
            Next::Dropped => {
                let _ = poll_fn(|cx| Pin::new(&mut sink).poll_close(cx)).await;
                return;
            }
        }
    }
}

/// Writes all of `data`, counting it on the WAN before it reaches the socket (so a reader
/// never sees bytes the counter lacks) and taking back whatever the socket refused.
async fn write_counted(
    sink: &mut WriteHalf<BoxedStream>,
    data: &[u8],
    wan: Option<&WanCounters>,
) -> io::Result<()> {
    if let Some(w) = wan {
        w.add(data.len());
    }
    let mut off = 0;
    while off < data.len() {
        let res = poll_fn(|cx| Pin::new(&mut *sink).poll_write(cx, &data[off..])).await;
        match res {
            Ok(0) => {
                if let Some(w) = wan {
                    w.sub(data.len() - off);
                }
                return Err(io::ErrorKind::WriteZero.into());
            }
            Ok(n) => off += n,
            Err(e) => {
                if let Some(w) = wan {
                    w.sub(data.len() - off);
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MBIT: u64 = 1_000_000 / 8;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn two_idcs() -> Topology {
        let mut t = Topology::new();
        t.add_idc("a", 20 * MBIT, Duration::from_millis(10))
            .unwrap();
        t.add_idc("b", 40 * MBIT, Duration::from_millis(30))
            .unwrap();
        t.add_host(ip("127.0.1.1"), "a", 1000 * MBIT).unwrap();
        t.add_host(ip("127.0.1.2"), "a", 0).unwrap();
        t.add_host(ip("127.0.2.1"), "b", 100 * MBIT).unwrap();
        t
    }

    #[test]
    fn topology_rejects_inconsistent_additions() {
        let mut t = two_idcs();
        assert_eq!(
            t.add_idc("a", 1, Duration::ZERO),
            Err(TopologyError::DuplicateIdc("a".into()))
        );
        assert_eq!(
            t.add_host(ip("127.0.3.1"), "zz", 1),
            Err(TopologyError::UnknownIdc("zz".into()))
        );
        assert_eq!(
            t.add_host(ip("127.0.1.1"), "b", 1),
            Err(TopologyError::DuplicateHost(ip("127.0.1.1")))
        );
        assert_eq!(t.idc_of(ip("::ffff:127.0.2.1")), Some("b"));
        assert_eq!(t.idc_of(ip("127.0.0.1")), None);
    }

    #[test]
    fn cross_idc_path_passes_four_links_with_both_delays() {
        let t = two_idcs();
        let p = t.path(ip("127.0.1.1"), ip("127.0.2.1"));
        let rates: Vec<f64> = p.buckets.iter().map(|b| b.rate).collect();
        assert_eq!(
            rates,
            vec![
                (1000 * MBIT) as f64,
                (20 * MBIT) as f64,
                (40 * MBIT) as f64,
                (100 * MBIT) as f64
            ]
        );
        assert_eq!(p.delay, Duration::from_millis(40));
        assert!(p.wan.is_some());
        assert_eq!(p.bottleneck(), Some((20 * MBIT) as f64));
        // 2.5 MB/s × 40 ms in flight, plus headroom.
        assert!(p.queue_capacity().abs_diff(100_000 + QUEUE_HEADROOM) <= 1);
        // The reverse direction uses the other WAN buckets.
        let back = t.path(ip("127.0.2.1"), ip("127.0.1.1"));
        assert!(Arc::ptr_eq(
            &back.buckets[1],
            t.idcs[1].egress.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(
            &back.buckets[2],
            t.idcs[0].ingress.as_ref().unwrap()
        ));
    }

    #[test]
    fn same_idc_and_unknown_paths_have_no_wan() {
        let t = two_idcs();
        let lan = t.path(ip("127.0.1.1"), ip("127.0.1.2"));
        // Host .2 has an unlimited LAN: only .1's uplink remains.
        assert_eq!(lan.buckets.len(), 1);
        assert!(lan.delay.is_zero() && lan.wan.is_none());
        let gis = t.path(ip("127.0.0.1"), ip("127.0.2.1"));
        assert_eq!(gis.buckets.len(), 1);
        assert!(gis.delay.is_zero() && gis.wan.is_none());
        let none = t.path(ip("127.0.0.1"), ip("127.0.0.2"));
        assert!(none.buckets.is_empty() && none.delay.is_zero() && none.wan.is_none());
        assert_eq!(none.queue_capacity(), UNLIMITED_QUEUE + QUEUE_HEADROOM);
    }

    #[test]
    fn bucket_spends_its_burst_then_goes_into_debt_at_its_rate() {
        let b = TokenBucket::limited(1_000_000).unwrap();
        // 1 MB/s: the burst is the 16 KiB floor (4 ms would be only 4 kB).
        assert_eq!(b.burst, MIN_BURST);
        let t0 = Instant::now() + Duration::from_millis(1);
        let on_time = Duration::ZERO;
        assert_eq!(b.reserve(16 * KIB, t0, on_time), t0);
        // The next 10 kB must wait 10 ms, the following 10 kB 10 ms more.
        let at1 = b.reserve(10_000, t0, on_time);
        let at2 = b.reserve(10_000, t0, on_time);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        assert!((ms(at1 - t0) - 10.0).abs() < 0.01, "{:?}", at1 - t0);
        assert!((ms(at2 - t0) - 20.0).abs() < 0.01, "{:?}", at2 - t0);
        // Waiting pays the debt back; tokens never exceed the burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.reserve(16 * KIB, later, on_time), later);
        assert!(b.reserve(1, later, on_time) > later);
        assert!(TokenBucket::limited(0).is_none());
    }

    #[test]
    fn late_waiters_catch_up_but_only_so_far() {
        let b = TokenBucket::limited(1_000_000).unwrap();
        let t0 = Instant::now() + Duration::from_millis(1);
        let on_time = Duration::ZERO;
        b.reserve(16 * KIB, t0, on_time);
        let due = b.reserve(10_000, t0, on_time);
        // Woken 20 ms after `due`: those 20 ms (20 kB) are not lost, the burst alone
        // (16 KiB) would have kept only 16 ms.
        let woke = due + Duration::from_millis(20);
        assert_eq!(b.reserve(20_000, woke, woke - due), woke);
        assert!(b.reserve(1, woke, on_time) > woke);
        // Lateness beyond MAX_CATCH_UP is lost: 1 s late gives back 16 KiB + 50 kB only.
        let much_later = woke + Duration::from_secs(1);
        assert_eq!(
            b.reserve(16 * KIB + 50_000, much_later, Duration::from_secs(1)),
            much_later
        );
        assert!(b.reserve(1, much_later, on_time) > much_later);
    }

    #[test]
    fn delay_line_coalesces_bounds_and_releases_in_order() {
        let line = DelayLine::new(100);
        let t0 = Instant::now();
        assert_eq!(line.push(&[1; 30], t0), 30);
        assert_eq!(line.push(&[2; 30], t0 + Duration::from_micros(500)), 30);
        assert_eq!(line.push(&[3; 30], t0 + Duration::from_millis(5)), 30);
        // Only 10 bytes of room are left.
        assert_eq!(line.push(&[4; 30], t0 + Duration::from_millis(5)), 10);
        assert_eq!(line.push(&[5; 30], t0 + Duration::from_millis(5)), 0);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(line.poll_space(&mut cx).is_pending());
        assert!(line.poll_drained(&mut cx).is_pending());
        let Poll::Ready(Next::Segment(first)) = line.poll_next(&mut cx) else {
            panic!("a segment is queued");
        };
        assert_eq!(first.due, t0);
        assert_eq!(first.data, [[1u8; 30], [2; 30]].concat());
        line.release(first.data);
        let Poll::Ready(Next::Segment(second)) = line.poll_next(&mut cx) else {
            panic!("a segment is queued");
        };
        assert_eq!(second.data, [vec![3u8; 30], vec![4; 10]].concat());
        assert!(matches!(line.poll_space(&mut cx), Poll::Ready(Ok(60))));
        line.release(second.data);
        assert!(matches!(line.poll_drained(&mut cx), Poll::Ready(Ok(()))));
        assert!(line.poll_next(&mut cx).is_pending());
        assert!(line.poll_close(&mut cx).is_pending());
        assert!(matches!(line.poll_next(&mut cx), Poll::Ready(Next::Close)));
        assert!(line.poll_space(&mut cx).is_ready());
        line.finish_close(Ok(()));
        assert!(matches!(line.poll_close(&mut cx), Poll::Ready(Ok(()))));
    }

    #[test]
    fn delay_line_reports_pump_errors_to_the_writer() {
        let line = DelayLine::new(100);
        line.push(&[0; 10], Instant::now());
        line.fail(&io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let Poll::Ready(Err(e)) = line.poll_space(&mut cx) else {
            panic!("the error must surface");
        };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert!(matches!(line.poll_drained(&mut cx), Poll::Ready(Err(_))));
    }
}
