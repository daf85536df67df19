//! Typed reads from the span-preserving TOML tree, recording a problem for
//! every unknown key, missing key and wrongly typed value instead of
//! stopping at the first.
//!
//! serde's `deny_unknown_fields` stops at the first unknown key, which would
//! hide every later problem in the file; this reader reports them all.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diag::Diagnostics;
use crate::duration::{parse_duration, parse_size, DURATION_HELP, MAX_DURATION, MAX_DURATION_WHY, SIZE_HELP};

/// A value read from the file, with the byte range it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct At<T> {
    /// The value.
    pub value: T,
    /// Where it is in the file.
    pub span: Range<usize>,
}

impl<T> At<T> {
    pub(crate) fn new(value: T, span: Range<usize>) -> Self {
        At { value, span }
    }
}

/// A table being read: knows its name for messages and its accepted keys.
pub(crate) struct TableReader<'a, 'i> {
    table: &'a DeTable<'i>,
    span: Range<usize>,
    what: String,
}

impl<'a, 'i> TableReader<'a, 'i> {
    /// Start reading `table`, reporting at once every key not in `known`.
    pub(crate) fn new(
        diags: &mut Diagnostics,
        table: &'a DeTable<'i>,
        span: Range<usize>,
        what: impl Into<String>,
        known: &[&str],
    ) -> Self {
        let what = what.into();
        for (key, _) in table.iter() {
            let name: &str = key.get_ref();
            if !known.contains(&name) {
                let hint = match closest(name, known) {
                    Some(best) => format!("did you mean \"{best}\"? "),
                    None => String::new(),
                };
                diags.error(
                    key.span(),
                    format!("unknown key \"{name}\" in {what}; {hint}accepted keys: {}", known.join(", ")),
                );
            }
        }
        TableReader { table, span, what }
    }

    /// The span of the whole table, for problems about missing keys.
    pub(crate) fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    fn get(&self, key: &str) -> Option<&'a Spanned<DeValue<'i>>> {
        self.table.get(key)
    }

    fn wrong_type(&self, diags: &mut Diagnostics, key: &str, v: &Spanned<DeValue<'_>>, expected: &str) {
        diags.error(v.span(), format!("{key} in {} must be {expected}, found {}", self.what, describe(v.get_ref())));
    }

    /// Report `key` as missing.
    pub(crate) fn missing(&self, diags: &mut Diagnostics, key: &str, expected: &str) {
        diags.error(self.span(), format!("{} needs the key \"{key}\" ({expected})", self.what));
    }

