//! The userspace WAN link emulator of the netns testnet (`bids testnet linkemu`): each link
//! joins a TUN device in an IDC's gateway namespace to a TUN device in the router namespace
//! and moves IP packets both ways through a [`Pipe`] (rate, one-way delay, drop-tail queue).
//! Creating namespaces, addresses and routes is left to the scripts in `testnet/netns/`.
//!
//! Why userspace: the test kernel has `tbf` and `htb` but no `netem`, so there is no kernel
//! delay. TUN devices are opened with plain `ioctl(TUNSETIFF)` through `libc` rather than a
//! TUN crate: a device is created in the network namespace of the thread that opens it, and
//! doing that from a short-lived thread that `setns()`es first needs only the raw call.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// Largest IP packet a TUN device hands out (its MTU is far below; this only sizes buffers).
const MAX_PACKET: usize = 65_536;
/// The queue of a link, as time at its rate, when no `queue_kib` is given: about one
/// bandwidth-delay product of a long path, like a router port sized for TCP.
const DEFAULT_QUEUE_TIME: Duration = Duration::from_millis(200);
/// Smallest queue, so slow links still absorb a burst of full-size packets.
const MIN_QUEUE_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LinkEmuError {
    #[error("link spec {spec:?}: {why}")]
    Spec { spec: String, why: String },
    #[error("entering network namespace {netns:?} (does /run/netns/{netns} exist?): {source}")]
    Netns {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("opening TUN device {dev:?} (needs root and /dev/net/tun): {source}")]
    Tun {
        dev: String,
        #[source]
        source: io::Error,
    },
    #[error("packet I/O on {dev:?}: {source}")]
    Io {
        dev: String,
        #[source]
        source: io::Error,
    },
}

/// One emulated link: `dev` in namespace `netns` (an IDC's side) and `peer_dev` in the
/// emulator's own namespace (the router's side). Both directions get the same rate, delay
/// and queue, like one IDC uplink of the paper.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkSpec {
    pub netns: String,
    pub dev: String,
    pub peer_dev: String,
    /// Bits per second each way; 0 = unlimited.
    pub rate_bps: u64,
    /// One-way delay added to every packet.
    pub delay: Duration,
    /// Bytes the queue in front of the rate limiter may hold before it drops (drop tail).
    pub queue_bytes: u64,
}

impl LinkSpec {
    /// Parses `ns=NAME,dev=DEV,peer=DEV,mbit=RATE,delay_ms=MS[,queue_kib=KIB]`.
    pub fn parse(spec: &str) -> Result<LinkSpec, LinkEmuError> {
        let bad = |why: String| LinkEmuError::Spec {
            spec: spec.to_string(),
            why,
        };
        let (mut ns, mut dev, mut peer) = (None, None, None);
        let (mut mbit, mut delay_ms, mut queue_kib) = (None, None, None);
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            let num = |v: &str| -> Result<f64, LinkEmuError> {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| bad(format!("{k}={v:?} is not a non-negative number")))
            };
            match k {
                "ns" => ns = Some(v.to_string()),
                "dev" => dev = Some(v.to_string()),
                "peer" => peer = Some(v.to_string()),
                "mbit" => mbit = Some(num(v)?),
                "delay_ms" => delay_ms = Some(num(v)?),
                "queue_kib" => queue_kib = Some(num(v)?),
                other => return Err(bad(format!("unknown key {other:?}"))),
            }
        }
        let need = |x: Option<String>, k: &str| x.ok_or_else(|| bad(format!("{k}= is missing")));
        let (netns, dev, peer_dev) = (need(ns, "ns")?, need(dev, "dev")?, need(peer, "peer")?);
        for d in [&dev, &peer_dev] {
            // IFNAMSIZ is 16 with the terminating NUL.
            if d.is_empty() || d.len() > 15 {
                return Err(bad(format!("device name {d:?} must have 1 to 15 bytes")));
            }
        }
        let rate_bps = (mbit.ok_or_else(|| bad("mbit= is missing".into()))? * 1e6) as u64;
        let delay = Duration::from_secs_f64(delay_ms.unwrap_or(0.0) / 1000.0);
        let queue_bytes = match queue_kib {
            Some(k) => (k * 1024.0) as u64,
            None => (rate_bps as f64 / 8.0 * DEFAULT_QUEUE_TIME.as_secs_f64()) as u64,
        }
        .max(MIN_QUEUE_BYTES);
        Ok(LinkSpec {
            netns,
            dev,
            peer_dev,
            rate_bps,
            delay,
            queue_bytes,
        })
    }
}

