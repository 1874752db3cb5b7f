//! Where one value sits in an object's JSON bytes: the response rules change an event's
//! text by splicing the new string into the original bytes, so an event is never parsed
//! into a whole value and written again only to change one field (every other byte stays
//! as it came). The dialects' readers note where a text they read was ([`Spanned`]);
//! [`string_span`] finds it by a JSON pointer in one pass that builds nothing when they
//! could not (a text with escapes).

use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// A JSON string read from an object's bytes, with where its characters were when the
/// reader could borrow them (no escapes): their address and length.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Spanned {
    pub text: String,
    at: Option<(usize, usize)>,
}

impl Spanned {
    /// The bytes of the string (quotes included) in `json`, the bytes it was read from;
    /// `None` when it was not borrowed from them.
    pub fn span_in(&self, json: &[u8]) -> Option<Range<usize>> {
        let (addr, len) = self.at?;
        let start = addr.checked_sub(json.as_ptr() as usize)?.checked_sub(1)?;
        let end = start + len + 2;
        let quoted = json.get(start..end)?;
        (quoted.first() == Some(&b'"') && quoted.last() == Some(&b'"')).then_some(start..end)
    }
}

impl<'de> de::Deserialize<'de> for Spanned {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        de.deserialize_str(SpannedVisitor)
    }
}

struct SpannedVisitor;

impl<'de> Visitor<'de> for SpannedVisitor {
    type Value = Spanned;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Spanned, E> {
        Ok(Spanned {
            text: s.to_owned(),
            at: Some((s.as_ptr() as usize, s.len())),
        })
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Spanned, E> {
        Ok(Spanned {
            text: s.to_owned(),
            at: None,
        })
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Spanned, E> {
        Ok(Spanned { text: s, at: None })
    }
}

/// A message's `content` as OpenAI sends it: a string (noted where it was) or another
/// value (content parts).
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(Spanned),
    Other(serde_json::Value),
}

impl<'de> de::Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        de.deserialize_any(ContentVisitor)
    }
}

struct ContentVisitor;

