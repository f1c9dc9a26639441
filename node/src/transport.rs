//! The node's libp2p transport: TCP (nodelay) + noise + yamux, with two hooks the
//! testnet needs — outgoing sockets bound to a chosen source IP, and a [`LinkShaper`] that
//! wraps every raw TCP stream before encryption. Behaviours and the swarm are left to others.

use futures::future::{BoxFuture, Ready};
use futures::{AsyncRead, AsyncWrite, FutureExt};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, DialOpts, ListenerId, TransportError, TransportEvent};
use libp2p::core::{Multiaddr, Transport};
use libp2p::multiaddr::Protocol;
use libp2p::PeerId;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// The identify agent a node announces, `bids-node/<version>` (the GIS announces
/// `bids-gis/<version>`), so a peer or an operator's tool sees what it talks to.
pub fn agent_version() -> String {
    format!("bids-node/{}", env!("CARGO_PKG_VERSION"))
}

/// A duplex byte stream (futures-io traits, as libp2p uses).
pub trait RawStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> RawStream for T {}

/// A type-erased raw stream, what a [`LinkShaper`] receives and returns.
pub type BoxedStream = Box<dyn RawStream>;

/// Hook to wrap every TCP connection before noise/yamux: the testnet uses it to emulate
/// links. `local` and `remote` are the socket addresses of this end and of the peer.
pub trait LinkShaper: Send + Sync + 'static {
    fn wrap(&self, local: SocketAddr, remote: SocketAddr, stream: BoxedStream) -> BoxedStream;
}

/// How long the noise and yamux upgrades of a new connection may take by default. Generous,
/// because on an emulated slow WAN the handshake queues behind bulk data.
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(20);

/// Most yamux streams per connection. Every chunk request is one stream; the download
/// scheduler keeps far fewer in flight per peer, so this is a ceiling against abuse.
pub const MAX_STREAMS_PER_CONNECTION: usize = 512;

/// Options of [`build`].
#[derive(Clone)]
pub struct TransportOptions {
    /// Outgoing connections bind their socket to this IP (port 0) before connecting, so the
    /// remote end sees it as our source address. Ignored for targets of the other IP family.
    pub bind_ip: Option<IpAddr>,
    /// Wraps every raw TCP stream (both directions, both ends) before noise.
    pub shaper: Option<Arc<dyn LinkShaper>>,
    /// Time allowed for the noise handshake and yamux negotiation of a new connection.
    pub upgrade_timeout: Duration,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            bind_ip: None,
            shaper: None,
            upgrade_timeout: DEFAULT_UPGRADE_TIMEOUT,
        }
    }
}

impl fmt::Debug for TransportOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportOptions")
            .field("bind_ip", &self.bind_ip)
            .field("shaper", &self.shaper.as_ref().map(|_| "LinkShaper"))
            .field("upgrade_timeout", &self.upgrade_timeout)
            .finish()
    }
}

