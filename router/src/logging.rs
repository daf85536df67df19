//! Logs: `tracing` to stderr, as text or JSON, filtered by `RUST_LOG`
//! (default `info`). Access log lines have the target `stoke::access`; turn
//! them off with `RUST_LOG=info,stoke::access=off`.
//!
//! Lines do not go to stderr from the thread that logs them: a request
//! would then wait for a `write` to a file, a pipe or a terminal, under
//! stderr's lock, once per line. Each line is queued instead (bounded,
//! [`QUEUE_LINES`]) and one thread writes what has queued up in batches. A
//! line that finds the queue full is dropped and counted
//! (`stoke_log_lines_dropped_total`): a slow log must not slow the edge.
//!
//! The access log, one line per request, does not go through `tracing`'s
//! formatter either (unless stderr is a terminal, where lines are coloured):
//! [`Fields`] writes it by hand in the very layout `tracing` gives the other
//! lines, text or JSON, at a fraction of the cost.

use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::metrics as m;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Lines queued for the writer thread at most (about 4 MB of access log).
pub const QUEUE_LINES: usize = 16 * 1024;

/// Bytes the writer thread gathers into one `write` at most.
const BATCH_BYTES: usize = 64 * 1024;

/// How long the writer thread lets lines gather while they keep coming.
const BATCH_WAIT: Duration = Duration::from_millis(10);

/// How long [`flush`] waits for the queue to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Install the global subscriber (once; later calls do nothing), with
/// `default` as the filter when `RUST_LOG` is not set.
pub fn init(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(Queue::start()).with_ansi(ansi);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if installed.is_ok() && !ansi {
        let _ = BY_HAND.set(format);
    }
}

/// The format lines are written in, when [`Fields`] can write them by hand
/// (the subscriber is ours and does not colour its lines).
static BY_HAND: OnceLock<LogFormat> = OnceLock::new();

/// The format to write a line by hand in; `None`: give it to `tracing`.
pub fn by_hand() -> Option<LogFormat> {
    BY_HAND.get().copied()
}

/// One `INFO` line of `target`, its fields written by hand in the layout
/// of `tracing_subscriber`'s formatters without colours: text
/// (`TIMESTAMP  INFO target: a=1 b="x"`: strings quoted and escaped as
/// `Debug` does, `Display` values as they are) or JSON (flattened, the
/// target last). Queued by [`Fields::send`].
pub struct Fields {
    format: LogFormat,
    buf: Vec<u8>,
    target: &'static str,
    first: bool,
}

impl Fields {
    /// Start a line of `target` in `format`, stamped now.
    pub fn new(format: LogFormat, target: &'static str) -> Self {
        let now = SystemTime::now();
        let mut buf = Vec::with_capacity(320);
        match format {
            LogFormat::Text => {
                timestamp(&mut buf, now);
                buf.extend_from_slice(b"  INFO ");
                buf.extend_from_slice(target.as_bytes());
                buf.extend_from_slice(b": ");
            }
            LogFormat::Json => {
                buf.extend_from_slice(b"{\"timestamp\":\"");
                timestamp(&mut buf, now);
                buf.extend_from_slice(b"\",\"level\":\"INFO\"");
            }
        }
        Fields { format, buf, target, first: true }
    }

    fn name(&mut self, name: &str) {
        match self.format {
            LogFormat::Text => {
                if !self.first {
                    self.buf.push(b' ');
                }
                self.buf.extend_from_slice(name.as_bytes());
                self.buf.push(b'=');
            }
            LogFormat::Json => {
                self.buf.extend_from_slice(b",\"");
                self.buf.extend_from_slice(name.as_bytes());
                self.buf.extend_from_slice(b"\":");
            }
        }
        self.first = false;
    }

