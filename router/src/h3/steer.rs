//! HTTP/3 across an upgrade: one UDP socket, two processes, each QUIC
//! connection kept by the process that made it.
//!
//! Every connection ID this process issues starts with its generation
//! ([`GenerationCids`]). When a new process takes the UDP socket over, the
//! old one stops reading it; the new one reads every datagram and sends
//! those addressed to another generation's connections (short-header and
//! Handshake packets, whose destination ID is one the server chose) to its
//! predecessor over a Unix datagram socket handed over with the listeners.
//! The predecessor reads them from there instead of the UDP socket, steers
//! them the same way (to its own predecessor, for a line of upgrades), and
//! answers through its copy of the UDP socket, from the same address. A
//! client's first packets (Initial, 0-RTT) carry an ID of its own choosing
//! and always stay with the newest process: new connections are its.
//!
//! Before any upgrade nothing is steered: the socket is read as quinn reads
//! it, at the cost of one atomic load per receive (and, when the socket has
//! nothing, registering the driver's waker in an `AtomicWaker`).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::net::UnixDatagram as StdUnixDatagram;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Length of the connection IDs this edge issues (quinn's default).
pub const CID_LEN: usize = 8;

/// Connection IDs whose first byte is the process's generation, the rest
/// random.
#[derive(Debug)]
pub struct GenerationCids {
    generation: u8,
}

impl GenerationCids {
    /// IDs for a process of `generation`.
    pub fn new(generation: u64) -> Self {
        GenerationCids { generation: tag(generation) }
    }
}

/// The byte a generation's connection IDs start with.
fn tag(generation: u64) -> u8 {
    (generation % 256) as u8
}

impl quinn::ConnectionIdGenerator for GenerationCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; CID_LEN];
        id[0] = self.generation;
        let random = fastrand::u64(..).to_le_bytes();
        id[1..].copy_from_slice(&random[..CID_LEN - 1]);
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Whose a datagram is: the generation tag of the connection it is
/// addressed to, or `None` for this process in any case (a client's first
/// packets, anything too short to tell).
fn addressed_to(datagram: &[u8]) -> Option<u8> {
    let first = *datagram.first()?;
    if first & 0x80 == 0 {
        // Short header: the destination ID follows the first byte.
        return datagram.get(1).copied();
    }
    // Long header: only Handshake packets (type 2) carry a server-chosen
    // destination ID the client cannot have made up.
    if (first & 0x30) >> 4 != 2 || datagram.get(5).copied() != Some(CID_LEN as u8) {
        return None;
    }
    datagram.get(6).copied()
}

/// The UDP socket of the HTTP/3 endpoint, as quinn sees it.
pub struct Steered {
    udp: Arc<dyn AsyncUdpSocket>,
    generation: u8,
    /// Whether anything is steered at all (a predecessor, or a successor
    /// feeding this process): the fast path reads only this.
    steering: AtomicBool,
    /// The endpoint driver's waker while it waits on the UDP socket, to
    /// move it to the successor's channel at a takeover.
    waker: AtomicWaker,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Taken over: datagrams come from the successor over this channel.
    from_successor: Option<Arc<tokio::net::UnixDatagram>>,
    /// Datagrams for earlier generations' connections go to the process
    /// of their generation, each over its own channel.
    predecessors: Vec<Predecessor>,
    /// One framed datagram from the channel.
    frame: Vec<u8>,
}

/// A process of an earlier generation, still draining.
struct Predecessor {
    generation: u64,
    tag: u8,
    channel: StdUnixDatagram,
}

impl fmt::Debug for Steered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steered").field("generation", &self.generation).finish()
    }
}

impl Steered {
    /// `socket` (quinn's own wrapper of the UDP socket) for a process of
    /// `generation`.
    pub fn new(udp: Arc<dyn AsyncUdpSocket>, generation: u64) -> Arc<Self> {
        Arc::new(Steered {
            udp,
            generation: tag(generation),
            steering: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            state: Mutex::new(State::default()),
        })
    }

