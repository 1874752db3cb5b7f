//! One response object (a whole body, an SSE event's data, an NDJSON line) read once, in
//! its endpoint's dialect: what it reports ([`Observation`]: model, usage, text,
//! finish reason, error) and, when the gateway may rewrite the frame, the parsed object
//! itself, so that hiding usage, the response rules and a budget cut all work on that
//! one parse. Where each dialect carries its generated text is decided here, by
//! endpoint.

use std::borrow::Cow;
use std::ops::Range;

use serde_json::Value;

use super::{ollama, openai, Dialect, Endpoint, Observation};

/// Reads what one object reports, from its bytes (frames nobody rewrites). Bytes that
/// are not UTF-8 read as U+FFFD, as in [`StreamEvent::parse`].
pub fn observe(endpoint: Endpoint, json: &[u8]) -> Option<Observation> {
    observe_spanned(endpoint, json).map(|(obs, _)| obs)
}

/// [`observe`], and where the generated text is in `json` when the dialect's reader saw
/// it (never for bytes read again as UTF-8: they are not `json`'s).
fn observe_spanned(endpoint: Endpoint, json: &[u8]) -> Option<(Observation, Option<Range<usize>>)> {
    let read = |json: &[u8]| match endpoint.dialect() {
        Dialect::OpenAi => openai::observe_spanned(endpoint, json),
        Dialect::Ollama => ollama::observe_spanned(endpoint, json),
    };
    read(json).or_else(|| match String::from_utf8_lossy(json) {
        Cow::Owned(text) => read(text.as_bytes()).map(|(obs, _)| (obs, None)),
        Cow::Borrowed(_) => None,
    })
}

/// A frame's object: what it reports, read once from its bytes, and the parsed object
/// itself, made only when the gateway rewrites the frame (most frames pass as they came:
/// a typed read of the few fields it reports costs a fraction of a whole parse).
#[derive(Debug, Clone)]
pub struct StreamEvent<'a> {
    endpoint: Endpoint,
    json: &'a [u8],
    pub obs: Observation,
    /// Where the generated text is in `json`, when the reader saw it.
    text_span: Option<Range<usize>>,
    /// The parsed object, once asked for (boxed: an event is moved a few times on its
    /// way through the meter, and most are never parsed).
    value: Option<Box<Value>>,
}

impl<'a> StreamEvent<'a> {
    /// Reads one object; `None` when it is not JSON. JSON of another shape than its
    /// dialect's reports nothing, but rules still see (and may rewrite) its texts.
    ///
    /// Bytes that are not UTF-8 read as U+FFFD, as in [`observe`]: a frame reports the
    /// same whether or not the gateway may rewrite it (a byte serde_json skips unchecked
    /// in an ignored field, say an `id`, made [`observe`] count a usage chunk the parse
    /// into a value did not, which then reached a client that had not asked for it).
    /// Likewise a number too large for an `f64` (`1e400`) reads as `null`.
    pub fn parse(endpoint: Endpoint, json: &'a [u8]) -> Option<Self> {
        // Read as `observe` reads, bytes that are not UTF-8 included (then the text's
        // place is found again if a rewrite needs it).
        if let Some((obs, text_span)) = observe_spanned(endpoint, json) {
            // Whatever `observe` reads, the value parse reads too, with the same report
            // (the usage_extraction fuzz target holds both to it).
            return Some(Self {
                endpoint,
                json,
                obs,
                text_span,
                value: None,
            });
        }
        let value = parse_value(json)?;
        let obs = observe_value(endpoint, &value).unwrap_or_default();
        Some(Self {
            endpoint,
            json,
            obs,
            text_span: None,
            value: Some(Box::new(value)),
        })
    }

    /// An object already read (by its stream's [`super::shape::ShapeReader`]): what it
    /// reports, and where its text is.
    #[inline]
    pub(super) fn read(
        endpoint: Endpoint,
        json: &'a [u8],
        obs: Observation,
        text_span: Option<Range<usize>>,
    ) -> Self {
        Self {
            endpoint,
            json,
            obs,
            text_span,
            value: None,
        }
    }

    /// Whether the dialect's typed reader read it (not the lenient parse into a value).
    pub(super) fn read_by_type(&self) -> bool {
        self.value.is_none()
    }

    /// The parsed object (parsed on first use), to read or change in place.
    pub fn value(&mut self) -> &mut Value {
        let json = self.json;
        self.value.get_or_insert_with(|| {
            Box::new(parse_value(json).unwrap_or_else(|| {
                // Not reached while `observe` and the value parse agree (see `parse`); if
                // they ever did not, a rewrite carries no text rather than the old one.
                tracing::error!("internal: an observed event failed to parse; rewritten empty");
                Value::Object(serde_json::Map::new())
            }))
        })
    }

