//! h3load: the HTTP/3 load generator of stoke's end-to-end bench (Debian's
//! h2load and curl have no HTTP/3), with an HTTP/1.1 mode for open-loop
//! (fixed-rate) latency runs, which Debian's wrk cannot do.
//!
//! It runs `-c` connections with `-m` concurrent request streams each (HTTP/3;
//! HTTP/1.1 has one request at a time per connection) for a fixed duration,
//! GETs one path again and again, and prints one JSON line on stdout:
//! requests, errors, req/s and latency percentiles in microseconds.
//!
//! - Closed loop (default): each stream sends its next request when the
//!   previous answer has been read, like h2load and wrk.
//! - Open loop (`--rate R`): requests start on a fixed schedule (R per second
//!   over all streams). A request that is due while its stream still waits
//!   for the previous answer is counted from when it was due, not from when
//!   it could be sent, so that a stalled server is not hidden (coordinated
//!   omission, as wrk2 does it); one sent on time is counted from when it was
//!   sent, so that the timer's own lateness (tokio's is up to 1 ms) is not
//!   blamed on the server.
//!
//! Everything runs on one thread (a current-thread tokio runtime), like
//! `h2load -t1` and `wrk -t1`. Requests that start during `--warmup` are not
//! counted. Only loopback targets are accepted. The server's certificate is
//! not checked (as wrk and h2load do not check it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const USAGE: &str = "\
usage: h3load (--h3 | --h1) ADDR [options]
  --h3 ADDR        HTTP/3 over QUIC to ADDR (127.0.0.1:PORT)
  --h1 ADDR        HTTP/1.1 over TCP (keep-alive) to ADDR
  -c N             connections (default 1)
  -m N             concurrent streams per connection, HTTP/3 only (default 1)
  -d SECS          measured duration (default 10)
  --warmup SECS    unmeasured warm-up before it (default 1)
  --rate R         open loop: R requests per second in all (default: closed loop)
  --path PATH      request path (default /)
  --host NAME      :authority / Host and TLS server name (default localhost)
  --timeout SECS   per-request timeout, counted as an error (default 10)
Prints one JSON line: {\"proto\",\"conns\",\"streams\",\"requests\",\"errors\",\"secs\",\"rps\",\"p50_us\",\"p90_us\",\"p99_us\",\"p999_us\",\"max_us\",\"mean_us\"}";

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    H1,
    H3,
}

struct Args {
    proto: Proto,
    addr: SocketAddr,
    conns: usize,
    streams: usize,
    duration: Duration,
    warmup: Duration,
    rate: Option<f64>,
    path: String,
    host: String,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    // `-c8` is `-c 8` (as in wrk and h2load).
    let mut it = std::env::args().skip(1).flat_map(|a| match a.as_bytes() {
        [b'-', b'c' | b'm' | b'd', _, ..] => vec![a[..2].to_string(), a[2..].to_string()],
        _ => vec![a],
    });
    let mut proto = None;
    let mut addr = None;
    let mut a = Args {
        proto: Proto::H1,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        conns: 1,
        streams: 1,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(1),
        rate: None,
        path: "/".into(),
        host: "localhost".into(),
        timeout: Duration::from_secs(10),
    };
    fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
        v.ok_or_else(|| format!("{flag} needs a value"))?.parse().map_err(|_| format!("{flag}: not a number"))
    }
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--h3" | "--h1" => {
                proto = Some(if flag == "--h3" { Proto::H3 } else { Proto::H1 });
                let v = it.next().ok_or("--h3/--h1 needs ADDR")?;
                addr = Some(v.parse::<SocketAddr>().map_err(|e| format!("{v}: {e}"))?);
            }
            "-c" => a.conns = num("-c", it.next())?,
            "-m" => a.streams = num("-m", it.next())?,
            "-d" => a.duration = Duration::from_secs_f64(num("-d", it.next())?),
            "--warmup" => a.warmup = Duration::from_secs_f64(num("--warmup", it.next())?),
            "--rate" => a.rate = Some(num("--rate", it.next())?),
            "--path" => a.path = it.next().ok_or("--path needs a value")?,
            "--host" => a.host = it.next().ok_or("--host needs a value")?,
            "--timeout" => a.timeout = Duration::from_secs_f64(num("--timeout", it.next())?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    a.proto = proto.ok_or("give --h3 ADDR or --h1 ADDR")?;
    a.addr = addr.ok_or("no address")?;
    if !a.addr.ip().is_loopback() {
        return Err(format!("refusing non-loopback target {}", a.addr));
    }
    if a.conns == 0 || a.streams == 0 || a.conns * a.streams > 100_000 {
        return Err("-c and -m must be at least 1 (and c*m at most 100000)".into());
    }
    if a.proto == Proto::H1 {
        a.streams = 1;
    }
    if a.duration.is_zero() || a.duration > Duration::from_secs(600) {
        return Err("-d must be in (0, 600] seconds".into());
    }
    if a.rate.is_some_and(|r| !(r > 0.0 && r <= 10_000_000.0)) {
        return Err("--rate must be in (0, 1e7]".into());
    }
    Ok(a)
}