impl<'de> Visitor<'de> for ContentVisitor {
    type Value = Content;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Content, E> {
        SpannedVisitor.visit_borrowed_str(s).map(Content::Text)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Content, E> {
        SpannedVisitor.visit_str(s).map(Content::Text)
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Content, E> {
        SpannedVisitor.visit_string(s).map(Content::Text)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Content, A::Error> {
        let value = de::Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Content::Other(value))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Content, A::Error> {
        let value = de::Deserialize::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(Content::Other(value))
    }
    // Scalars carry no text.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Content, E> {
        Ok(Content::Other(serde_json::Value::Null))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Content, E> {
        Ok(Content::Other(serde_json::Value::Null))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Content, E> {
        Ok(Content::Other(serde_json::Value::Null))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Content, E> {
        Ok(Content::Other(serde_json::Value::Null))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Content, E> {
        Ok(Content::Other(serde_json::Value::Null))
    }
}

/// The bytes of the JSON string at `pointer` (quotes included) in `json`; `None` when
/// the pointer reaches no string, or `json` is not JSON a borrowed read accepts. As in
/// a parsed value, the last of duplicate keys counts.
pub fn string_span(json: &[u8], pointer: &str) -> Option<Range<usize>> {
    let path: Vec<&str> = pointer.split('/').skip(1).collect();
    let mut de = serde_json::Deserializer::from_slice(json);
    let raw = Descend(&path).deserialize(&mut de).ok()??;
    de.end().ok()?;
    let found = raw.get();
    if !found.starts_with('"') {
        return None;
    }
    // The raw value is a slice of `json`: its place is the distance between them.
    let start = (found.as_ptr() as usize).checked_sub(json.as_ptr() as usize)?;
    let end = start + found.len();
    (end <= json.len()).then_some(start..end)
}

/// Follows the rest of a pointer down a value.
struct Descend<'p>(&'p [&'p str]);

impl<'de> DeserializeSeed<'de> for Descend<'_> {
    type Value = Option<&'de RawValue>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        match self.0 {
            [] => <&RawValue as de::Deserialize>::deserialize(de).map(Some),
            _ => de.deserialize_any(self),
        }
    }
}

impl<'de> Visitor<'de> for Descend<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (key, rest) = (self.0[0], &self.0[1..]);
        let mut found = None;
        while let Some(is_key) = map.next_key_seed(KeyIs(&[key]))? {
            if is_key {
                found = map.next_value_seed(Descend(rest))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let index = self.0[0].parse::<usize>().ok();
        let mut found = None;
        let mut i = 0;
        loop {
            if Some(i) == index {
                match seq.next_element_seed(Descend(&self.0[1..]))? {
                    Some(v) => found = v,
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(found)
    }

    // Any other value: the pointer goes nowhere.
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
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Whether an object's key (escapes read) is one of these, without copying it.
pub(crate) struct KeyIs<'k>(pub &'k [&'k str]);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<bool, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(self.0.contains(&key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn at<'a>(json: &'a str, pointer: &str) -> Option<&'a str> {
        string_span(json.as_bytes(), pointer).map(|r| &json[r])
    }

    #[test]
    fn finds_the_string_a_pointer_names() {
        let chunk = r#"{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":"h\"i"},"finish_reason":null}],"x":[1,{"a":2}]}"#;
        assert_eq!(at(chunk, "/choices/0/delta/content"), Some(r#""h\"i""#));
        assert_eq!(at(chunk, "/id"), Some(r#""c""#));
        // Not a string, not there, past the array, into a scalar: none.
        assert_eq!(at(chunk, "/choices/0/index"), None);
        assert_eq!(at(chunk, "/choices/1/delta/content"), None);
        assert_eq!(at(chunk, "/choices/0/delta/content/x"), None);
        assert_eq!(at(chunk, "/nothing"), None);
        assert_eq!(
            at(
                r#"{"message":{"content":"a"},"done":false}"#,
                "/message/content"
            ),
            Some(r#""a""#)
        );
    }

    #[test]
    fn the_last_duplicate_key_counts_as_in_a_parsed_value() {
        let json = r#"{"response":"first","response":"second"}"#;
        assert_eq!(at(json, "/response"), Some(r#""second""#));
        // A key written with an escape is the same key.
        assert_eq!(at(r#"{"res\u0070onse":"e"}"#, "/response"), Some(r#""e""#));
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["response"], "second");
    }

    #[test]
    fn a_read_string_knows_its_place_when_it_was_borrowed() {
        #[derive(serde::Deserialize)]
        struct Line {
            response: Spanned,
        }
        let plain = br#"{"done":false,"response":"two words"}"#;
        let line: Line = serde_json::from_slice(plain).unwrap();
        assert_eq!(line.response.text, "two words");
        let span = line.response.span_in(plain).unwrap();
        assert_eq!(&plain[span], br#""two words""#);
        // Another buffer, an escape (read into a scratch copy), a parsed value: none.
        assert_eq!(line.response.span_in(&plain.clone()), None);
        let escaped = br#"{"response":"a\nb"}"#;
        let line: Line = serde_json::from_slice(escaped).unwrap();
        assert_eq!(
            (line.response.text.as_str(), line.response.span_in(escaped)),
            ("a\nb", None)
        );
        let value = serde_json::json!({"response": "x"});
        let line = Line::deserialize(&value).unwrap();
        assert_eq!(line.response.span_in(plain), None);
    }

    #[test]
    fn not_json_or_trailing_bytes_find_nothing() {
        assert_eq!(at(r#"{"response":"a""#, "/response"), None);
        assert_eq!(at(r#"{"response":"a"} x"#, "/response"), None);
        assert_eq!(at("[", "/0"), None);
    }
}