/// One direction of a link, sans-IO: decides when a packet leaves (or that it is dropped).
///
/// A packet is serialised after those before it (virtual clock `next_free`, equivalent to a
/// token bucket one packet deep), then propagates for `delay`: due = end of serialisation +
/// delay. The delay is applied per packet, so any number of packets are in flight at once
/// and the delay never caps throughput. The backlog waiting for serialisation is the
/// router queue; a packet that would overflow it is dropped, as a drop-tail router does.
#[derive(Debug)]
pub struct Pipe {
    /// Bytes per second; 0 = unlimited.
    rate_bytes: f64,
    delay: Duration,
    queue_bytes: u64,
    next_free: Option<Instant>,
}

impl Pipe {
    pub fn new(rate_bps: u64, delay: Duration, queue_bytes: u64) -> Pipe {
        Pipe {
            rate_bytes: rate_bps as f64 / 8.0,
            delay,
            queue_bytes,
            next_free: None,
        }
    }

    /// A packet of `len` bytes arrives at `now`: its due time, or `None` when dropped.
    pub fn admit(&mut self, now: Instant, len: usize) -> Option<Instant> {
        if self.rate_bytes <= 0.0 {
            return Some(now + self.delay);
        }
        let start = match self.next_free {
            Some(t) if t > now => t,
            _ => now,
        };
        let backlog = (start - now).as_secs_f64() * self.rate_bytes;
        if backlog + len as f64 > self.queue_bytes as f64 {
            return None;
        }
        let done = start + Duration::from_secs_f64(len as f64 / self.rate_bytes);
        self.next_free = Some(done);
        Some(done + self.delay)
    }
}

/// Packet and byte counters of one direction of a link.
#[derive(Debug, Default)]
pub struct DirStats {
    /// Packets and bytes delivered to the far side.
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Packets dropped because the queue was full (drop tail).
    pub dropped: AtomicU64,
    /// Packets the far side's kernel refused (its input backlog was full, say).
    pub refused: AtomicU64,
}

impl DirStats {
    fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// A running link: counters of both directions.
#[derive(Debug)]
pub struct LinkStats {
    pub spec: LinkSpec,
    /// IDC side → router (the IDC's WAN egress).
    pub up: Arc<DirStats>,
    /// Router → IDC side (the IDC's WAN ingress).
    pub down: Arc<DirStats>,
}

impl fmt::Display for LinkStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (up, down) = (self.up.snapshot(), self.down.snapshot());
        write!(
            f,
            "{{\"netns\":\"{}\",\"dev\":\"{}\",\"peer\":\"{}\",\"up_packets\":{},\"up_bytes\":{},\"up_dropped\":{},\"up_refused\":{},\"down_packets\":{},\"down_bytes\":{},\"down_dropped\":{},\"down_refused\":{}}}",
            self.spec.netns, self.spec.dev, self.spec.peer_dev, up.0, up.1, up.2, up.3, down.0, down.1, down.2, down.3
        )
    }
}

/// An open TUN device (no packet-information header: reads and writes are bare IP packets).
pub struct Tun {
    name: String,
    fd: AsyncFd<OwnedFd>,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

fn open_tun_here(name: &str) -> io::Result<OwnedFd> {
    let path = c"/dev/net/tun";
    // SAFETY: a valid NUL-terminated path; the returned descriptor is checked below.
    let raw = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface names have 1 to 15 bytes",
        ));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Opens (creating it) TUN device `name` in network namespace `netns` (a name under
/// `/run/netns`), or in the caller's namespace when `netns` is `None`. The device lives as
/// long as the returned descriptor: when the emulator exits, its devices and routes vanish.
pub fn open_tun(netns: Option<&str>, name: &str) -> Result<OwnedFd, LinkEmuError> {
    let tun_err = |source| LinkEmuError::Tun {
        dev: name.to_string(),
        source,
    };
    let Some(ns) = netns else {
        return open_tun_here(name).map_err(tun_err);
    };
    let ns_file = std::fs::File::open(Path::new("/run/netns").join(ns)).map_err(|source| {
        LinkEmuError::Netns {
            netns: ns.to_string(),
            source,
        }
    })?;
    let (name_owned, ns_owned) = (name.to_string(), ns.to_string());
    // setns() changes only the calling thread; this thread ends right after, so no other
    // code ever runs in the foreign namespace.
    let worker = std::thread::spawn(move || -> Result<OwnedFd, LinkEmuError> {
        // SAFETY: a valid namespace descriptor; CLONE_NEWNET checks its type.
        if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(LinkEmuError::Netns {
                netns: ns_owned,
                source: io::Error::last_os_error(),
            });
        }
        open_tun_here(&name_owned).map_err(|source| LinkEmuError::Tun {
            dev: name_owned.clone(),
            source,
        })
    });
    worker
        .join()
        .map_err(|_| tun_err(io::Error::other("the namespace thread panicked")))?
}