/// When one worker (an HTTP/3 stream slot or an HTTP/1.1 connection) sends.
#[derive(Clone, Copy)]
struct Schedule {
    /// Start of the run (warm-up included).
    start: Instant,
    /// Requests starting before this are not counted.
    measure_from: Instant,
    /// No request starts at or after this.
    end: Instant,
    /// Open loop: time between this worker's requests.
    interval: Option<Duration>,
    /// Open loop: this worker's offset into the first interval.
    offset: Duration,
}

/// What one worker measured.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// One sender of requests: an HTTP/3 stream slot or an HTTP/1.1 connection.
enum Worker {
    H1(H1Conn),
    H3 { send: SendRequest, uri: http::Uri },
}

impl Worker {
    async fn request(&mut self) -> Result<(), String> {
        match self {
            Worker::H1(conn) => conn.get().await,
            Worker::H3 { send, uri } => h3_get(send, uri).await,
        }
    }
}

/// Run `worker` on `schedule` until its end; count what started in the
/// measured window.
async fn drive(schedule: Schedule, timeout: Duration, mut worker: Worker) -> Tally {
    let mut tally = Tally::default();
    let mut due = schedule.start + schedule.offset;
    loop {
        let began = match schedule.interval {
            Some(iv) => {
                let t = due;
                due += iv;
                if Instant::now() >= t {
                    // Behind schedule: the previous answer came late, so
                    // this request waited for the server; count from when
                    // it was due (no coordinated omission).
                    t
                } else {
                    // On time: tokio's timer wakes up to ~1 ms late, which is
                    // the client's delay, not the server's; count from now.
                    tokio::time::sleep_until(t).await;
                    Instant::now()
                }
            }
            None => Instant::now(),
        };
        if began >= schedule.end {
            break;
        }
        let result = match tokio::time::timeout(timeout, worker.request()).await {
            Ok(r) => r,
            Err(_) => Err("request timed out".into()),
        };
        if began < schedule.measure_from {
            if result.is_err() {
                // A failing connection would spin: stop it.
                tally.errors += 1;
                tally.first_error = result.err();
                break;
            }
            continue;
        }
        match result {
            Ok(()) => {
                let us = began.elapsed().as_micros().min(u32::MAX as u128) as u32;
                tally.latencies_us.push(us);
            }
            Err(e) => {
                tally.errors += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(e);
                }
                if tally.errors > 1000 {
                    break;
                }
            }
        }
    }
    tally
}

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// Accepts the server's certificate without checking it (as wrk and h2load
/// do), but checks the handshake signatures made with it.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn h3_connect(a: &Args) -> Result<SendRequest, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(a.addr, &a.host)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("QUIC handshake with {}: {e}", a.addr))?;
    let (mut driver, send) =
        h3::client::new(h3_quinn::Connection::new(conn)).await.map_err(|e| format!("HTTP/3 setup: {e}"))?;
    tokio::spawn(async move {
        // Keeps the endpoint alive as long as the connection.
        let _endpoint = endpoint;
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok(send)
}

async fn h3_get(send: &mut SendRequest, uri: &http::Uri) -> Result<(), String> {
    let req = http::Request::get(uri.clone()).body(()).map_err(|e| e.to_string())?;
    let mut s = send.send_request(req).await.map_err(|e| format!("send_request: {e}"))?;
    s.finish().await.map_err(|e| format!("finish: {e}"))?;
    let resp = s.recv_response().await.map_err(|e| format!("recv_response: {e}"))?;
    while let Some(mut chunk) = s.recv_data().await.map_err(|e| format!("recv_data: {e}"))? {
        chunk.advance(chunk.remaining());
    }
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    Ok(())
}

/// One HTTP/1.1 keep-alive connection.
struct H1Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    request: Arc<[u8]>,
}