/// Builds the authenticated, multiplexed transport: tcp (nodelay) → [shaper] → noise → yamux.
///
/// Use it as `SwarmBuilder::with_existing_identity(k).with_tokio()
/// .with_other_transport(|k| build(k, opts).map_err(Into::into))`. The returned transport
/// must be driven inside a Tokio runtime.
pub fn build(
    keypair: &libp2p::identity::Keypair,
    opts: TransportOptions,
) -> io::Result<Boxed<(PeerId, StreamMuxerBox)>> {
    let noise = libp2p::noise::Config::new(keypair).map_err(|e| {
        io::Error::other(format!("cannot set up noise with this node's keypair: {e}"))
    })?;
    let timeout = opts.upgrade_timeout;
    Ok(TcpTransport::new(opts)
        .upgrade(bids_protocols::STREAM_NEGOTIATION)
        .authenticate(noise)
        .multiplex(yamux_config())
        .timeout(timeout)
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

/// The yamux settings.
///
/// libp2p-yamux 0.48 exposes only the stream count; the window knobs of yamux 0.14 stay at
/// their defaults, which suit us: each stream's receive window starts at 256 KiB and is
/// auto-tuned (doubled whenever the sender uses it up within two RTTs, measured by yamux's
/// own pings) towards 2 × the bandwidth-delay product, within a 1 GiB budget per connection.
/// A 1 MiB chunk response therefore needs at most four windows; on loopback (RTT ≪ 1 ms)
/// that is invisible, and over a 100 ms RTT link k concurrent responses start at
/// k × 256 KiB per RTT = k × 21 Mbit/s and grow from there, so the scheduler's pipelining
/// (several requests per peer) fills any WAN we emulate. The budget stays safe: 512 streams
/// × 256 KiB minimum = 128 MiB ≤ 1 GiB, as yamux requires, and windows only grow for data
/// the application actually reads.
fn yamux_config() -> libp2p::yamux::Config {
    let mut cfg = libp2p::yamux::Config::default();
    cfg.set_max_num_streams(MAX_STREAMS_PER_CONNECTION);
    cfg
}

/// TCP transport whose dials bind a source IP and whose streams pass through the shaper.
/// Listening and accepting are delegated to libp2p-tcp.
struct TcpTransport {
    listener: libp2p::tcp::tokio::Transport,
    bind_ip: Option<IpAddr>,
    shaper: Option<Arc<dyn LinkShaper>>,
}

impl TcpTransport {
    fn new(opts: TransportOptions) -> Self {
        TcpTransport {
            listener: libp2p::tcp::tokio::Transport::new(
                libp2p::tcp::Config::default().nodelay(true),
            ),
            bind_ip: opts.bind_ip,
            shaper: opts.shaper,
        }
    }
}

/// Boxes a connected socket and hands it to the shaper, if any.
fn finish_stream(
    stream: tokio::net::TcpStream,
    shaper: Option<&Arc<dyn LinkShaper>>,
) -> io::Result<BoxedStream> {
    stream.set_nodelay(true)?;
    let local = stream.local_addr()?;
    let remote = stream.peer_addr()?;
    let boxed: BoxedStream = Box::new(libp2p::tcp::tokio::TcpStream(stream));
    Ok(match shaper {
        Some(shaper) => shaper.wrap(local, remote, boxed),
        None => boxed,
    })
}

/// Connects to `target`, from `bind_ip:0` when given and of the same IP family.
async fn connect(target: SocketAddr, bind_ip: Option<IpAddr>) -> io::Result<tokio::net::TcpStream> {
    let socket = if target.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    if let Some(ip) = bind_ip.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
        socket.bind(SocketAddr::new(ip, 0)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot bind the dial socket to {ip}: {e}; is the address local?"),
            )
        })?;
    }
    socket.connect(target).await
}

impl Transport for TcpTransport {
    type Output = BoxedStream;
    type Error = io::Error;
    type ListenerUpgrade = Ready<io::Result<BoxedStream>>;
    type Dial = BoxFuture<'static, io::Result<BoxedStream>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        if let Some(target) = multiaddr_to_socketaddr(&addr) {
            ensure_port_free(target).map_err(TransportError::Other)?;
        }
        self.listener.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.listener.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        // `DialOpts::port_use` serves NAT hole punching, which BIDS does not do: every dial
        // gets a fresh port on `bind_ip`.
        _opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let target = match multiaddr_to_socketaddr(&addr) {
            Some(t) if t.port() != 0 && !t.ip().is_unspecified() => t,
            _ => return Err(TransportError::MultiaddrNotSupported(addr)),
        };
        tracing::debug!(%target, bind_ip = ?self.bind_ip, "dialing");
        let bind_ip = self.bind_ip;
        let shaper = self.shaper.clone();
        // Nothing happens until the future is polled, as `Transport::dial` requires.
        Ok(async move {
            let stream = connect(target, bind_ip).await?;
            finish_stream(stream, shaper.as_ref())
        }
        .boxed())
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        let this = &mut *self;
        Pin::new(&mut this.listener).poll(cx).map(|event| {
            event.map_upgrade(|upgrade| {
                // libp2p-tcp hands out an already-completed future: take the stream out
                // and wrap it here, so the shaper sees the real socket addresses.
                let result = upgrade
                    .into_inner()
                    .and_then(|tcp| finish_stream(tcp.0, this.shaper.as_ref()));
                futures::future::ready(result)
            })
        })
    }
}

