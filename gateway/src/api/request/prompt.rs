//! The texts of a prompt and where they are, found in the one pass that reads the body:
//! a string prompt, a message's `content`, a content part's `text`, each with the role
//! that wrote it. The policy reads them, the estimates count them, and a replaced text is
//! spliced over its string's bytes; no value of the prompt is built.

use std::ops::Range;

use kube_gateway_policy::Role;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::object::{next_string, span_of, Values};

/// One text of the prompt.
#[derive(Debug, Clone)]
pub(super) struct Text {
    /// Its JSON string in the body, quotes included.
    pub span: Range<usize>,
    /// `None` while the walk has not yet reached the `role` of its message.
    role: Option<Role>,
    /// Its text when that is not the bytes between the quotes: it had escapes, or it was
    /// replaced.
    pub owned: Option<String>,
    /// Whether it is in a system message of a message list.
    pub system_message: bool,
}

impl Text {
    pub fn role(&self) -> Role {
        self.role.unwrap_or(Role::User)
    }
}

/// The texts of one prompt field.
#[derive(Debug, Clone, Default)]
pub(super) struct Field {
    pub texts: Vec<Text>,
    /// When the field is a list (of messages): how many items, how many of them system.
    pub list: Option<(u64, u64)>,
}

/// Reads the prompt fields of an endpoint while the body is read: `slots` names them
/// with the role of their bare strings; `fields` gets their texts, in the same order.
pub(super) struct Prompts<'de> {
    body: &'de [u8],
    slots: &'static [(&'static str, Role)],
    pub fields: [Field; 2],
}

impl<'de> Prompts<'de> {
    pub fn new(body: &'de [u8], slots: &'static [(&'static str, Role)]) -> Self {
        Prompts {
            body,
            slots,
            fields: Default::default(),
        }
    }
}

impl<'de> Values<'de> for Prompts<'de> {
    fn read<A: MapAccess<'de>>(
        &mut self,
        name: &[u8],
        start: usize,
        map: &mut A,
    ) -> Result<bool, A::Error> {
        let Some(i) = self.slots.iter().position(|(n, _)| n.as_bytes() == name) else {
            return Ok(false);
        };
        let mut walk = Walk::new(self.body, start);
        let list = map.next_value_seed(Seed {
            walk: &mut walk,
            role: Some(self.slots[i].1),
            top: true,
        })?;
        // A later member of the same name is the one read: it replaces an earlier's texts.
        self.fields[i] = walk.field(list.list, self.slots[i].1);
        Ok(true)
    }
}

/// Reads the texts of the prompt value at `range` of `body` on its own; for a body
/// read first without its prompt (see `LlmRequest::parse`).
pub(super) fn read(
    body: &[u8],
    range: Range<usize>,
    role: Role,
) -> Result<Field, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(&body[range.clone()]);
    let mut walk = Walk::new(body, range.start);
    let walked = Seed {
        walk: &mut walk,
        role: Some(role),
        top: true,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(walk.field(walked.list, role))
}

/// The state of one walk over a prompt value.
struct Walk<'de> {
    body: &'de [u8],
    /// Every string token before it has been seen: where a string serde_json decoded
    /// (one with escapes) starts is the next quote from here.
    cursor: usize,
    texts: Vec<Text>,
}

impl<'de> Walk<'de> {
    fn new(body: &'de [u8], cursor: usize) -> Self {
        Walk {
            body,
            cursor,
            texts: Vec::new(),
        }
    }

    fn field(mut self, list: Option<(u64, u64)>, role: Role) -> Field {
        for t in self.texts.iter_mut().filter(|t| t.role.is_none()) {
            t.role = Some(role);
        }
        Field {
            texts: self.texts,
            list,
        }
    }

    /// Notes a string read as `borrowed` (a slice of the body), else decoded: the next
    /// string token from the cursor.
    fn string<E: de::Error>(&mut self, borrowed: Option<&str>) -> Result<Range<usize>, E> {
        let span = match borrowed {
            Some(s) => span_of(self.body, s).and_then(|r| Some(r.start.checked_sub(1)?..r.end + 1)),
            None => next_string(self.body, self.cursor),
        };
        let quoted = |r: &Range<usize>| {
            self.body.get(r.start) == Some(&b'"') && self.body.get(r.end - 1) == Some(&b'"')
        };
        match span {
            Some(span) if span.start >= self.cursor && span.len() >= 2 && quoted(&span) => {
                self.cursor = span.end;
                Ok(span)
            }
            _ => Err(E::custom("internal: a prompt string not found in the body")),
        }
    }

    /// Notes a value read raw (every string in it seen).
    fn raw<E: de::Error>(&mut self, raw: &RawValue) -> Result<&'de [u8], E> {
        let span = span_of(self.body, raw.get())
            .ok_or_else(|| E::custom("internal: a prompt value not read from the body"))?;
        self.cursor = span.end;
        Ok(&self.body[span])
    }

    fn text<E: de::Error>(
        &mut self,
        borrowed: Option<&str>,
        owned: Option<String>,
        role: Option<Role>,
    ) -> Result<(), E> {
        let span = self.string(borrowed)?;
        self.texts.push(Text {
            span,
            role,
            owned,
            system_message: false,
        });
        Ok(())
    }
}

