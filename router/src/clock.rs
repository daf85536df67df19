//! The one clock of the async shells: tokio's, so that tests can pause and
//! advance it (`start_paused = true`). Decisions never call this; the
//! shells read it once and pass `now` in.

use std::time::Instant;

/// Now, on the runtime's clock (the real clock outside a runtime, and in
/// builds without tokio's test utilities).
#[inline]
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
