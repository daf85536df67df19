//! Zero-downtime upgrades: the running edge hands its listening sockets to
//! a new process over a Unix socket (`[edge].upgrade_socket`); the new
//! process serves on them, and only then does the old one stop accepting
//! and drain.
//!
//! The exchange, on one Unix stream connection that the new process opens:
//!
//! 0. new → old: `take` (a connection that says nothing, such as a second
//!    `stoke serve` seeing whether the socket is live, is closed unanswered);
//! 1. old → new: an offer (JSON: the old process's generation and pid, and
//!    each socket's kind and addresses), with the sockets themselves as
//!    `SCM_RIGHTS` in the same message;
//! 2. new → old: `ready`, once it serves on them. A new process that fails
//!    to start (a broken config, a port it cannot bind) closes the
//!    connection instead, and the old one goes on serving;
//! 3. old → new: `released` once it no longer accepts, then what it still
//!    drains, at once and then once a second, until it exits and the
//!    connection closes. The new process takes the upgrade socket over
//!    (binding beside it and renaming over it), and says so in one line on
//!    its stdout, which `stoke upgrade` waits for.
//!
//! The listening sockets are the same kernel sockets in both processes, so
//! there is no moment at which nobody listens: a connection that arrives
//! while both hold them waits in the one accept queue for whichever process
//! accepts first, and none is refused.
//!
//! pingora-core has an fd transfer of its own (`server::transfer_fd`), but
//! it runs the other way round (the new process listens, the old one sends
//! when signalled, so the old one cannot know that the new one serves),
//! retries with blocking sleeps and panics when its socket cannot be bound;
//! this is the same `sendmsg` with `SCM_RIGHTS`, through rustix's safe
//! wrappers.

use std::io::{IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram as StdUnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::drain::Drain;

/// Most sockets one process hands over: http, https, admin, h3, and a
/// channel to each process still draining HTTP/3 connections.
const MAX_SOCKETS: usize = 64;

/// Longest a new process may take from taking the sockets to serving on
/// them (it loads its config and probes every replica first).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the old process says what it still drains.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Why an upgrade could not take the running process's sockets.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Nothing answers on the upgrade socket.
    #[error("no running stoke answers on {path} ({source}); start one with `stoke serve`")]
    NoOldProcess {
        /// The upgrade socket.
        path: PathBuf,
        /// What connecting said.
        source: std::io::Error,
    },
    /// The config names no upgrade socket.
    #[error("the config has no [edge].upgrade_socket, so there is no running process to take over from")]
    NotConfigured,
    /// The exchange went wrong.
    #[error("taking the sockets over {path} failed: {message}")]
    Exchange {
        /// The upgrade socket.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The upgrade socket cannot be bound.
    #[error("cannot listen on the upgrade socket {path}: {message}")]
    Bind {
        /// The upgrade socket.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// What a listening socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Plain HTTP/1.1 and h2c (TCP).
    Http,
    /// TLS: HTTP/1.1 and HTTP/2 (TCP).
    Https,
    /// The admin API (TCP).
    Admin,
    /// HTTP/3 (UDP).
    H3,
    /// The Unix datagram socket over which the new process passes the old
    /// one its QUIC connections' datagrams ([`crate::h3::steer`]).
    Steer,
}

impl Kind {
    /// The config key of the listener.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Https => "https",
            Kind::Admin => "admin",
            Kind::H3 => "h3",
            Kind::Steer => "h3 steering",
        }
    }
}

/// A socket as the offer describes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Described {
    kind: Kind,
    /// The address the config gave (port 0 stays 0).
    configured: SocketAddr,
    /// The address it is bound to.
    bound: SocketAddr,
    /// For [`Kind::Steer`]: whose QUIC connections' datagrams it carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generation: Option<u64>,
}

/// The old process's first message.
#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    generation: u64,
    pid: u32,
    sockets: Vec<Described>,
}

/// Every later message, one JSON object a line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "lowercase")]
enum Step {
    /// new → old: hand over the sockets.
    Take,
    /// new → old: serving on the sockets.
    Ready { pid: u32 },
    /// old → new: no longer accepting.
    Released,
    /// old → new: requests and streams still in progress there.
    Draining { in_progress: usize },
}