    /// A string field (`tracing`'s `name = value` for a `&str`): quoted and
    /// escaped as `Debug` does in text, a JSON string in JSON.
    pub fn str(&mut self, name: &str, value: &str) -> &mut Self {
        self.name(name);
        match self.format {
            // Printable ASCII but `"` and `\` is what `Debug` leaves as it is.
            LogFormat::Text if value.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\') => {
                self.buf.push(b'"');
                self.buf.extend_from_slice(value.as_bytes());
                self.buf.push(b'"');
            }
            LogFormat::Text => {
                let _ = write!(self.buf, "{value:?}");
            }
            LogFormat::Json => json_string(&mut self.buf, value),
        }
        self
    }

    /// A string field written with `Display` (`tracing`'s `name = %value`):
    /// as it is in text, a JSON string in JSON.
    pub fn plain(&mut self, name: &str, value: &str) -> &mut Self {
        self.name(name);
        match self.format {
            LogFormat::Text => self.buf.extend_from_slice(value.as_bytes()),
            LogFormat::Json => json_string(&mut self.buf, value),
        }
        self
    }

    /// An unsigned number.
    pub fn u64(&mut self, name: &str, value: u64) -> &mut Self {
        self.name(name);
        decimal(&mut self.buf, value, 1);
        self
    }

    /// A duration in milliseconds to the microsecond, as `Debug` and
    /// `serde_json` write the float `micros / 1000` (`0.835`, `12.0`),
    /// without formatting a float: that cost about 800 instructions a line.
    pub fn millis(&mut self, name: &str, micros: u64) -> &mut Self {
        self.name(name);
        decimal(&mut self.buf, micros / 1000, 1);
        self.buf.push(b'.');
        let frac = micros % 1000;
        match frac {
            0 => self.buf.push(b'0'),
            _ if frac % 100 == 0 => decimal(&mut self.buf, frac / 100, 1),
            _ if frac % 10 == 0 => decimal(&mut self.buf, frac / 10, 2),
            _ => decimal(&mut self.buf, frac, 3),
        }
        self
    }

    /// The finished line.
    pub fn into_line(mut self) -> Vec<u8> {
        if self.format == LogFormat::Json {
            self.buf.extend_from_slice(b",\"target\":");
            json_string(&mut self.buf, self.target);
            self.buf.push(b'}');
        }
        self.buf.push(b'\n');
        self.buf
    }

    /// Queue the line for the writer thread (dropped and counted if the
    /// queue is full, as every line).
    pub fn send(self) {
        let line = self.into_line();
        match QUEUE.get() {
            Some(queue) => queue.send(line),
            None => metrics::counter!(m::LOG_LINES_DROPPED).increment(1),
        }
    }
}

thread_local! {
    /// The timestamp's text up to its seconds, and the second it is of.
    static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

/// `value` as a JSON string.
fn json_string(buf: &mut Vec<u8>, value: &str) {
    // Only `"`, `\` and control characters are escaped.
    if value.bytes().all(|b| b >= b' ' && b != b'"' && b != b'\\') {
        buf.push(b'"');
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *buf, value);
    }
}

/// `n` in decimal, zero-padded to `width` digits.
fn decimal(buf: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut i = digits.len();
    while n > 0 || digits.len() - i < width {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    buf.extend_from_slice(&digits[i..]);
}

/// `2026-12-02T13:58:01.123456Z`: RFC 3339 in UTC with microseconds, as
/// `tracing_subscriber`'s default timer writes it. The date and time up
/// to the second are worked out once a second per thread.
fn timestamp(buf: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != secs {
            let mut text = [0u8; 19];
            let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
            let rem = secs % 86_400;
            let mut w = &mut text[..];
            let _ = write!(w, "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60);
            *cache = (secs, text);
        }
        buf.extend_from_slice(&cache.1);
    });
    buf.push(b'.');
    decimal(buf, u64::from(since.subsec_micros()), 6);
    buf.push(b'Z');
}

/// The proleptic Gregorian (year, month, day) of a day count since
/// 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Write every line queued so far before returning (at most
/// [`FLUSH_WAIT`]): the process is about to exit.
pub fn flush() {
    let Some(queue) = QUEUE.get() else { return };
    let (done, wait) = mpsc::sync_channel(1);
    // A flush waits behind the lines queued before it, even when full.
    if queue.sender.send(Item::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(FLUSH_WAIT);
    }
}

static QUEUE: OnceLock<Queue> = OnceLock::new();

enum Item {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

/// The queue in front of the writer thread.
#[derive(Clone)]
struct Queue {
    sender: SyncSender<Item>,
}

impl Queue {
    /// The process's queue, its writer thread started on first use. If the
    /// thread cannot start, every line is dropped (and counted).
    fn start() -> Queue {
        QUEUE
            .get_or_init(|| {
                let (sender, rx) = mpsc::sync_channel(QUEUE_LINES);
                let spawned = std::thread::Builder::new()
                    .name("stoke-log".into())
                    .spawn(move || write_out(rx, std::io::stderr()));
                if let Err(e) = spawned {
                    eprintln!("stoke: cannot start the log writer, logging nothing: {e}");
                }
                Queue { sender }
            })
            .clone()
    }
}

impl Queue {
    /// Queue `line`; a full queue drops it and counts it.
    fn send(&self, line: Vec<u8>) {
        match self.sender.try_send(Item::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics::counter!(m::LOG_LINES_DROPPED).increment(1);
            }
        }
    }
}