    /// Send the datagrams of `generation`'s connections to `channel`.
    pub fn forward_to(&self, generation: u64, channel: StdUnixDatagram) -> io::Result<()> {
        channel.set_nonblocking(true)?;
        self.state.lock().predecessors.push(Predecessor { generation, tag: tag(generation), channel });
        self.steering.store(true, Ordering::Release);
        Ok(())
    }

    /// The channels to the earlier generations still draining (duplicates),
    /// for a successor to pass their datagrams to them directly: a process
    /// in the middle of a line of upgrades may exit before an older one.
    pub fn predecessors(&self) -> Vec<(u64, std::os::fd::OwnedFd)> {
        let st = self.state.lock();
        st.predecessors
            .iter()
            .filter_map(|p| Some((p.generation, std::os::fd::AsFd::as_fd(&p.channel).try_clone_to_owned().ok()?)))
            .collect()
    }

    /// Stop reading the UDP socket: a successor does, and sends this
    /// process its connections' datagrams over `channel`.
    pub fn follow(&self, channel: StdUnixDatagram) -> io::Result<()> {
        channel.set_nonblocking(true)?;
        let channel = Arc::new(tokio::net::UnixDatagram::from_std(channel)?);
        self.state.lock().from_successor = Some(channel);
        self.steering.store(true, Ordering::Release);
        self.waker.wake();
        Ok(())
    }

    /// Keep in place the datagrams that are this process's; send the
    /// others to the process of their generation. Metas emptied keep a
    /// length of 0, which quinn skips.
    fn steer(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) {
        let mut st = self.state.lock();
        if st.predecessors.is_empty() {
            return;
        }
        let mut gone = Vec::new();
        for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()).take(n) {
            let stride = if m.stride == 0 { m.len } else { m.stride };
            let (mut read, mut write) = (0, 0);
            while read < m.len {
                let end = (read + stride).min(m.len);
                let to = match addressed_to(&buf[read..end]) {
                    Some(g) if g != self.generation => st.predecessors.iter().position(|p| p.tag == g),
                    _ => None,
                };
                let passed = to.is_some_and(|at| match st.predecessors[at].channel.send(&frame(m, &buf[read..end])) {
                    Ok(_) => true,
                    // Its queue is full: dropped, as the network may drop
                    // it; QUIC sends again.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                    // It has exited: its connections are gone, and quinn
                    // answers their packets with resets.
                    Err(_) => {
                        gone.push(at);
                        false
                    }
                });
                if !passed {
                    if write != read {
                        buf.copy_within(read..end, write);
                    }
                    write += end - read;
                }
                read = end;
            }
            m.len = write;
        }
        gone.sort_unstable();
        gone.dedup();
        for at in gone.into_iter().rev() {
            let p = st.predecessors.remove(at);
            tracing::info!(
                generation = p.generation,
                "a previous process has exited: its HTTP/3 datagrams are no longer passed on"
            );
        }
    }

    /// One datagram from the successor, into `bufs[0]`.
    fn poll_channel(
        &self,
        channel: &tokio::net::UnixDatagram,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut st = self.state.lock();
            let frame = &mut st.frame;
            frame.resize(HEADER + 64 * 1024, 0);
            let mut rb = tokio::io::ReadBuf::new(frame);
            match channel.poll_recv(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let len = rb.filled().len();
            let Some((m, payload)) = unframe(&frame[..len]) else { continue };
            if payload.len() > bufs[0].len() {
                continue;
            }
            bufs[0][..payload.len()].copy_from_slice(payload);
            meta[0] = m;
            return Poll::Ready(Ok(1));
        }
    }
}

impl AsyncUdpSocket for Steered {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.udp.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.udp.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            if !self.steering.load(Ordering::Acquire) {
                let polled = self.udp.poll_recv(cx, bufs, meta);
                if polled.is_pending() {
                    // Kept so that a takeover can move the driver to the
                    // successor's channel (no lock: an atomic, and a clone
                    // only when the driver's waker changes).
                    self.waker.register(cx.waker());
                    // Taken over between the poll and now: poll again.
                    if self.steering.load(Ordering::Acquire) {
                        continue;
                    }
                }
                return polled;
            }
            let channel = self.state.lock().from_successor.clone();
            let n = match &channel {
                Some(channel) => std::task::ready!(self.poll_channel(channel, cx, bufs, meta))?,
                None => std::task::ready!(self.udp.poll_recv(cx, bufs, meta))?,
            };
            self.steer(bufs, meta, n);
            return Poll::Ready(Ok(n));
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.udp.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.udp.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.udp.may_fragment()
    }
}