    /// What the object reports when parsed into a value (`None`: it does not parse, or
    /// reports nothing): for checks that it reads as [`StreamEvent::obs`] does.
    pub fn reread(&self) -> Option<Observation> {
        match &self.value {
            Some(v) => observe_value(self.endpoint, v),
            None => observe_value(self.endpoint, &parse_value(self.json)?),
        }
    }

    /// The object's bytes.
    pub fn json(&self) -> &'a [u8] {
        self.json
    }

    /// Where the generated text is in [`StreamEvent::json`]: the bytes of the JSON string
    /// at its endpoint's place for it; `None` when no string is there.
    pub fn text_span(&self) -> Option<Range<usize>> {
        self.text_span
            .clone()
            .or_else(|| super::span::string_span(self.json, text_pointer(self.endpoint)))
    }

    /// The object's `type` (Responses API events).
    pub fn kind(&mut self) -> Option<&str> {
        self.value().get("type").and_then(Value::as_str)
    }
}

fn observe_value(endpoint: Endpoint, value: &Value) -> Option<Observation> {
    match endpoint.dialect() {
        Dialect::OpenAi => openai::observe_value(endpoint, value),
        Dialect::Ollama => ollama::observe_value(endpoint, value),
    }
}

/// Parses an object into a value, with the leniency serde_json shows a typed read that
/// skips a field: bytes that are not UTF-8, and `\u` escapes of lone surrogates, read as
/// U+FFFD, numbers out of range as null (only on the failure path: valid JSON is parsed
/// once).
fn parse_value(json: &[u8]) -> Option<Value> {
    if let Ok(v) = serde_json::from_slice(json) {
        return Some(v);
    }
    let text = String::from_utf8_lossy(json);
    let fixed = without_lone_surrogates(&text);
    let numbers = without_overflowing_numbers(&fixed);
    let unchanged = |c: &Cow<'_, str>| matches!(c, Cow::Borrowed(_));
    if unchanged(&text) && unchanged(&fixed) && unchanged(&numbers) {
        return None;
    }
    serde_json::from_str(&numbers).ok()
}

/// `text` with each `\u` escape of a lone surrogate (a high one not followed by a low
/// one, or a low one alone) written as `\uFFFD`; borrowed when there is none.
fn without_lone_surrogates(text: &str) -> Cow<'_, str> {
    let hex = |at: usize| {
        text.get(at..at + 4)
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i + 1 < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        if bytes[i + 1] != b'u' {
            i += 2; // an escaped character (`\\` included): never the start of another
            continue;
        }
        let Some(unit) = hex(i + 2) else {
            i += 2;
            continue;
        };
        let low_follows = || {
            text.get(i + 6..i + 8) == Some("\\u")
                && hex(i + 8).is_some_and(|u| (0xDC00..=0xDFFF).contains(&u))
        };
        let lone = match unit {
            0xD800..=0xDBFF => !low_follows(),
            0xDC00..=0xDFFF => true,
            _ => false,
        };
        if (0xD800..=0xDBFF).contains(&unit) && !lone {
            i += 12; // the pair
            continue;
        }
        if lone {
            let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
            o.push_str(&text[copied..i]);
            o.push_str("\\uFFFD");
            copied = i + 6;
        }
        i += 6;
    }
    match out {
        Some(mut o) => {
            o.push_str(&text[copied..]);
            Cow::Owned(o)
        }
        None => Cow::Borrowed(text),
    }
}

/// `text` with each number outside strings that an `f64` cannot hold (it reads as
/// infinite: `1e400`) written as `null`; borrowed when there is none. serde_json refuses
/// such a number in a value but skips it unchecked in a field a typed read ignores.
fn without_overflowing_numbers(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 1, // the escaped byte is never a closing quote
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        if b != b'-' && !b.is_ascii_digit() {
            i += 1;
            continue;
        }
        let end = bytes[i..]
            .iter()
            .position(|c| !matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
            .map_or(bytes.len(), |n| i + n);
        if text[i..end].parse::<f64>().is_ok_and(f64::is_infinite) {
            let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
            o.push_str(&text[copied..i]);
            o.push_str("null");
            copied = end;
        }
        i = end;
    }
    match out {
        Some(mut o) => {
            o.push_str(&text[copied..]);
            Cow::Owned(o)
        }
        None => Cow::Borrowed(text),
    }
}

/// Where a stream event of `endpoint` carries its generated text (a JSON pointer).
pub fn text_pointer(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions => "/choices/0/delta/content",
        Endpoint::Completions => "/choices/0/text",
        Endpoint::Responses => "/delta",
        Endpoint::Chat => "/message/content",
        Endpoint::Generate => "/response",
        // Embeddings generate no text.
        Endpoint::Embeddings | Endpoint::Embed | Endpoint::LegacyEmbeddings => "/response",
    }
}