/// This process's place in a line of upgrades, and what the process before
/// it still drains (`/state`, metrics).
#[derive(Debug)]
pub struct Process {
    /// 1 for a process started by `stoke serve`, one more at each upgrade.
    pub generation: u64,
    /// This process's id.
    pub pid: u32,
    previous: Mutex<Option<Previous>>,
    failed: AtomicU64,
}

/// The process this one took over from.
#[derive(Clone, Debug, Serialize)]
pub struct Previous {
    /// Its process id.
    pub pid: u32,
    /// Its generation.
    pub generation: u64,
    /// `draining` or `exited`.
    pub state: &'static str,
    /// Requests and streams it still has in progress.
    pub in_progress: usize,
}

impl Process {
    /// A process of `generation`.
    pub fn new(generation: u64) -> Arc<Self> {
        Arc::new(Process { generation, pid: std::process::id(), previous: Mutex::new(None), failed: AtomicU64::new(0) })
    }

    /// What the previous process is doing, if there was one.
    pub fn previous(&self) -> Option<Previous> {
        self.previous.lock().clone()
    }

    fn set_previous(&self, f: impl FnOnce(&mut Previous)) {
        if let Some(p) = self.previous.lock().as_mut() {
            f(p);
            metrics::gauge!(crate::metrics::PREVIOUS_IN_PROGRESS).set(p.in_progress as f64);
        }
    }

    /// `/state`'s `process` object.
    pub fn state_json(&self) -> Value {
        json!({
            "generation": self.generation,
            "pid": self.pid,
            "failed_upgrades": self.failed.load(Ordering::Relaxed),
            "previous": self.previous(),
        })
    }
}

/// The listening sockets of this process, kept (as duplicates) to be
/// handed to the next one.
#[derive(Debug, Default)]
pub struct Listening {
    sockets: Vec<(Described, OwnedFd)>,
    /// The HTTP/3 socket as quinn reads it, and its address.
    steer: Option<Arc<crate::h3::steer::Steered>>,
}

impl Listening {
    /// Keep a duplicate of `socket`, the `kind` listener configured as
    /// `configured` and bound to `bound`.
    pub fn keep(
        &mut self,
        kind: Kind,
        configured: SocketAddr,
        bound: SocketAddr,
        socket: impl AsFd,
    ) -> std::io::Result<()> {
        let fd = socket.as_fd().try_clone_to_owned()?;
        self.sockets.push((Described { kind, configured, bound, generation: None }, fd));
        Ok(())
    }

    /// Hand the HTTP/3 endpoint's datagrams over with its socket.
    pub fn steer(&mut self, steered: Arc<crate::h3::steer::Steered>) {
        self.steer = Some(steered);
    }

    fn offer(&self, generation: u64, extra: &[(Described, OwnedFd)]) -> Offer {
        let mut sockets: Vec<_> = self.sockets.iter().map(|(d, _)| d.clone()).collect();
        sockets.extend(extra.iter().map(|(d, _)| d.clone()));
        Offer { generation, pid: std::process::id(), sockets }
    }
}

/// The sockets taken from the running process, for a new one to serve on.
#[derive(Debug)]
pub struct Inherited {
    path: PathBuf,
    offer: Offer,
    fds: Vec<Option<OwnedFd>>,
    conn: UnixStream,
}