    /// An optional string.
    pub(crate) fn string(&self, diags: &mut Diagnostics, key: &str) -> Option<At<String>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some(At::new(s.to_string(), v.span())),
            _ => {
                self.wrong_type(diags, key, v, "a string");
                None
            }
        }
    }

    /// A required string.
    pub(crate) fn required_string(&self, diags: &mut Diagnostics, key: &str) -> Option<At<String>> {
        if self.get(key).is_none() {
            self.missing(diags, key, "a string");
        }
        self.string(diags, key)
    }

    /// An optional boolean.
    pub(crate) fn boolean(&self, diags: &mut Diagnostics, key: &str) -> Option<At<bool>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(At::new(*b, v.span())),
            _ => {
                self.wrong_type(diags, key, v, "true or false");
                None
            }
        }
    }

    /// An optional integer that must fit in `u64`.
    pub(crate) fn unsigned(&self, diags: &mut Diagnostics, key: &str) -> Option<At<u64>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Integer(i) => match u64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) => Some(At::new(n, v.span())),
                Err(_) => {
                    diags.error(v.span(), format!("{key} in {} must be a whole number of 0 or more", self.what));
                    None
                }
            },
            _ => {
                self.wrong_type(diags, key, v, "a whole number");
                None
            }
        }
    }

    /// An optional number (integer or float).
    pub(crate) fn number(&self, diags: &mut Diagnostics, key: &str) -> Option<At<f64>> {
        let v = self.get(key)?;
        let n = match v.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok().map(|n| n as f64),
            DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
            _ => {
                self.wrong_type(diags, key, v, "a number");
                return None;
            }
        };
        match n {
            Some(n) if n.is_finite() => Some(At::new(n, v.span())),
            _ => {
                diags.error(v.span(), format!("{key} in {} must be a finite number", self.what));
                None
            }
        }
    }

    /// A required number.
    pub(crate) fn required_number(&self, diags: &mut Diagnostics, key: &str) -> Option<At<f64>> {
        if self.get(key).is_none() {
            self.missing(diags, key, "a number");
        }
        self.number(diags, key)
    }

    /// An optional duration string.
    pub(crate) fn duration_or_auto(&self, diags: &mut Diagnostics, key: &str) -> Option<At<Option<Duration>>> {
        let v = self.get(key)?;
        if matches!(v.get_ref(), DeValue::String(s) if s.as_ref() == "auto") {
            return Some(At::new(None, v.span()));
        }
        self.duration(diags, key).map(|d| At::new(Some(d.value), d.span))
    }

    /// An optional duration.
    pub(crate) fn duration(&self, diags: &mut Diagnostics, key: &str) -> Option<At<Duration>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => match parse_duration(s) {
                Some(d) if d > MAX_DURATION => {
                    diags.error(
                        v.span(),
                        format!(
                            "{key} in {}: \"{s}\" is longer than any duration stoke accepts ({}); {MAX_DURATION_WHY}",
                            self.what,
                            crate::duration::format_duration(MAX_DURATION)
                        ),
                    );
                    None
                }
                Some(d) => Some(At::new(d, v.span())),
                None => {
                    diags.error(v.span(), format!("{key} in {}: \"{s}\" is not {DURATION_HELP}", self.what));
                    None
                }
            },
            _ => {
                self.wrong_type(diags, key, v, DURATION_HELP);
                None
            }
        }
    }

    /// An optional size: an integer of bytes or a string with a unit.
    pub(crate) fn size(&self, diags: &mut Diagnostics, key: &str) -> Option<At<u64>> {
        let v = self.get(key)?;
        let parsed = match v.get_ref() {
            DeValue::Integer(i) => u64::from_str_radix(i.as_str(), i.radix()).ok(),
            DeValue::String(s) => parse_size(s),
            _ => {
                self.wrong_type(diags, key, v, SIZE_HELP);
                return None;
            }
        };
        match parsed {
            Some(n) => Some(At::new(n, v.span())),
            None => {
                diags.error(v.span(), format!("{key} in {} must be {SIZE_HELP}", self.what));
                None
            }
        }
    }

    /// An optional socket address (`host:port` with an IP host).
    pub(crate) fn addr(&self, diags: &mut Diagnostics, key: &str) -> Option<At<SocketAddr>> {
        let s = self.string(diags, key)?;
        match parse_addr(&s.value) {
            Some(a) => Some(At::new(a, s.span)),
            None => {
                diags.error(
                    s.span,
                    format!(
                        "{key} in {}: \"{}\" is not an address; expected IP:PORT such as \"127.0.0.1:8080\" or \"[::1]:8443\"",
                        self.what, s.value
                    ),
                );
                None
            }
        }
    }

    /// An optional array of strings.
    pub(crate) fn strings(&self, diags: &mut Diagnostics, key: &str) -> Option<At<Vec<At<String>>>> {
        let v = self.get(key)?;
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(diags, key, v, "an array of strings");
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(s) => out.push(At::new(s.to_string(), item.span())),
                _ => self.wrong_type(diags, key, item, "an array of strings"),
            }
        }
        Some(At::new(out, v.span()))
    }

    /// A required array of strings.
    pub(crate) fn required_strings(&self, diags: &mut Diagnostics, key: &str) -> Option<At<Vec<At<String>>>> {
        if self.get(key).is_none() {
            self.missing(diags, key, "an array of strings");
        }
        self.strings(diags, key)
    }

    /// An optional sub-table (inline `{ … }` or `[a.b]`).
    pub(crate) fn table(&self, diags: &mut Diagnostics, key: &str) -> Option<(&'a DeTable<'i>, Range<usize>)> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Table(t) => Some((t, v.span())),
            _ => {
                self.wrong_type(diags, key, v, "a table");
                None
            }
        }
    }

    /// An optional array of tables (`[ { … }, { … } ]`).
    pub(crate) fn tables(&self, diags: &mut Diagnostics, key: &str) -> Option<At<SubTables<'a, 'i>>> {
        let v = self.get(key)?;
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(diags, key, v, "an array of tables");
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items.iter() {
            match item.get_ref() {
                DeValue::Table(t) => out.push((t, item.span())),
                _ => self.wrong_type(diags, key, item, "an array of tables"),
            }
        }
        Some(At::new(out, v.span()))
    }

    /// An optional table of strings (`{ name = "value", … }`), in the
    /// order written.
    pub(crate) fn string_table(&self, diags: &mut Diagnostics, key: &str) -> Option<At<StringTable>> {
        let (t, span) = self.table(diags, key)?;
        let mut out = Vec::with_capacity(t.len());
        for (k, v) in t.iter() {
            match v.get_ref() {
                DeValue::String(s) => {
                    out.push((At::new(k.get_ref().to_string(), k.span()), At::new(s.to_string(), v.span())))
                }
                _ => self.wrong_type(diags, key, v, "a table of strings"),
            }
        }
        Some(At::new(out, span))
    }

    /// Whether the key is present (whatever its type).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

