//! A JSON object read as spans of its bytes, and written back by splicing: a request is
//! read once, its members noted where they are (nothing copied), and a changed body is
//! the original bytes with the changed values put in their place.

use std::ops::Range;

use memchr::{memchr, memchr2};
use serde::de::{self, Deserializer as _, MapAccess, Visitor};
use serde_json::value::RawValue;

/// One member of an object: where its key and value are in the object's bytes.
#[derive(Debug, Clone)]
pub(super) struct Member {
    /// The key, quotes included.
    key: Range<usize>,
    /// The value as written.
    pub value: Range<usize>,
    /// The key's name when it has escapes; else the bytes between its quotes are its name.
    escaped: Option<Box<str>>,
    /// The last member of this name: the one every reader takes.
    winner: usize,
    /// Whether an earlier member has this name.
    repeat: bool,
}

/// An object's members in their order, duplicates included.
#[derive(Debug, Clone, Default)]
pub(super) struct Object {
    members: Vec<Member>,
    /// Where its closing brace is.
    close: usize,
    /// Whether some name occurs more than once.
    repeats: bool,
}

/// Reads some members' values itself, in the same pass (the prompt's texts); the others
/// are taken as raw JSON.
pub(super) trait Values<'de> {
    /// Reads the value of member `name`, which starts at byte `start`, from `map` if it
    /// wants it; false leaves it to be skipped.
    fn read<A: MapAccess<'de>>(
        &mut self,
        name: &[u8],
        start: usize,
        map: &mut A,
    ) -> Result<bool, A::Error>;
}

/// Reads no value itself.
pub(super) struct Raw;

impl<'de> Values<'de> for Raw {
    fn read<A: MapAccess<'de>>(&mut self, _: &[u8], _: usize, _: &mut A) -> Result<bool, A::Error> {
        Ok(false)
    }
}

impl Object {
    /// Reads `body`, a JSON object, with `values` reading what it wants of it.
    pub fn read<'de, V: Values<'de>>(
        body: &'de [u8],
        values: &mut V,
    ) -> Result<Object, serde_json::Error> {
        // A body that is UTF-8 throughout, as JSON text must be, is read as text: checked
        // once, in one SIMD pass, its strings are not checked again one by one. Another
        // is read as bytes, for serde_json's error naming where the bad bytes are.
        match simdutf8::basic::from_utf8(body) {
            Ok(text) => Self::read_from(serde_json::Deserializer::from_str(text), body, values),
            Err(_) => Self::read_from(serde_json::Deserializer::from_slice(body), body, values),
        }
    }

    fn read_from<'de, R: serde_json::de::Read<'de>, V: Values<'de>>(
        mut de: serde_json::Deserializer<R>,
        body: &'de [u8],
        values: &mut V,
    ) -> Result<Object, serde_json::Error> {
        let mut object = de.deserialize_map(ObjectVisitor { body, values })?;
        de.end()?;
        // A value read by `values` has no known end until what follows it is found.
        object.close = trim_end(body, body.len()).saturating_sub(1);
        if let Some(last) = object.members.last_mut() {
            if last.value.end == usize::MAX {
                last.value.end = trim_end(body, object.close);
            }
        }
        object.link_names(body);
        Ok(object)
    }

    /// The member of this name a reader takes: the last.
    pub fn get(&self, body: &[u8], name: &str) -> Option<&Member> {
        self.members
            .iter()
            .rev()
            .find(|m| m.name(body) == name.as_bytes())
    }

    /// Notes, for every member, the last of its name and whether it repeats one.
    fn link_names(&mut self, body: &[u8]) {
        let n = self.members.len();
        for (i, m) in self.members.iter_mut().enumerate() {
            m.winner = i;
        }
        if n < 2 {
            return;
        }
        let mut order: Vec<usize> = (0..n).collect();
        let members = &self.members;
        order.sort_by(|&a, &b| {
            let (x, y) = (members[a].name(body), members[b].name(body));
            x.cmp(y).then(a.cmp(&b))
        });
        let mut at = 0;
        while at < n {
            let name = self.members[order[at]].name(body);
            let end = at
                + order[at..]
                    .iter()
                    .take_while(|&&i| self.members[i].name(body) == name)
                    .count();
            let last = order[end - 1];
            for (k, &i) in order[at..end].iter().enumerate() {
                self.members[i].winner = last;
                self.members[i].repeat = k > 0;
            }
            self.repeats |= end - at > 1;
            at = end;
        }
    }

    /// The object's bytes with `splices` applied and `added` members (name, JSON value)
    /// put last. When a name occurs more than once the object is written anew: one member
    /// a name, at its first place, with the last value (the one the gateway read), so an
    /// upstream that takes the first of duplicates reads what the gateway decided on.
    pub fn write(&self, body: &[u8], splices: &Splices, added: &[(&str, String)]) -> Vec<u8> {
        let extra: usize = added.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
        let mut out = Vec::with_capacity(splices.len_after(body.len()) + extra);
        let mut first = true;
        if self.repeats {
            out.push(b'{');
            for m in self.members.iter().filter(|m| !m.repeat) {
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(&body[m.key.clone()]);
                out.push(b':');
                splices.write(body, self.members[m.winner].value.clone(), &mut out);
            }
        } else {
            splices.write(body, 0..self.close, &mut out);
            first = self.members.is_empty();
        }
        for (name, value) in added {
            if !first {
                out.push(b',');
            }
            first = false;
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(value.as_bytes());
        }
        if self.repeats {
            out.push(b'}');
        } else {
            out.extend_from_slice(&body[self.close..]);
        }
        out
    }
}