/// What walking one value found out about it beyond its texts.
#[derive(Default)]
struct Walked {
    /// An object's own role (its `role`, when that is a string).
    role: Option<Role>,
    /// A list at the top of the field: its items, and how many are system messages.
    list: Option<(u64, u64)>,
}

/// Walks one value: strings are texts of `role` (`None`: the enclosing message's);
/// messages carry their own role; content parts with `text` are texts; images and other
/// parts are skipped.
struct Seed<'w, 'de> {
    walk: &'w mut Walk<'de>,
    role: Option<Role>,
    /// Whether this is the field's value itself (a list there is counted).
    top: bool,
}

impl<'de> DeserializeSeed<'de> for Seed<'_, 'de> {
    type Value = Walked;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Walked, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_, 'de> {
    type Value = Walked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a prompt value")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Walked, E> {
        self.walk.text(Some(s), None, self.role)?;
        Ok(Walked::default())
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Walked, E> {
        self.walk.text(None, Some(s.to_owned()), self.role)?;
        Ok(Walked::default())
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Walked, E> {
        self.walk.text(None, Some(s), self.role)?;
        Ok(Walked::default())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Walked, E> {
        Ok(Walked::default())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Walked, E> {
        Ok(Walked::default())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Walked, E> {
        Ok(Walked::default())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Walked, E> {
        Ok(Walked::default())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Walked, E> {
        Ok(Walked::default())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Walked, A::Error> {
        let (mut items, mut system) = (0, 0);
        loop {
            let start = self.walk.texts.len();
            let item = seq.next_element_seed(Seed {
                walk: &mut *self.walk,
                role: self.role,
                top: false,
            })?;
            let Some(item) = item else { break };
            items += 1;
            // A message's layout is its own `role`'s, `user` when it has none.
            if self.top && item.role == Some(Role::System) {
                system += 1;
                for t in &mut self.walk.texts[start..] {
                    t.system_message = true;
                }
            }
        }
        Ok(Walked {
            role: None,
            list: self.top.then_some((items, system)),
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Walked, A::Error> {
        let walk = self.walk;
        let start = walk.texts.len();
        let mut own: Option<Role> = None;
        // Where the texts of the last `content` and the last `text` are; an earlier
        // member of the same name is not the one read.
        let mut content: Option<Range<usize>> = None;
        let mut text: Option<Range<usize>> = None;
        let mut reorder = false;
        while let Some(key) = map.next_key::<&'de RawValue>()? {
            let key = walk.raw::<A::Error>(key)?;
            let name = key_name(key).map_err(de::Error::custom)?;
            match name.as_ref() {
                "role" => {
                    let value = walk.raw::<A::Error>(map.next_value::<&'de RawValue>()?)?;
                    own = match value.first() {
                        Some(b'"') => Some(Role::from_message_role(
                            &key_name(value).map_err(de::Error::custom)?,
                        )),
                        _ => None,
                    };
                }
                "content" | "text" => {
                    let from = walk.texts.len();
                    map.next_value_seed(Seed {
                        walk: &mut *walk,
                        role: None,
                        top: false,
                    })?;
                    let here = from..walk.texts.len();
                    let slot = if name == "content" {
                        reorder |= text.is_some();
                        &mut content
                    } else {
                        &mut text
                    };
                    reorder |= slot.is_some();
                    *slot = Some(here);
                }
                _ => {
                    walk.raw::<A::Error>(map.next_value::<&'de RawValue>()?)?;
                }
            }
        }
        if reorder {
            // Rare: duplicates, or `text` before `content`. Keep the last of each,
            // `content`'s first, as a reader of the whole value sees them.
            let tail: Vec<Text> = walk.texts.drain(start..).collect();
            for r in [content, text].into_iter().flatten() {
                walk.texts
                    .extend_from_slice(&tail[r.start - start..r.end - start]);
            }
        }
        // `role` may come after `content`: its texts take it now.
        if let Some(role) = own.or(self.role) {
            for t in walk.texts[start..].iter_mut().filter(|t| t.role.is_none()) {
                t.role = Some(role);
            }
        }
        Ok(Walked {
            role: own,
            list: None,
        })
    }
}

/// The characters of a JSON string token (a key, a role), borrowed when it has no
/// escapes.
fn key_name(token: &[u8]) -> Result<std::borrow::Cow<'_, str>, serde_json::Error> {
    let inner = token
        .get(1..token.len().saturating_sub(1))
        .unwrap_or_default();
    match memchr::memchr(b'\\', inner) {
        None => std::str::from_utf8(inner)
            .map(std::borrow::Cow::Borrowed)
            .map_err(de::Error::custom),
        Some(_) => serde_json::from_slice::<String>(token).map(std::borrow::Cow::Owned),
    }
}