impl Inherited {
    /// Connect to the running process on `path` and take its listening
    /// sockets (blocking; a few milliseconds).
    pub fn receive(path: &Path) -> Result<Inherited, UpgradeError> {
        let exchange = |message: String| UpgradeError::Exchange { path: path.to_owned(), message };
        let conn =
            UnixStream::connect(path).map_err(|source| UpgradeError::NoOldProcess { path: path.to_owned(), source })?;
        conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| exchange(e.to_string()))?;
        let mut take = serde_json::to_vec(&Step::Take).map_err(|e| exchange(e.to_string()))?;
        take.push(b'\n');
        (&conn).write_all(&take).map_err(|e| exchange(format!("asking for the sockets: {e}")))?;
        let mut payload = vec![0u8; 64 << 10];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received =
            rustix::net::recvmsg(&conn, &mut [IoSliceMut::new(&mut payload)], &mut control, RecvFlags::CMSG_CLOEXEC)
                .map_err(|e| exchange(format!("receiving the offer: {e}")))?;
        if received.flags.intersects(rustix::net::ReturnFlags::CTRUNC | rustix::net::ReturnFlags::TRUNC) {
            return Err(exchange("the offer was cut short".into()));
        }
        let mut fds = Vec::new();
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = msg {
                fds.extend(rights.map(Some));
            }
        }
        let text = &payload[..received.bytes];
        let Some(text) = text.strip_suffix(b"\n") else {
            return Err(exchange(if text.is_empty() {
                "the running process closed the connection (is it upgrading already?)".into()
            } else {
                "the offer was cut short".into()
            }));
        };
        let offer: Offer = serde_json::from_slice(text).map_err(|e| exchange(format!("a malformed offer: {e}")))?;
        if offer.sockets.len() != fds.len() {
            return Err(exchange(format!("{} sockets described, {} received", offer.sockets.len(), fds.len())));
        }
        Ok(Inherited { path: path.to_owned(), offer, fds, conn })
    }

    /// This process's generation: one more than the running one's.
    pub fn generation(&self) -> u64 {
        self.offer.generation + 1
    }

    /// The running process's id.
    pub fn old_pid(&self) -> u32 {
        self.offer.pid
    }

    fn take(&mut self, kind: Kind, configured: SocketAddr) -> Option<OwnedFd> {
        let at = self.offer.sockets.iter().zip(&self.fds).position(|(d, fd)| {
            fd.is_some() && d.kind == kind && (d.configured == configured || d.bound == configured)
        })?;
        self.fds[at].take()
    }

    /// The running process's `kind` TCP listener for `configured`, if it
    /// has one.
    pub fn tcp(&mut self, kind: Kind, configured: SocketAddr) -> Option<std::net::TcpListener> {
        self.take(kind, configured).map(std::net::TcpListener::from)
    }

    /// The running process's HTTP/3 UDP socket for `configured`, if it has one.
    pub fn udp(&mut self, configured: SocketAddr) -> Option<std::net::UdpSocket> {
        self.take(Kind::H3, configured).map(std::net::UdpSocket::from)
    }

    /// Where the datagrams of QUIC connections on `configured` go, by the
    /// generation of the process that has them: the running process's,
    /// and those of processes before it still draining.
    pub fn steers(&mut self, configured: SocketAddr) -> Vec<(u64, StdUnixDatagram)> {
        let mut out = Vec::new();
        for (d, fd) in self.offer.sockets.iter().zip(self.fds.iter_mut()) {
            if d.kind == Kind::Steer && (d.configured == configured || d.bound == configured) {
                if let (Some(g), Some(fd)) = (d.generation, fd.take()) {
                    out.push((g, StdUnixDatagram::from(fd)));
                }
            }
        }
        out
    }

    /// Tell the running process that this one serves, record it as the
    /// previous process of `process`, and follow its drain in the
    /// background. Once it has released the sockets (or is gone), the
    /// upgrade socket is taken over for the next upgrade, served by
    /// `next` (see [`Handover::serve`]).
    pub fn serving(self, process: Arc<Process>, next: Next) -> Result<(), UpgradeError> {
        let Inherited { path, offer, conn, .. } = self;
        let exchange = |message: String| UpgradeError::Exchange { path: path.clone(), message };
        *process.previous.lock() =
            Some(Previous { pid: offer.pid, generation: offer.generation, state: "draining", in_progress: 0 });
        let mut line = serde_json::to_vec(&Step::Ready { pid: process.pid }).map_err(|e| exchange(e.to_string()))?;
        line.push(b'\n');
        (&conn).write_all(&line).map_err(|e| exchange(format!("telling the running process: {e}")))?;
        conn.set_nonblocking(true).map_err(|e| exchange(e.to_string()))?;
        let conn = tokio::net::UnixStream::from_std(conn).map_err(|e| exchange(e.to_string()))?;
        tokio::spawn(follow(conn, path, process, next));
        Ok(())
    }
}

/// What the next upgrade needs from this process: its listening sockets,
/// what it has in progress, and where to say that it was taken over.
#[derive(Clone)]
pub struct Next {
    /// This process's listening sockets.
    pub listening: Arc<Listening>,
    /// Requests and streams in progress.
    pub drain: Drain,
    /// Turns true once a new process serves on the sockets.
    pub taken: Arc<watch::Sender<bool>>,
    /// Turns true once this process no longer accepts.
    pub stopped: watch::Receiver<bool>,
}

