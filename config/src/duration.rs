//! Durations and sizes as written in the config file: `"250ms"`, `"5s"`,
//! `"1m30s"`, `"1h"`; `"64KiB"`, `"1MiB"`.

use std::time::Duration;

/// What a duration string may look like, for error messages.
pub const DURATION_HELP: &str = r#"a duration such as "250ms", "5s", "5m", "1h" or "1m30s""#;

/// The longest duration any key accepts: a week. Longer values are
/// typos, and deadlines, timers and jitter computed from them must not
/// overflow at run time.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why [`MAX_DURATION`] exists, for the error message.
pub const MAX_DURATION_WHY: &str =
    "longer values are almost surely typos, and the timers computed from them must not overflow";

/// What a size may look like, for error messages.
pub const SIZE_HELP: &str = r#"a size in bytes, such as 65536, "64KiB", "1MiB" or "1GiB""#;

/// Parse a duration: one or more `<integer><unit>` parts, units `ms`, `s`,
/// `m`, `h`, summed. Returns `None` for anything else (empty, no unit,
/// unknown unit, overflow).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(part)?;
    }
    Some(total)
}

/// Parse a size with an optional binary or decimal unit: `B`, `KiB`,
/// `MiB`, `GiB`, `KB`, `MB`, `GB`.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let n: u64 = text[..digits].parse().ok()?;
    let mult: u64 = match text[digits..].trim_start() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Format a duration the way the config file writes it (for messages and
/// `/state`): the largest unit that divides it exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0ms".to_owned();
    }
    if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1_000 == 0 {
        format!("{}s", ms / 1_000)
    } else if ms > u128::from(u64::MAX) {
        // Too many milliseconds for one number the parser reads back.
        format!("{}s{}ms", ms / 1_000, ms % 1_000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        for bad in ["", "5", "s", "5 s", "5sec", "-1s", "1.5s", "ms5", "99999999999999999999h"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Some(65536));
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("2 MB"), Some(2_000_000));
        for bad in ["", "MiB", "1 mib", "-1", "1.5MiB", "99999999999GiB"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn huge_durations_round_trip() {
        let d = Duration::from_millis(u64::MAX) + Duration::from_millis(1);
        assert_eq!(parse_duration(&format_duration(d)), Some(d));
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["250ms", "5s", "5m", "1h", "90s", "0ms"] {
            let d = parse_duration(text).expect("valid");
            assert_eq!(format_duration(d), text);
        }
    }
}