impl Member {
    /// The member's name, unescaped.
    fn name<'a>(&'a self, body: &'a [u8]) -> &'a [u8] {
        match &self.escaped {
            Some(name) => name.as_bytes(),
            None => &body[self.key.start + 1..self.key.end - 1],
        }
    }
}

/// The value of member `name` (the last of that name) of the JSON object `json`; `None`
/// when `json` is not an object or has no such member.
pub(super) fn member<'a>(json: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let object = Object::read(json, &mut Raw).ok()?;
    object.get(json, name).map(|m| &json[m.value.clone()])
}

/// Whether member `name` of the object `json` occurs more than once.
pub(super) fn repeated(json: &[u8], name: &str) -> bool {
    Object::read(json, &mut Raw).is_ok_and(|o| {
        o.members
            .iter()
            .filter(|m| m.name(json) == name.as_bytes())
            .nth(1)
            .is_some()
    })
}

/// The JSON object `json` with member `name` set to `value` (JSON): replaced where it is,
/// else added last; an object of that member alone when `json` is not an object.
pub(super) fn with_member(json: &[u8], name: &'static str, value: String) -> String {
    let Ok(object) = Object::read(json, &mut Raw) else {
        return format!("{{\"{name}\":{value}}}");
    };
    let mut splices = Splices::default();
    let mut added = Vec::new();
    match object.get(json, name) {
        Some(m) => splices.replace(m.value.clone(), value),
        None => added.push((name, value)),
    }
    // Spliced from valid UTF-8 at value boundaries: valid UTF-8.
    String::from_utf8(object.write(json, &splices, &added))
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Replacements of byte ranges of a body by new JSON text, in the order of the body.
#[derive(Debug, Clone, Default)]
pub(super) struct Splices {
    edits: Vec<(Range<usize>, String)>,
}

impl Splices {
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    /// Replaces `at` (not empty) by `json`; replacements inside `at` are dropped with
    /// what they replaced.
    pub fn replace(&mut self, at: Range<usize>, json: String) {
        debug_assert!(at.start < at.end);
        self.edits
            .retain(|(r, _)| r.end <= at.start || r.start >= at.end);
        let i = self.edits.partition_point(|(r, _)| r.start < at.start);
        self.edits.insert(i, (at, json));
    }

    /// The replacements inside `range`.
    fn within(&self, range: &Range<usize>) -> &[(Range<usize>, String)] {
        let from = self.edits.partition_point(|(r, _)| r.start < range.start);
        let to = from + self.edits[from..].partition_point(|(r, _)| r.end <= range.end);
        &self.edits[from..to]
    }

    /// The replacement of exactly `range`, if there is one.
    pub fn exact(&self, range: &Range<usize>) -> Option<&str> {
        match self.within(range) {
            [(r, json)] if r == range => Some(json),
            _ => None,
        }
    }

    /// Whether anything inside `range` is replaced.
    pub fn touch(&self, range: &Range<usize>) -> bool {
        !self.within(range).is_empty()
    }

    /// How long a body of `len` bytes is with the replacements.
    fn len_after(&self, len: usize) -> usize {
        let (removed, added) = self
            .edits
            .iter()
            .fold((0, 0), |(r, a), (at, json)| (r + at.len(), a + json.len()));
        (len + added).saturating_sub(removed)
    }

    /// Appends `body[range]` with the replacements inside it to `out`.
    pub fn write(&self, body: &[u8], range: Range<usize>, out: &mut Vec<u8>) {
        let mut at = range.start;
        for (r, json) in self.within(&range) {
            out.extend_from_slice(&body[at..r.start]);
            out.extend_from_slice(json.as_bytes());
            at = r.end;
        }
        out.extend_from_slice(&body[at..range.end]);
    }
}

/// JSON whitespace.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// `end` moved back over the whitespace before it.
fn trim_end(body: &[u8], mut end: usize) -> usize {
    while end > 0 && is_space(body[end - 1]) {
        end -= 1;
    }
    end
}

/// Where the value after a key ending at `key_end` starts: past `:` and whitespace.
fn value_start(body: &[u8], mut at: usize) -> usize {
    while at < body.len() && (is_space(body[at]) || body[at] == b':') {
        at += 1;
    }
    at
}

/// Where `s`, a slice of `body`, is in it.
pub(super) fn span_of(body: &[u8], s: &str) -> Option<Range<usize>> {
    let start = (s.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(s.len())?;
    (end <= body.len()).then_some(start..end)
}

/// Where the string token that starts at or after `from` is, quotes included: for a
/// string whose characters serde_json handed over decoded (it had escapes), when every
/// string token before `from` has been accounted for.
pub(super) fn next_string(body: &[u8], from: usize) -> Option<Range<usize>> {
    let start = from + memchr(b'"', body.get(from..)?)?;
    let mut at = start + 1;
    loop {
        at += memchr2(b'"', b'\\', body.get(at..)?)?;
        match body[at] {
            b'\\' => at += 2,
            _ => return Some(start..at + 1),
        }
    }
}

struct ObjectVisitor<'a, 'de, V> {
    body: &'de [u8],
    values: &'a mut V,
}

impl<'de, V: Values<'de>> Visitor<'de> for ObjectVisitor<'_, 'de, V> {
    type Value = Object;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object, A::Error> {
        use de::Error as _;
        let body = self.body;
        let mut members: Vec<Member> = Vec::new();
        while let Some(key) = map.next_key::<&'de RawValue>()? {
            let key = span_of(body, key.get())
                .ok_or_else(|| A::Error::custom("internal: key not read from the body"))?;
            if let Some(open) = members.last_mut().filter(|m| m.value.end == usize::MAX) {
                // Back from this key over whitespace, the comma and whitespace.
                let comma = trim_end(body, key.start);
                open.value.end = trim_end(body, comma.saturating_sub(1));
            }
            let inner = &body[key.start + 1..key.end - 1];
            let escaped = match memchr(b'\\', inner) {
                None => None,
                Some(_) => Some(
                    serde_json::from_slice::<String>(&body[key.clone()])
                        .map_err(A::Error::custom)?
                        .into_boxed_str(),
                ),
            };
            let name = escaped.as_deref().map_or(inner, str::as_bytes);
            let start = value_start(body, key.end);
            let value = if self.values.read(name, start, &mut map)? {
                start..usize::MAX
            } else {
                let raw = map.next_value::<&'de RawValue>()?;
                span_of(body, raw.get())
                    .ok_or_else(|| A::Error::custom("internal: value not read from the body"))?
            };
            members.push(Member {
                key,
                value,
                escaped,
                winner: 0,
                repeat: false,
            });
        }
        Ok(Object {
            members,
            close: 0,
            repeats: false,
        })
    }
}