/// The writer thread: write what has queued up, a batch at a time, until
/// every sender is gone. While lines keep coming it looks every
/// [`BATCH_WAIT`] instead of waiting on the queue: a thread that waits is
/// woken by each line (a system call and a switch on the logging core,
/// which cost more than the write it saves).
fn write_out(rx: Receiver<Item>, mut out: impl Write) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut flushes = Vec::new();
    // Idle: wait for a line.
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        loop {
            let mut got = 0;
            while let Some(item) = next.take() {
                got += 1;
                match item {
                    Item::Line(line) => batch.extend_from_slice(&line),
                    Item::Flush(done) => flushes.push(done),
                }
                if batch.len() >= BATCH_BYTES {
                    write_batch(&mut out, &mut batch, &mut flushes);
                }
                next = rx.try_recv().ok();
            }
            write_batch(&mut out, &mut batch, &mut flushes);
            if got == 0 {
                break;
            }
            std::thread::sleep(BATCH_WAIT);
            next = rx.try_recv().ok();
        }
    }
}

/// Write `batch` (if any) and answer the flushes waiting for it.
fn write_batch(out: &mut impl Write, batch: &mut Vec<u8>, flushes: &mut Vec<SyncSender<()>>) {
    if !batch.is_empty() {
        // A log that cannot be written has nowhere to say so.
        let _ = out.write_all(batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > 4 * BATCH_BYTES {
            batch.shrink_to(BATCH_BYTES);
        }
    }
    for done in flushes.drain(..) {
        let _ = done.try_send(());
    }
}

/// One line being formatted; queued when the formatter drops it.
struct Line {
    queue: Queue,
    buf: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.queue.send(std::mem::take(&mut self.buf));
        }
    }
}

impl<'a> MakeWriter<'a> for Queue {
    type Writer = Line;

    fn make_writer(&'a self) -> Self::Writer {
        Line { queue: self.clone(), buf: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Written;

    #[test]
    fn milliseconds_are_written_as_the_float_would_be() {
        let mut micros: Vec<u64> = (0..3000).collect();
        micros.extend([10_000, 12_340, 99_999, 100_001, 1_234_567, 86_400_000_000, u64::from(u32::MAX)]);
        for us in micros {
            let ms = us as f64 / 1000.0;
            for (format, want) in
                [(LogFormat::Text, format!("{ms:?}")), (LogFormat::Json, serde_json::to_string(&ms).expect("a float"))]
            {
                let mut f = Fields::new(format, "t");
                let start = f.buf.len();
                f.millis("d", us);
                let got = String::from_utf8(f.buf[start..].to_vec()).expect("utf-8");
                let value = got.rsplit([':', '=']).next().expect("value");
                assert_eq!(value, want, "{us} us in {format:?}");
            }
        }
    }

    #[test]
    fn timestamps_are_rfc3339_in_utc_with_microseconds_across_leap_days_and_centuries() {
        let at = |secs: u64, micros: u64| {
            let mut buf = Vec::new();
            timestamp(&mut buf, UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros));
            String::from_utf8(buf).expect("utf-8")
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_709_251_199, 999_999), "2024-02-29T23:59:59.999999Z");
        // The same second again comes from the thread's cache.
        assert_eq!(at(1_709_251_199, 1), "2024-02-29T23:59:59.000001Z");
        assert_eq!(at(1_798_761_599, 123_456), "2026-12-31T23:59:59.123456Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
    }

    #[test]
    fn lines_arrive_whole_and_in_order_and_a_full_queue_drops_instead_of_blocking() {
        let (sender, rx) = mpsc::sync_channel(4);
        let queue = Queue { sender };
        // No writer yet: the fifth line finds the queue full and is dropped
        // at once (the caller does not wait).
        for i in 0..5 {
            let mut w = queue.make_writer();
            writeln!(w, "line {i}").expect("write");
        }
        let out = Written::default();
        let writer = {
            let out = out.clone();
            std::thread::spawn(move || write_out(rx, out))
        };
        let (done, wait) = mpsc::sync_channel(1);
        queue.sender.send(Item::Flush(done)).expect("queue");
        wait.recv_timeout(Duration::from_secs(5)).expect("flushed");
        assert_eq!(out.text(), "line 0\nline 1\nline 2\nline 3\n");
        drop(queue);
        writer.join().expect("the writer ends with its senders");
    }
}
