//! Finding the service in a JSON request body (OpenAI style: the `model`
//! field). Reads one top-level string field and skips everything else
//! without building a tree, so a large prompt costs one pass and no
//! allocation beyond the field itself.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

/// Why the field could not be taken from the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyFieldError {
    /// The body is not a JSON object.
    #[error("the request body is not a JSON object: {0}")]
    NotJson(String),
    /// The object has no such field.
    #[error("the JSON body has no \"{0}\" field")]
    Missing(String),
    /// The field is there but is not a string.
    #[error("the \"{0}\" field of the JSON body must be a string")]
    NotString(String),
    /// The field is there twice at the top level: servers disagree about
    /// which one counts (Python's json keeps the last), so neither does.
    #[error("the JSON body has the \"{0}\" field more than once; send it once")]
    Duplicate(String),
}

/// The value of the top-level string field `field` of the JSON object in `body`.
///
/// The body must be UTF-8 and a JSON object; values other than the field
/// are skipped without further checks (an escaped lone surrogate, a number
/// beyond f64 or very deep nesting are JSON by its grammar and pass: the
/// replica judges them).
pub fn extract_field(body: &[u8], field: &str) -> Result<String, BodyFieldError> {
    if let Err(e) = std::str::from_utf8(body) {
        return Err(BodyFieldError::NotJson(format!("it is not UTF-8 (invalid byte at offset {})", e.valid_up_to())));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let not_json = |e: serde_json::Error| BodyFieldError::NotJson(e.to_string());
    let found = FieldSeed { field }.deserialize(&mut de).map_err(not_json)?;
    de.end().map_err(not_json)?;
    match found {
        Found::String(s) => Ok(s),
        Found::NotString => Err(BodyFieldError::NotString(field.to_owned())),
        Found::Duplicate => Err(BodyFieldError::Duplicate(field.to_owned())),
        Found::Missing => Err(BodyFieldError::Missing(field.to_owned())),
    }
}

enum Found {
    String(String),
    NotString,
    Missing,
    Duplicate,
}

struct FieldSeed<'f> {
    field: &'f str,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Found;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Found, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        let mut found = Found::Missing;
        while let Some(is_wanted) = map.next_key_seed(KeyIs { field: self.field })? {
            if is_wanted && matches!(found, Found::Missing) {
                found = match map.next_value::<StringOnly>()?.0 {
                    Some(s) => Found::String(s),
                    None => Found::NotString,
                };
            } else if is_wanted {
                // The rest is still read: a body that is not JSON says so first.
                found = Found::Duplicate;
                map.next_value::<IgnoredAny>()?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// A map key, compared against the wanted field without being kept.
struct KeyIs<'f> {
    field: &'f str,
}

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.field)
    }
}

/// A value that is a string (`Some`) or anything else (`None`), fully consumed.
struct StringOnly(Option<String>);

impl<'de> de::Deserialize<'de> for StringOnly {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Option<String>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Some(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(None)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(None)
            }
        }
        d.deserialize_any(V).map(StringOnly)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_model() {
        let body =
            br#"{"messages":[{"role":"user","content":"hi \"model\": x"}],"model":"llama-3.1-8b","stream":true}"#;
        assert_eq!(extract_field(body, "model"), Ok("llama-3.1-8b".to_owned()));
    }

    #[test]
    fn nested_model_fields_do_not_count() {
        let body = br#"{"metadata":{"model":"evil"},"model":"good"}"#;
        assert_eq!(extract_field(body, "model"), Ok("good".to_owned()));
        let body = br#"{"metadata":{"model":"evil"}}"#;
        assert_eq!(extract_field(body, "model"), Err(BodyFieldError::Missing("model".into())));
    }

    #[test]
    fn a_field_given_twice_is_refused() {
        // Placed as "a" here, served as "b" by a Python server: neither.
        let dup = Err(BodyFieldError::Duplicate("model".into()));
        assert_eq!(extract_field(br#"{"model":"a","model":"b"}"#, "model"), dup);
        assert_eq!(extract_field(br#"{"model":"a","x":1,"mod\u0065l":"b"}"#, "model"), dup);
        assert_eq!(extract_field(br#"{"model":"a","model":3}"#, "model"), dup);
        // Nested duplicates are the replica's business.
        assert_eq!(extract_field(br#"{"model":"a","m":{"model":1,"model":2}}"#, "model"), Ok("a".to_owned()));
        assert!(matches!(extract_field(br#"{"model":"a","model":"b"} x"#, "model"), Err(BodyFieldError::NotJson(_))));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(matches!(extract_field(b"not json", "model"), Err(BodyFieldError::NotJson(_))));
        assert!(matches!(extract_field(b"[1,2]", "model"), Err(BodyFieldError::NotJson(_))));
        assert!(matches!(extract_field(b"{\"model\":\"a\"} trailing", "model"), Err(BodyFieldError::NotJson(_))));
        assert!(matches!(extract_field(b"{\"model\":", "model"), Err(BodyFieldError::NotJson(_))));
        assert_eq!(extract_field(b"{\"model\":3}", "model"), Err(BodyFieldError::NotString("model".into())));
        assert_eq!(extract_field(b"{\"model\":null}", "model"), Err(BodyFieldError::NotString("model".into())));
        assert_eq!(extract_field(b"{}", "model"), Err(BodyFieldError::Missing("model".into())));
    }

    #[test]
    fn escaped_keys_and_values() {
        let body = br#"{"mod\u0065l":"caf\u00e9"}"#;
        assert_eq!(extract_field(body, "model"), Ok("café".to_owned()));
    }

    #[test]
    fn invalid_utf8_anywhere_is_not_json() {
        let body = b"{\"model\":\"a\",\"prompt\":\"\x91\"}";
        assert!(matches!(extract_field(body, "model"), Err(BodyFieldError::NotJson(m)) if m.contains("UTF-8")));
    }

    #[test]
    fn other_field_names() {
        assert_eq!(extract_field(br#"{"deployment":"x","model":"y"}"#, "deployment"), Ok("x".to_owned()));
    }
}