/// Tables with their spans, as in an array of tables.
pub(crate) type SubTables<'a, 'i> = Vec<(&'a DeTable<'i>, Range<usize>)>;

/// A table of strings: each name and value with its span.
pub(crate) type StringTable = Vec<(At<String>, At<String>)>;

/// The tables of an array of tables (`[[pool]]`) at the top level; reports
/// a problem if `key` holds something else.
pub(crate) fn tables<'a, 'i>(
    diags: &mut Diagnostics,
    root: &'a DeTable<'i>,
    key: &str,
) -> Vec<(&'a DeTable<'i>, Range<usize>)> {
    let Some(v) = root.get(key) else {
        return Vec::new();
    };
    let DeValue::Array(items) = v.get_ref() else {
        diags.error(
            v.span(),
            format!("\"{key}\" must be an array of tables, written [[{key}]], found {}", describe(v.get_ref())),
        );
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items.iter() {
        match item.get_ref() {
            DeValue::Table(t) => out.push((t, item.span())),
            other => diags.error(
                item.span(),
                format!("each entry of \"{key}\" must be a table, written [[{key}]], found {}", describe(other)),
            ),
        }
    }
    out
}

/// Parse `IP:PORT` (IPv6 in brackets).
pub(crate) fn parse_addr(text: &str) -> Option<SocketAddr> {
    text.trim().parse().ok()
}

fn describe(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => format!("the string \"{s}\""),
        DeValue::Integer(i) => format!("the integer {}", i.as_str()),
        DeValue::Float(f) => format!("the number {}", f.as_str()),
        DeValue::Boolean(b) => format!("{b}"),
        DeValue::Datetime(d) => format!("the date {d}"),
        DeValue::Array(_) => "an array".to_owned(),
        DeValue::Table(_) => "a table".to_owned(),
    }
}

/// The accepted key closest to `name`, if it is close enough to be a typo.
fn closest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typo_suggestions() {
        assert_eq!(closest("replica", &["id", "replicas", "serves"]), Some("replicas"));
        assert_eq!(closest("max_concurency", &["max_concurrency", "max_queue"]), Some("max_concurrency"));
        assert_eq!(closest("zzzzzz", &["id", "replicas"]), None);
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("127.0.0.1:8080"), Some("127.0.0.1:8080".parse().unwrap_or_else(|_| unreachable!())));
        assert!(parse_addr("[::1]:8443").is_some());
        assert!(parse_addr("localhost:80").is_none());
        assert!(parse_addr("127.0.0.1").is_none());
        assert!(parse_addr("127.0.0.1:99999").is_none());
    }
}