impl H1Conn {
    async fn get(&mut self) -> Result<(), String> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).await.map_err(|e| format!("connect {}: {e}", self.addr))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            self.stream = Some(s);
        }
        let r = self.exchange().await;
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    async fn exchange(&mut self) -> Result<(), String> {
        let s = self.stream.as_mut().ok_or("no connection")?;
        s.write_all(&self.request).await.map_err(|e| format!("write: {e}"))?;
        self.buf.clear();
        // The head.
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            read_more(s, &mut self.buf).await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).map_err(|_| "head is not UTF-8")?;
        let status: u16 = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or("no status")?;
        let mut length = None;
        let mut chunked = false;
        let mut close = false;
        for line in head.split("\r\n").skip(1) {
            let Some((k, v)) = line.split_once(':') else { continue };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                close = true;
            }
        }
        // The body (no pipelining: whatever follows the head is this body).
        if chunked {
            while !self.buf[head_end..].ends_with(b"0\r\n\r\n") {
                read_more(s, &mut self.buf).await?;
            }
        } else if let Some(n) = length {
            while self.buf.len() < head_end + n {
                read_more(s, &mut self.buf).await?;
            }
        } else {
            return Err("response without length".into());
        }
        if close {
            self.stream = None;
        }
        if !(200..300).contains(&status) {
            return Err(format!("status {status}"));
        }
        Ok(())
    }
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 16 * 1024];
    let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Err("connection closed".into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run(a: Args) -> Result<(), String> {
    let workers = a.conns * a.streams;
    let start = Instant::now() + Duration::from_millis(50);
    let interval = a.rate.map(|r| Duration::from_secs_f64(workers as f64 / r));
    let schedule = |i: usize| Schedule {
        start,
        measure_from: start + a.warmup,
        end: start + a.warmup + a.duration,
        interval,
        offset: interval.map_or(Duration::ZERO, |iv| iv.mul_f64(i as f64 / workers as f64)),
    };
    let mut tasks = Vec::with_capacity(workers);
    match a.proto {
        Proto::H3 => {
            let uri: http::Uri = format!("https://{}:{}{}", a.host, a.addr.port(), a.path)
                .parse()
                .map_err(|e| format!("bad path: {e}"))?;
            for c in 0..a.conns {
                let send = h3_connect(&a).await?;
                for s in 0..a.streams {
                    let worker = Worker::H3 { send: send.clone(), uri: uri.clone() };
                    tasks.push(tokio::spawn(drive(schedule(c * a.streams + s), a.timeout, worker)));
                }
            }
        }
        Proto::H1 => {
            let request: Arc<[u8]> =
                format!("GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: h3load\r\n\r\n", a.path, a.host)
                    .into_bytes()
                    .into();
            for c in 0..a.conns {
                let mut conn =
                    H1Conn { addr: a.addr, stream: None, buf: Vec::with_capacity(4096), request: request.clone() };
                // Connect up front so that the warm-up is not spent connecting.
                let s = TcpStream::connect(a.addr).await.map_err(|e| format!("connect {}: {e}", a.addr))?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                conn.stream = Some(s);
                tasks.push(tokio::spawn(drive(schedule(c), a.timeout, Worker::H1(conn))));
            }
        }
    }
    let mut total = Tally::default();
    for t in tasks {
        total.merge(t.await.map_err(|e| e.to_string())?);
    }
    let mut lat = total.latencies_us;
    lat.sort_unstable();
    let secs = a.duration.as_secs_f64();
    let mean = if lat.is_empty() { 0.0 } else { lat.iter().map(|&v| v as f64).sum::<f64>() / lat.len() as f64 };
    println!(
        "{{\"proto\":\"{}\",\"conns\":{},\"streams\":{},\"rate\":{},\"requests\":{},\"errors\":{},\"secs\":{:.3},\"rps\":{:.1},\
         \"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"mean_us\":{:.1}}}",
        if a.proto == Proto::H3 { "h3" } else { "h1" },
        a.conns,
        a.streams,
        a.rate.map_or("null".to_string(), |r| format!("{r}")),
        lat.len(),
        total.errors,
        secs,
        lat.len() as f64 / secs,
        percentile(&lat, 0.50),
        percentile(&lat, 0.90),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        lat.last().copied().unwrap_or(0),
        mean,
    );
    if let Some(e) = total.first_error {
        eprintln!("h3load: {} errors; first: {e}", total.errors);
    }
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("h3load: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("h3load: runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("h3load: {e}");
        std::process::exit(1);
    }
}
