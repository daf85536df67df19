//! Any text fed to the config loader: it never panics, and every problem it
//! reports points inside the text with a 1-based line and column (the
//! fuzzing twin of `config/tests/mutations.rs`).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use stoke_config::{load_str, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match load_str(text, Path::new("/tmp/fuzz.toml")) {
        Ok(_) => {}
        Err(ConfigError::Invalid { problems, .. }) => {
            assert!(!problems.is_empty(), "rejected with no problem listed");
            // `lines()` drops a final empty line; a problem may sit on it.
            let line_count = text.lines().count().max(1) + 1;
            for p in &problems {
                assert!(p.span.start <= text.len(), "span {:?} outside {} bytes", p.span, text.len());
                assert!(p.line >= 1 && p.line <= line_count, "line {} of {}", p.line, line_count);
                assert!(p.column >= 1, "column {}", p.column);
                assert!(!p.message.is_empty(), "empty message at {:?}", p.span);
            }
        }
        Err(other) => panic!("unexpected error kind: {other}"),
    }
});