/// Follow the previous process's drain, then take the upgrade socket.
async fn follow(conn: tokio::net::UnixStream, path: PathBuf, process: Arc<Process>, next: Next) {
    let (read, _write) = conn.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let mut bound = false;
    while let Ok(Some(line)) = lines.next_line().await {
        match serde_json::from_str::<Step>(&line) {
            Ok(Step::Released) => {
                if !bound {
                    bound = true;
                    bind_next(&path, process.clone(), &next);
                }
            }
            Ok(Step::Draining { in_progress }) => process.set_previous(|p| p.in_progress = in_progress),
            Ok(Step::Ready { .. } | Step::Take) | Err(_) => {
                tracing::debug!(line, "ignoring a message of the previous process")
            }
        }
    }
    process.set_previous(|p| {
        p.state = "exited";
        p.in_progress = 0;
    });
    tracing::info!("the previous process has exited");
    if !bound {
        bind_next(&path, process, &next);
    }
}

fn bind_next(path: &Path, process: Arc<Process>, next: &Next) {
    match Handover::bind_replacing(path) {
        Ok(h) => {
            tokio::spawn(h.serve(process.clone(), next.clone()));
        }
        Err(e) => tracing::error!("{e}; this process cannot be upgraded"),
    }
    // What `stoke upgrade` waits for (the one line this process writes to
    // stdout; ignored when nobody reads it).
    let _ = writeln!(
        std::io::stdout(),
        "generation {} (pid {}) serves; the previous process drains",
        process.generation,
        process.pid
    );
}

/// Why a connection on the upgrade socket came to nothing.
enum Refused {
    /// It did not ask for the sockets.
    Probe,
    /// The upgrade failed, for this reason.
    Failed(String),
}

/// The upgrade socket of a running process, on which the next one asks
/// for the listening sockets.
pub struct Handover {
    path: PathBuf,
    listener: tokio::net::UnixListener,
    /// The socket file's (device, inode): removed at exit only if still ours.
    file: (u64, u64),
    /// A new process took over: the path is its own (to bind), not ours to
    /// remove, even while it still shows our socket.
    handed_over: bool,
}

impl Handover {
    /// Listen on `path`. A process that still answers there is another
    /// stoke (to be upgraded with `stoke upgrade`, not started beside); a
    /// file that nobody answers on is left over from a process that died,
    /// and is replaced.
    pub fn bind(path: &Path) -> Result<Handover, UpgradeError> {
        if UnixStream::connect(path).is_ok() {
            return Err(UpgradeError::Bind {
                path: path.to_owned(),
                message: "another stoke is running there; upgrade it with `stoke upgrade`, or stop it first".into(),
            });
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(UpgradeError::Bind { path: path.to_owned(), message: e.to_string() }),
        }
        Self::listen_at(path, path)
    }

    /// Listen beside `path`, then rename over it: the process being
    /// replaced keeps its listener, now unreachable, and nobody connecting
    /// meanwhile finds no socket.
    fn bind_replacing(path: &Path) -> Result<Handover, UpgradeError> {
        let mut beside = path.as_os_str().to_owned();
        beside.push(format!(".{}", std::process::id()));
        let beside = PathBuf::from(beside);
        let _ = std::fs::remove_file(&beside);
        let h = Self::listen_at(&beside, path)?;
        std::fs::rename(&beside, path).map_err(|e| {
            let _ = std::fs::remove_file(&beside);
            UpgradeError::Bind { path: path.to_owned(), message: e.to_string() }
        })?;
        Ok(h)
    }