/// Bytes before a datagram on the channel: its source (16 bytes of IPv6 or
/// IPv4-mapped address, 2 of port), its ECN codepoint (1; 0, Not-ECT, for
/// none) and its
/// destination address (1 byte present or not, 16 bytes).
const HEADER: usize = 16 + 2 + 1 + 1 + 16;

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn from_v6(ip: Ipv6Addr) -> IpAddr {
    ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4)
}

fn frame(m: &RecvMeta, datagram: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + datagram.len());
    out.extend_from_slice(&v6(m.addr.ip()).octets());
    out.extend_from_slice(&m.addr.port().to_be_bytes());
    out.push(m.ecn.map_or(0, |e| e as u8));
    match m.dst_ip {
        Some(ip) => {
            out.push(1);
            out.extend_from_slice(&v6(ip).octets());
        }
        None => out.extend_from_slice(&[0; 17]),
    }
    out.extend_from_slice(datagram);
    out
}

fn unframe(bytes: &[u8]) -> Option<(RecvMeta, &[u8])> {
    if bytes.len() < HEADER {
        return None;
    }
    let octets = |at: usize| -> [u8; 16] { bytes[at..at + 16].try_into().unwrap_or([0; 16]) };
    let ip = from_v6(Ipv6Addr::from(octets(0)));
    let port = u16::from_be_bytes([bytes[16], bytes[17]]);
    let ecn = EcnCodepoint::from_bits(bytes[18]);
    let dst_ip = (bytes[19] == 1).then(|| from_v6(Ipv6Addr::from(octets(20))));
    let payload = &bytes[HEADER..];
    let m = RecvMeta { addr: SocketAddr::new(ip, port), len: payload.len(), stride: payload.len(), ecn, dst_ip };
    Some((m, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::ConnectionIdGenerator;

    #[test]
    fn a_generation_is_told_from_the_packets_the_server_chose_the_id_of() {
        let mut cids = GenerationCids::new(3);
        let cid = cids.generate_cid();
        assert_eq!((cid.len(), cid[0]), (CID_LEN, 3));
        let mut short = vec![0x40];
        short.extend_from_slice(&cid);
        short.extend_from_slice(&[0; 20]);
        assert_eq!(addressed_to(&short), Some(3));
        // Handshake: 1 byte, version, the destination ID's length and ID.
        let mut handshake = vec![0xe0, 0, 0, 0, 1, CID_LEN as u8];
        handshake.extend_from_slice(&cid);
        assert_eq!(addressed_to(&handshake), Some(3));
        // Initial and 0-RTT: the client's own ID, the newest process's.
        for first in [0xc0, 0xd0] {
            let mut p = handshake.clone();
            p[0] = first;
            assert_eq!(addressed_to(&p), None);
        }
        assert_eq!(addressed_to(&[]), None);
        assert_eq!(GenerationCids::new(259).generate_cid()[0], 3, "the tag wraps at 256");
    }

    #[test]
    fn a_datagram_crosses_the_channel_whole() {
        let m = RecvMeta {
            addr: "192.0.2.7:4433".parse().expect("addr"),
            ecn: Some(EcnCodepoint::Ect0),
            dst_ip: Some("127.0.0.1".parse().expect("ip")),
            ..Default::default()
        };
        let framed = frame(&m, b"datagram");
        let (back, payload) = unframe(&framed).expect("unframes");
        assert_eq!(
            (back.addr, back.ecn, back.dst_ip, back.len, payload),
            (m.addr, m.ecn, m.dst_ip, 8, &b"datagram"[..])
        );
        let v6 = RecvMeta { addr: "[2001:db8::1]:443".parse().expect("addr"), ..Default::default() };
        let framed = frame(&v6, b"x");
        let (back, _) = unframe(&framed).expect("unframes");
        assert_eq!((back.addr, back.ecn, back.dst_ip), (v6.addr, None, None));
    }
}
