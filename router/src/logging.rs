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

use std::io::{IsTerminal, Write};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::Duration;

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
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
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
        if self.buf.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.buf);
        match self.queue.sender.try_send(Item::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics::counter!(m::LOG_LINES_DROPPED).increment(1);
            }
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
    use std::sync::{Arc, Mutex};

    /// A writer whose output the test reads.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
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
        let out = Shared::default();
        let writer = {
            let out = out.clone();
            std::thread::spawn(move || write_out(rx, out))
        };
        let (done, wait) = mpsc::sync_channel(1);
        queue.sender.send(Item::Flush(done)).expect("queue");
        wait.recv_timeout(Duration::from_secs(5)).expect("flushed");
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        assert_eq!(text, "line 0\nline 1\nline 2\nline 3\n");
        drop(queue);
        writer.join().expect("the writer ends with its senders");
    }
}
