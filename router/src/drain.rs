//! Counting work in progress (requests, streams) so that shutdown can wait
//! for it to finish.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Inner {
    active: AtomicUsize,
    idle: Notify,
    stopping: AtomicBool,
}

/// A handle that hands out guards and waits for them all to drop.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    inner: Arc<Inner>,
}

/// One unit of work in progress; dropped when it ends.
#[derive(Debug)]
pub struct Guard {
    inner: Arc<Inner>,
}

impl Drain {
    /// Count one more unit of work until the guard drops.
    pub fn guard(&self) -> Guard {
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        Guard { inner: self.inner.clone() }
    }

    /// Say that the process drains: HTTP/1.1 answers from now on close
    /// their connection.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Release);
    }

    /// Whether the process drains.
    pub fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Relaxed)
    }

    /// Units of work in progress.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Wait until no guard is alive, or `timeout` passes; returns whether
    /// everything finished.
    pub async fn wait(&self, timeout: Duration) -> bool {
        let idle = async {
            loop {
                let notified = self.inner.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, idle).await.is_ok()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_every_guard() {
        let drain = Drain::default();
        assert!(drain.wait(Duration::from_secs(1)).await, "nothing in progress");
        let a = drain.guard();
        let b = drain.guard();
        assert!(!drain.wait(Duration::from_secs(1)).await, "times out with work in progress");
        let waiter = {
            let d = drain.clone();
            tokio::spawn(async move { d.wait(Duration::from_secs(10)).await })
        };
        drop(a);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        drop(b);
        assert!(waiter.await.expect("join"));
        assert_eq!(drain.active(), 0);
    }
}