#[cfg(test)]
mod surrogates {
    use super::*;

    #[test]
    fn lone_surrogate_escapes_read_as_replacement_characters() {
        let fixed = |t: &str| without_lone_surrogates(t).into_owned();
        assert_eq!(fixed(r#""a\ud83db""#), r#""a\uFFFDb""#);
        assert_eq!(fixed(r#""\udc00""#), r#""\uFFFD""#);
        // A pair, an escaped backslash before a `u`, and plain text stay as they are.
        for kept in [r#""\ud83d\ude00""#, r#""\\ud83d""#, r#""plain \n text""#] {
            assert!(
                matches!(without_lone_surrogates(kept), Cow::Borrowed(_)),
                "{kept}"
            );
        }
        // The fuzzer's case: an ignored key with a lone surrogate; observe() skipped it
        // unchecked, the parse into a value refused it.
        let body = br#"{"object":"list","data":[],"model":"e","usagn":{"prompt_toOk\ud83dTudep0l_toiens":5}}"#;
        let ev = StreamEvent::parse(Endpoint::Embeddings, body).expect("parsed");
        assert_eq!(ev.reread(), crate::api::observe(Endpoint::Embeddings, body));
        // As found: with a byte that is not UTF-8 in the same key.
        let found = [&body[..53], &[0x93], &body[53..]].concat();
        let ev = StreamEvent::parse(Endpoint::Embeddings, &found).expect("parsed");
        assert_eq!(
            ev.reread(),
            crate::api::observe(Endpoint::Embeddings, &found)
        );
    }
}

#[cfg(test)]
mod overflowing_numbers {
    use super::*;

    #[test]
    fn numbers_an_f64_cannot_hold_read_as_null() {
        let fixed = |t: &str| without_overflowing_numbers(t).into_owned();
        assert_eq!(
            fixed(r#"{"a":1e400,"b":-2E+999}"#),
            r#"{"a":null,"b":null}"#
        );
        // In range (underflow included), inside strings, and escaped quotes stay.
        for kept in [
            r#"{"a":1e308,"b":1e-400,"c":-0.5}"#,
            r#"{"a":"1e400","b\"1e400":2}"#,
            r#"[12345678901234567890123, "x\\", 3]"#,
        ] {
            assert!(
                matches!(without_overflowing_numbers(kept), Cow::Borrowed(_)),
                "{kept}"
            );
        }
    }

    #[test]
    fn an_ignored_number_out_of_range_reads_as_observe_reads_it() {
        // The fuzzer's input (usage_extraction, 10 M run): observe() skipped the number
        // in an ignored key unchecked; the parse into a value refused the object.
        let usage = br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7},"x":66666661e36666666666666666666666664}"#;
        let observed = crate::api::observe(Endpoint::ChatCompletions, usage).expect("observed");
        assert_eq!(observed.usage.output, Some(4));
        let mut ev = StreamEvent::parse(Endpoint::ChatCompletions, usage).expect("parsed");
        assert_eq!(ev.reread(), Some(observed));
        assert_eq!(ev.value()["x"], Value::Null);
        // As found: an ignored key with bytes that are not UTF-8, the number after it.
        let found = b"{\"m\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xffq\":66666661e36666666666666666666666664}";
        let observed = crate::api::observe(Endpoint::Chat, found).expect("observed");
        let ev = StreamEvent::parse(Endpoint::Chat, found).expect("parsed");
        assert_eq!(ev.reread(), Some(observed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parsed_event_reports_what_its_bytes_do() {
        let cases: [(Endpoint, &[u8]); 4] = [
            (
                Endpoint::ChatCompletions,
                br#"{"model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
            ),
            (
                Endpoint::Responses,
                br#"{"type":"response.output_text.delta","delta":"ab"}"#,
            ),
            (
                Endpoint::Chat,
                br#"{"model":"m","message":{"content":"x"},"done":true,"eval_count":2}"#,
            ),
            (Endpoint::Generate, br#"{"response":"y","done":false}"#),
        ];
        for (endpoint, json) in cases {
            let mut ev = StreamEvent::parse(endpoint, json).unwrap();
            assert_eq!(ev.reread(), observe(endpoint, json), "{endpoint:?}");
            assert_eq!(Some(ev.obs.clone()), observe(endpoint, json));
            let expected = ev.obs.text.clone();
            let text = ev
                .value()
                .pointer(text_pointer(endpoint))
                .and_then(Value::as_str);
            assert_eq!(text, Some(expected.as_str()), "{endpoint:?}");
        }
        assert!(StreamEvent::parse(Endpoint::Chat, b"not json").is_none());
    }
}