    fn listen_at(at: &Path, path: &Path) -> Result<Handover, UpgradeError> {
        let bind = |message: String| UpgradeError::Bind { path: path.to_owned(), message };
        let listener = std::os::unix::net::UnixListener::bind(at).map_err(|e| bind(e.to_string()))?;
        // Whoever can connect can take the listening sockets: the owner only.
        std::fs::set_permissions(at, std::fs::Permissions::from_mode(0o600)).map_err(|e| bind(e.to_string()))?;
        let meta = std::fs::metadata(at).map_err(|e| bind(e.to_string()))?;
        listener.set_nonblocking(true).map_err(|e| bind(e.to_string()))?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| bind(e.to_string()))?;
        Ok(Handover { path: path.to_owned(), listener, file: (meta.dev(), meta.ino()), handed_over: false })
    }

    /// Answer upgrade requests until one succeeds: offer the sockets, wait
    /// for the new process to serve, then say so on `next.taken` (the edge
    /// then stops accepting), say `released` once it has, and report the
    /// drain until this process exits. A new process that fails to start
    /// changes nothing here.
    pub async fn serve(mut self, process: Arc<Process>, mut next: Next) {
        loop {
            let conn = match self.listener.accept().await {
                Ok((conn, _)) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "upgrade socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.offer(conn, &process, &next.listening).await {
                Err(Refused::Probe) => tracing::debug!("upgrade socket: a connection that asked for nothing"),
                Ok(conn) => {
                    tracing::info!(
                        generation = process.generation + 1,
                        "a new process serves on the listening sockets: draining"
                    );
                    self.handed_over = true;
                    let _ = next.taken.send(true);
                    let _ = next.stopped.wait_for(|s| *s).await;
                    report(conn, next.drain).await;
                    return;
                }
                Err(Refused::Failed(e)) => {
                    process.failed.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(crate::metrics::UPGRADES_FAILED_TOTAL).increment(1);
                    tracing::error!("upgrade failed, still serving: {e}");
                }
            }
        }
    }

    /// Offer the sockets on `conn`, once asked, and wait for the new
    /// process to serve.
    async fn offer(
        &self,
        mut conn: tokio::net::UnixStream,
        process: &Process,
        listening: &Listening,
    ) -> Result<tokio::net::UnixStream, Refused> {
        let mut asked = String::new();
        let mut reader = tokio::io::BufReader::new(&mut conn);
        let read = reader.read_line(&mut asked);
        match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok(n)) if n > 0 && matches!(serde_json::from_str(asked.trim_end()), Ok(Step::Take)) => {}
            _ => return Err(Refused::Probe),
        }
        self.hand_over(conn, process, listening).await.map_err(Refused::Failed)
    }

    async fn hand_over(
        &self,
        conn: tokio::net::UnixStream,
        process: &Process,
        listening: &Listening,
    ) -> Result<tokio::net::UnixStream, String> {
        // The HTTP/3 endpoint's datagrams come back over a pair of Unix
        // datagram sockets: this end is read once the new process serves.
        let channel = match &listening.steer {
            Some(_) => Some(StdUnixDatagram::pair().map_err(|e| format!("HTTP/3 steering: {e}"))?),
            None => None,
        };
        // With it go the channels to the processes before this one that
        // still drain, so that the new one passes them theirs directly.
        let h3 = listening.sockets.iter().find(|(d, _)| d.kind == Kind::H3).map(|(d, _)| d.clone());
        let mut extra = Vec::new();
        if let (Some((_, theirs)), Some(h3), Some(steered)) = (&channel, &h3, &listening.steer) {
            let steer = |generation| Described { kind: Kind::Steer, generation: Some(generation), ..h3.clone() };
            let ours = theirs.as_fd().try_clone_to_owned().map_err(|e| format!("HTTP/3 steering: {e}"))?;
            extra.push((steer(process.generation), ours));
            extra.extend(steered.predecessors().into_iter().map(|(g, fd)| (steer(g), fd)));
        }
        let mut text = serde_json::to_vec(&listening.offer(process.generation, &extra)).map_err(|e| e.to_string())?;
        text.push(b'\n');
        let conn = conn.into_std().map_err(|e| e.to_string())?;
        conn.set_nonblocking(false).map_err(|e| e.to_string())?;
        conn.set_write_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let fds: Vec<_> = listening.sockets.iter().chain(&extra).map(|(_, fd)| fd.as_fd()).collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err("too many sockets to hand over".into());
        }
        let sent = rustix::net::sendmsg(&conn, &[IoSlice::new(&text)], &mut control, rustix::net::SendFlags::empty())
            .map_err(|e| format!("sending the sockets: {e}"))?;
        if sent != text.len() {
            return Err("the offer was cut short".into());
        }
        conn.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut conn = tokio::net::UnixStream::from_std(conn).map_err(|e| e.to_string())?;
        let mut reader = tokio::io::BufReader::new(&mut conn);
        let mut line = String::new();
        match tokio::time::timeout(START_TIMEOUT, reader.read_line(&mut line)).await {
            Err(_) => return Err(format!("the new process did not serve within {START_TIMEOUT:?}")),
            Ok(Err(e)) => return Err(format!("the new process: {e}")),
            Ok(Ok(0)) => return Err("the new process ended before it served (its log says why)".into()),
            Ok(Ok(_)) => {}
        }
        match serde_json::from_str::<Step>(line.trim_end()) {
            Ok(Step::Ready { pid }) => {
                tracing::info!(pid, "the new process serves");
                // From now on the new process reads the UDP socket and
                // passes this one its connections' datagrams.
                if let (Some(steered), Some((ours, _))) = (&listening.steer, channel) {
                    if let Err(e) = steered.follow(ours) {
                        tracing::error!(error = %e, "HTTP/3 steering failed; this process's QUIC connections may break");
                    }
                }
                Ok(conn)
            }
            _ => Err(format!("the new process said {:?}, not ready", line.trim_end())),
        }
    }
}