/// Fails with "address A is already in use" if some socket listens on `addr` (port 0:
/// nothing to check).
///
/// libp2p-tcp binds every listening socket with `SO_REUSEPORT` (so that dials can leave
/// from the listening port), and Linux lets any number of sockets of one user bind a port
/// that way: a second daemon started on a taken port would listen without error, and the
/// kernel would then split new connections between the two processes. A socket bound
/// without `SO_REUSEPORT` (`SO_REUSEADDR` only, as std and tokio set it, so connections in
/// TIME_WAIT do not block a restart) is refused by any listener on the port; binding one
/// first, without listening, and dropping it turns the silent sharing into a clear error.
/// Two daemons started on one port within the same few microseconds could still both pass.
///
/// The GIS has the same check (`bids_gis::server`): the two crates share no transport.
pub fn ensure_port_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    probe.set_reuseaddr(true)?;
    match probe.bind(addr) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "address {addr} is already in use (another process listens on it); stop that \
                 process or choose another listen port"
            ),
        )),
        // Any other failure (say, an address that is not local) is libp2p's to report.
        _ => Ok(()),
    }
}

/// The TCP socket address of a multiaddr `/ip4|ip6/…/tcp/…[/p2p/…]`.
fn multiaddr_to_socketaddr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut port = None;
    for proto in addr.iter().collect::<Vec<_>>().into_iter().rev() {
        match proto {
            Protocol::P2p(_) if port.is_none() => {}
            Protocol::Tcp(p) if port.is_none() => port = Some(p),
            Protocol::Ip4(ip) => return port.map(|p| SocketAddr::new(ip.into(), p)),
            Protocol::Ip6(ip) => return port.map(|p| SocketAddr::new(ip.into(), p)),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiaddrs_map_to_tcp_socket_addresses() {
        let parse = |s: &str| multiaddr_to_socketaddr(&s.parse().unwrap());
        assert_eq!(
            parse("/ip4/127.0.0.2/tcp/4001"),
            Some("127.0.0.2:4001".parse().unwrap())
        );
        assert_eq!(
            parse("/ip6/::1/tcp/7/p2p/12D3KooWGZ8s4ZTNQ6Yrm3zMwZpa3fVVGEPuxaGwfRtsvvBkPRMU"),
            Some("[::1]:7".parse().unwrap())
        );
        assert_eq!(parse("/ip4/127.0.0.1/udp/4001"), None);
        assert_eq!(parse("/ip4/127.0.0.1"), None);
        assert_eq!(parse("/dns4/example.org/tcp/1"), None);
        assert_eq!(parse("/ip4/127.0.0.1/tcp/1/tcp/2"), None);
    }

    #[tokio::test]
    async fn a_port_in_use_is_refused_not_shared() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = ensure_port_free(addr).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(
            e.to_string()
                .contains(&format!("address {addr} is already in use")),
            "{e}"
        );
        // Through the transport: listen_on fails instead of sharing the port.
        let mut t = TcpTransport::new(TransportOptions::default());
        let ma: Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", addr.port())
            .parse()
            .unwrap();
        assert!(matches!(
            t.listen_on(ListenerId::next(), ma),
            Err(TransportError::Other(_))
        ));
        drop(taken);
        ensure_port_free(addr).unwrap();
        ensure_port_free("127.0.0.1:0".parse().unwrap()).unwrap();
    }

    #[test]
    fn dial_refuses_what_tcp_cannot_reach() {
        let mut t = TcpTransport::new(TransportOptions::default());
        let opts = DialOpts {
            role: libp2p::core::Endpoint::Dialer,
            port_use: libp2p::core::transport::PortUse::New,
        };
        for bad in [
            "/ip4/0.0.0.0/tcp/5",
            "/ip4/127.0.0.1/tcp/0",
            "/ip4/127.0.0.1/udp/5",
        ] {
            assert!(matches!(
                t.dial(bad.parse().unwrap(), opts),
                Err(TransportError::MultiaddrNotSupported(_))
            ));
        }
    }
}
