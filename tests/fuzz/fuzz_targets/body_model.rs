//! The body field extractor against serde_json's own parser: any body and
//! field name, never a panic, and the same answer as a full parse.
//!
//! Input: a first byte below 0x80 means the field is `model` and the rest
//! is the body; otherwise its low four bits are the length of a field name
//! that follows, then the body.
//!
//! By design the extractor does not judge values it skips beyond the JSON
//! grammar, so it answers for some bodies that serde_json's stricter parser
//! refuses: an unpaired surrogate escape in a skipped string, a number
//! beyond f64, nesting deeper than 128 (see `router/src/body.rs`). Invalid
//! UTF-8 anywhere is refused (an earlier finding of this target).

#![no_main]

use std::fmt;

use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use stoke_router::proxy::body::{extract_field, BodyFieldError};

/// The top-level entries of a JSON object, in order, duplicates kept
/// (`serde_json::Value` keeps the last of duplicate keys; the extractor
/// takes the first).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// serde_json's complaints about a skipped value that is JSON by the
/// grammar: let through (see the module docs).
const SKIPPED_VALUE_ERRORS: &[&str] = &[
    // `\ud800` not followed by a low surrogate, or a low one alone.
    "unexpected end of hex escape",
    "lone leading surrogate in hex escape",
    // A number beyond f64, such as 1e400.
    "number out of range",
    // Arrays or objects nested more than 128 deep.
    "recursion limit exceeded",
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let (field, body) = if first < 0x80 {
        ("model", rest)
    } else {
        let n = usize::from(first & 0x0f).min(rest.len());
        let Ok(field) = std::str::from_utf8(&rest[..n]) else { return };
        (field, &rest[n..])
    };

    let got = extract_field(body, field);

    match serde_json::from_slice::<Entries>(body) {
        Ok(Entries(entries)) => {
            let times = entries.iter().filter(|(k, _)| k == field).count();
            let expected = match entries.iter().find(|(k, _)| k == field).map(|(_, v)| v) {
                Some(_) if times > 1 => Err(BodyFieldError::Duplicate(field.to_owned())),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(BodyFieldError::NotString(field.to_owned())),
                None => Err(BodyFieldError::Missing(field.to_owned())),
            };
            assert_eq!(got, expected, "field {field:?} of {:?}", String::from_utf8_lossy(body));
            if let Ok(s) = &got {
                let value: Value = serde_json::from_slice(body).expect("serde_json parsed it as entries");
                assert!(value.is_object());
                if entries.iter().filter(|(k, _)| k == field).count() == 1 {
                    assert_eq!(value[field].as_str(), Some(s.as_str()));
                }
            }
        }
        Err(e) if std::str::from_utf8(body).is_ok() && SKIPPED_VALUE_ERRORS.iter().any(|known| e.to_string().contains(known)) => {}
        Err(e) => {
            assert!(
                matches!(got, Err(BodyFieldError::NotJson(_))),
                "extract_field({field:?}) = {got:?} for a body serde_json refuses ({e}): {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
});