impl Drop for Handover {
    /// Remove the socket file, unless a newer process has taken over.
    fn drop(&mut self) {
        if self.handed_over {
            return;
        }
        if let Ok(meta) = std::fs::metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Say `released`, then what is still in progress, at once and then once
/// a second, until the process exits (which closes the connection) or the
/// new one goes away.
async fn report(mut conn: tokio::net::UnixStream, drain: Drain) {
    let mut step = Step::Released;
    loop {
        let Ok(mut line) = serde_json::to_vec(&step) else { return };
        line.push(b'\n');
        if conn.write_all(&line).await.is_err() {
            return;
        }
        if !matches!(step, Step::Released) {
            tokio::time::sleep(PROGRESS_EVERY).await;
        }
        step = Step::Draining { in_progress: drain.active() };
    }
}

/// The process that took over, as `stoke upgrade` saw it.
#[derive(Debug)]
pub struct Taken {
    /// Its process id.
    pub pid: u32,
    /// What it said: its generation and pid.
    pub said: String,
}

/// Start this binary as `stoke serve --upgrade` for `config`, in a process
/// group of its own (a Ctrl-C at `stoke upgrade` does not reach it), and
/// wait until it has taken over, which it says in one line on its stdout
/// once the upgrade socket at `path` is its own. Fails if nothing listens
/// there, or if the new process exits first (its log, on this process's
/// stderr, says why).
pub fn run_upgrade(
    path: &Path,
    config: &Path,
    location: Option<&str>,
    log_format: crate::logging::LogFormat,
) -> Result<Taken, String> {
    use std::os::unix::process::CommandExt;
    if !path.exists() {
        return Err(format!("no running stoke: {} does not exist", path.display()));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    let format = match log_format {
        crate::logging::LogFormat::Text => "text",
        crate::logging::LogFormat::Json => "json",
    };
    cmd.args(["--log-format", format, "serve", "--upgrade", "--config"]).arg(config);
    if let Some(l) = location {
        cmd.args(["--location", l]);
    }
    // stderr (its log) is this process's.
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("cannot start the new process: {e}"))?;
    let stdout = child.stdout.take().ok_or("the new process has no stdout")?;
    let (said_tx, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = said_tx.send(line);
    });
    let wait = START_TIMEOUT + Duration::from_secs(10);
    let deadline = std::time::Instant::now() + wait;
    loop {
        match said.recv_timeout(Duration::from_millis(20)) {
            Ok(line) if !line.is_empty() => return Ok(Taken { pid: child.id(), said: line.trim_end().to_owned() }),
            // Its stdout closed without a word: it is ending.
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map_err(|e| e.to_string())?;
                return Err(format!("the new process exited ({status}) before it served"));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the new process exited ({status}) before it served"));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("the new process (pid {}) did not take over within {wait:?}; stopped it", child.id()));
        }
    }
}

/// Tell systemd (`Type=notify`, `NotifyAccess=all`) `state`, such as
/// `READY=1`, if this process runs under it; a process started by `stoke
/// upgrade` names itself the service's main process with `MAINPID=`.
pub fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let target = target.to_string_lossy().into_owned();
    let addr = match target.strip_prefix('@') {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()),
        None => std::os::unix::net::SocketAddr::from_pathname(&target),
    };
    let sent = addr.and_then(|addr| {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = %target, "cannot notify systemd");
    }
}