impl Tun {
    pub fn new(name: &str, fd: OwnedFd) -> Result<Tun, LinkEmuError> {
        // SAFETY: an `OwnedFd` keeps its descriptor open and unchanged until it is dropped,
        // which happens only with the `AsyncFd`.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| LinkEmuError::Io {
            dev: name.to_string(),
            source: e.into_parts().1,
        })?;
        Ok(Tun {
            name: name.to_string(),
            fd,
        })
    }

    fn io_err(&self, source: io::Error) -> LinkEmuError {
        LinkEmuError::Io {
            dev: self.name.clone(),
            source,
        }
    }

    /// Reads one packet.
    pub async fn recv(&self, buf: &mut [u8]) -> Result<usize, LinkEmuError> {
        loop {
            let mut guard = self.fd.readable().await.map_err(|e| self.io_err(e))?;
            match guard.try_io(|fd| raw_io(fd.get_ref().as_raw_fd(), buf, false)) {
                Ok(r) => return r.map_err(|e| self.io_err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes one packet. A packet the kernel refuses (no route yet, device down) is lost,
    /// as on a real link; only a dead descriptor is an error.
    pub async fn send(&self, pkt: &mut [u8]) -> Result<bool, LinkEmuError> {
        loop {
            let mut guard = self.fd.writable().await.map_err(|e| self.io_err(e))?;
            match guard.try_io(|fd| raw_io(fd.get_ref().as_raw_fd(), pkt, true)) {
                Ok(Ok(_)) => return Ok(true),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EBADF) => return Err(self.io_err(e)),
                Ok(Err(_)) => return Ok(false),
                Err(_would_block) => continue,
            }
        }
    }
}

fn raw_io(fd: RawFd, buf: &mut [u8], write: bool) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes for the duration of the call.
    let n = unsafe {
        if write {
            libc::write(fd, buf.as_ptr() as *const libc::c_void, buf.len())
        } else {
            libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len())
        }
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves packets from `from` to `to` through `pipe` until an I/O error. One task does both
/// reading and the timed writing, so the delay line is a plain FIFO whose due times never
/// decrease; its size is bounded by the queue plus what the rate lets in during one delay.
pub async fn pump(
    from: Arc<Tun>,
    to: Arc<Tun>,
    mut pipe: Pipe,
    stats: Arc<DirStats>,
) -> Result<(), LinkEmuError> {
    let mut line: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let head_due = line.front().map(|(due, _)| *due);
        tokio::select! {
            biased;
            _ = sleep_until_opt(head_due) => {
                // Every packet already due goes out now: the timer wakes at 1 ms
                // granularity, and a fast link has many packets per millisecond.
                let now = Instant::now();
                while line.front().is_some_and(|(due, _)| *due <= now) {
                    if let Some((_, mut pkt)) = line.pop_front() {
                        if to.send(&mut pkt).await? {
                            stats.packets.fetch_add(1, Ordering::Relaxed);
                            stats.bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
                        } else {
                            stats.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            n = from.recv(&mut buf) => {
                let n = n?;
                match pipe.admit(Instant::now(), n) {
                    Some(due) => line.push_back((due, buf[..n].to_vec())),
                    None => {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A running pump: it ends only with an I/O error.
pub type PumpTask = tokio::task::JoinHandle<Result<(), LinkEmuError>>;

/// Opens every link's two TUN devices and starts its two pumps. Returns the counters and
/// the tasks.
pub fn start(specs: &[LinkSpec]) -> Result<(Vec<Arc<LinkStats>>, Vec<PumpTask>), LinkEmuError> {
    let mut stats = Vec::new();
    let mut tasks = Vec::new();
    for s in specs {
        let side = Arc::new(Tun::new(&s.dev, open_tun(Some(&s.netns), &s.dev)?)?);
        let router = Arc::new(Tun::new(&s.peer_dev, open_tun(None, &s.peer_dev)?)?);
        let st = Arc::new(LinkStats {
            spec: s.clone(),
            up: Arc::default(),
            down: Arc::default(),
        });
        tasks.push(tokio::spawn(pump(
            side.clone(),
            router.clone(),
            Pipe::new(s.rate_bps, s.delay, s.queue_bytes),
            st.up.clone(),
        )));
        tasks.push(tokio::spawn(pump(
            router,
            side,
            Pipe::new(s.rate_bps, s.delay, s.queue_bytes),
            st.down.clone(),
        )));
        stats.push(st);
    }
    Ok((stats, tasks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_link() {
        let l = LinkSpec::parse("ns=bidsnet-1-i1,dev=wan,peer=wan1,mbit=10,delay_ms=30").unwrap();
        assert_eq!(l.netns, "bidsnet-1-i1");
        assert_eq!((l.dev.as_str(), l.peer_dev.as_str()), ("wan", "wan1"));
        assert_eq!(l.rate_bps, 10_000_000);
        assert_eq!(l.delay, Duration::from_millis(30));
        // 200 ms at 10 Mbit/s.
        assert_eq!(l.queue_bytes, 250_000);
        let q = LinkSpec::parse("ns=a,dev=b,peer=c,mbit=1,queue_kib=1000").unwrap();
        assert_eq!(q.queue_bytes, 1_024_000);
        assert_eq!(q.delay, Duration::ZERO);
        assert!(LinkSpec::parse("ns=a,dev=b,mbit=1").is_err());
        assert!(LinkSpec::parse("ns=a,dev=b,peer=c,mbit=-1").is_err());
        assert!(LinkSpec::parse("ns=a,dev=b,peer=c,mbit=1,color=red").is_err());
        assert!(LinkSpec::parse("ns=a,dev=waaaaaaaaaaaaaaay,peer=c,mbit=1").is_err());
    }

    #[test]
    fn rate_spaces_packets_and_delay_is_added_once() {
        // 8 Mbit/s = 1 MB/s: a 1000-byte packet takes 1 ms.
        let mut p = Pipe::new(8_000_000, Duration::from_millis(50), 1 << 20);
        let t0 = Instant::now();
        let due: Vec<Duration> = (0..5).map(|_| p.admit(t0, 1000).unwrap() - t0).collect();
        for (i, d) in due.iter().enumerate() {
            let want = Duration::from_millis(50 + i as u64 + 1);
            assert!(
                d.abs_diff(want) < Duration::from_micros(5),
                "{d:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn delay_does_not_cap_throughput() {
        // 80 Mbit/s with 50 ms delay: one second of back-to-back 1500-byte packets must all be
        // due within a second plus the delay (the delay line holds ~330 packets at once).
        let mut p = Pipe::new(80_000_000, Duration::from_millis(50), 1 << 30);
        let t0 = Instant::now();
        let n = 80_000_000 / 8 / 1500;
        let mut last = t0;
        for i in 0..n {
            let arrival = t0 + Duration::from_secs_f64(i as f64 * 1500.0 / 10_000_000.0);
            last = p.admit(arrival, 1500).unwrap();
        }
        let took = last - t0;
        assert!(
            took <= Duration::from_millis(1051) && took >= Duration::from_millis(1040),
            "{took:?}"
        );
    }

    #[test]
    fn full_queue_drops_tail_and_recovers() {
        // 8 Mbit/s, queue of 10 000 bytes: a burst of 20 × 1000 bytes keeps about 10.
        let mut p = Pipe::new(8_000_000, Duration::ZERO, 10_000);
        let t0 = Instant::now();
        let kept = (0..20).filter(|_| p.admit(t0, 1000).is_some()).count();
        assert!((10..=11).contains(&kept), "kept {kept}");
        // Once the queue drained (10 ms later) packets pass again.
        assert!(p.admit(t0 + Duration::from_millis(11), 1000).is_some());
    }

    #[test]
    fn unlimited_rate_only_delays() {
        let mut p = Pipe::new(0, Duration::from_millis(7), 0);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(p.admit(t0, 1500), Some(t0 + Duration::from_millis(7)));
        }
    }
}
