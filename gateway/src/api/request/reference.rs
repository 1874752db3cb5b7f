//! The splicing request against a reference: the reader it replaced (every field copied
//! into a map, the prompt parsed again into a `serde_json::Value`, a changed body written
//! anew), kept here small. For generated bodies and edits both must send the same JSON,
//! visit the same texts with the same roles, and read the same model, limits and prompt;
//! an unchanged body must go out byte for byte. (`tests.rs` pins the bytes themselves.)

use bytes::Bytes;
use indexmap::IndexMap;
use kube_gateway_policy::Role;
use proptest::prelude::*;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{Endpoint, LlmRequest, PromptShape, Visit};

/// The reader before splicing, reduced to what is compared.
struct Old {
    endpoint: Endpoint,
    fields: IndexMap<String, Box<RawValue>>,
    model: Option<String>,
    stream: bool,
    changed: bool,
}

impl Old {
    fn parse(endpoint: Endpoint, body: &[u8]) -> Option<Old> {
        let fields = serde_json::from_slice(body).ok()?;
        let mut old = Old {
            endpoint,
            fields,
            model: None,
            stream: endpoint.streams_by_default(),
            changed: false,
        };
        old.model = old.field::<Option<String>>("model").ok()?.flatten();
        if let Some(s) = old.field::<Option<bool>>("stream").ok()?.flatten() {
            old.stream = s;
        }
        Some(old)
    }

    fn field<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, ()> {
        self.fields
            .get(name)
            .map(|raw| serde_json::from_str(raw.get()).map_err(|_| ()))
            .transpose()
    }

    fn set_raw(&mut self, name: &str, json: String) {
        self.fields
            .insert(name.to_owned(), RawValue::from_string(json).unwrap());
        self.changed = true;
    }

    fn map(&self, name: &str) -> IndexMap<String, Box<RawValue>> {
        self.fields
            .get(name)
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or_default()
    }

    fn set_model(&mut self, model: &str) {
        self.set_raw("model", serde_json::to_string(model).unwrap());
        self.model = Some(model.to_owned());
    }

    fn ensure_stream_usage(&mut self) -> bool {
        #[derive(Deserialize)]
        struct StreamOptions {
            include_usage: Option<bool>,
        }
        if !self.stream
            || !matches!(
                self.endpoint,
                Endpoint::ChatCompletions | Endpoint::Completions
            )
        {
            return false;
        }
        let wanted = self.field::<StreamOptions>("stream_options").ok().flatten();
        if wanted.and_then(|o| o.include_usage).unwrap_or(false) {
            return false;
        }
        let mut options = self.map("stream_options");
        options.insert(
            "include_usage".into(),
            RawValue::from_string("true".into()).unwrap(),
        );
        self.set_raw("stream_options", serde_json::to_string(&options).unwrap());
        true
    }

    fn body(&self, original: &Bytes) -> Bytes {
        match self.changed {
            false => original.clone(),
            true => serde_json::to_vec(&self.fields).unwrap().into(),
        }
    }

    fn visit_prompt(&mut self, mut f: impl FnMut(Role, &str) -> Visit) {
        for (field, role) in super::prompt_fields(self.endpoint) {
            let Some(Ok(mut value)) = self
                .fields
                .get(*field)
                .map(|r| serde_json::from_str(r.get()))
            else {
                continue;
            };
            let mut changed = false;
            let stop = walk(&mut value, *role, &mut f, &mut changed);
            if changed {
                self.set_raw(field, serde_json::to_string(&value).unwrap());
            }
            if stop {
                return;
            }
        }
    }

    fn max_tokens(&self) -> Option<u64> {
        let positive = |v: Option<i64>| v.filter(|n| *n > 0).map(|n| n as u64);
        let int = |name| positive(self.field::<i64>(name).ok().flatten());
        match self.endpoint {
            Endpoint::ChatCompletions => int("max_completion_tokens").or(int("max_tokens")),
            Endpoint::Completions => int("max_tokens"),
            Endpoint::Responses => int("max_output_tokens"),
            Endpoint::Chat | Endpoint::Generate => positive(
                self.map("options")
                    .get("num_predict")
                    .and_then(|raw| serde_json::from_str(raw.get()).ok()),
            ),
            _ => None,
        }
    }

    fn set_max_tokens(&mut self, n: u64) {
        let field = match self.endpoint {
            Endpoint::ChatCompletions => {
                if self.fields.contains_key("max_completion_tokens")
                    || !self.fields.contains_key("max_tokens")
                {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                }
            }
            Endpoint::Completions => "max_tokens",
            Endpoint::Responses => "max_output_tokens",
            Endpoint::Chat | Endpoint::Generate => {
                let mut options = self.map("options");
                options.insert(
                    "num_predict".into(),
                    RawValue::from_string(n.to_string()).unwrap(),
                );
                self.set_raw("options", serde_json::to_string(&options).unwrap());
                return;
            }
            _ => return,
        };
        self.set_raw(field, n.to_string());
    }

    fn value(&self, key: &str) -> Option<Value> {
        self.fields
            .get(key)
            .and_then(|r| serde_json::from_str(r.get()).ok())
    }

    fn prompt_text(&self) -> String {
        let mut out = String::new();
        for (key, _) in super::prompt_fields(self.endpoint) {
            if let Some(v) = self.value(key) {
                collect_text(&v, &mut out);
            }
        }
        out
    }

    fn prompt_shape(&self) -> PromptShape {
        let mut shape = PromptShape::default();
        let (list, system): (&str, &[&str]) = match self.endpoint {
            Endpoint::ChatCompletions | Endpoint::Chat => ("messages", &[]),
            Endpoint::Responses => ("input", &["instructions"]),
            Endpoint::Generate => ("", &["system"]),
            _ => ("", &[]),
        };
        for key in system {
            if let Some(v) = self.value(key) {
                collect_text(&v, &mut shape.system);
            }
        }
        if let Some(Value::Array(items)) = self.value(list) {
            for item in &items {
                shape.messages += 1;
                let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                if Role::from_message_role(role) == Role::System {
                    shape.system_messages += 1;
                    collect_text(item, &mut shape.system);
                }
            }
        }
        shape
    }
}

fn walk(
    v: &mut Value,
    role: Role,
    f: &mut impl FnMut(Role, &str) -> Visit,
    changed: &mut bool,
) -> bool {
    match v {
        Value::String(s) => match f(role, s) {
            Visit::Keep => false,
            Visit::Replace(new) => {
                *s = new;
                *changed = true;
                false
            }
            Visit::Stop => true,
        },
        Value::Array(items) => items.iter_mut().any(|i| walk(i, role, f, changed)),
        Value::Object(o) => {
            let role = o
                .get("role")
                .and_then(Value::as_str)
                .map_or(role, Role::from_message_role);
            ["content", "text"]
                .iter()
                .any(|k| o.get_mut(*k).is_some_and(|v| walk(v, role, f, changed)))
        }
        _ => false,
    }
}

fn collect_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => super::push_line(out, s),
        Value::Array(items) => items.iter().for_each(|i| collect_text(i, out)),
        Value::Object(o) => ["content", "text"]
            .iter()
            .filter_map(|k| o.get(*k))
            .for_each(|v| collect_text(v, out)),
        _ => {}
    }
}

/// A JSON value to write with chosen whitespace: literals and strings as raw JSON text.
#[derive(Debug, Clone)]
enum J {
    Raw(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

const SPACE: [&str; 4] = ["", " ", "\n  ", "\t"];

fn write(j: &J, ws: &[u8], at: &mut usize, out: &mut String) {
    let space = |out: &mut String, at: &mut usize| {
        out.push_str(SPACE[usize::from(ws[*at % ws.len()]) % SPACE.len()]);
        *at += 1;
    };
    match j {
        J::Raw(s) => out.push_str(s),
        J::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                space(out, at);
                write(item, ws, at, out);
                space(out, at);
            }
            out.push(']');
        }
        J::Obj(members) => {
            out.push('{');
            space(out, at);
            for (i, (key, value)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    space(out, at);
                }
                out.push_str(key);
                space(out, at);
                out.push(':');
                space(out, at);
                write(value, ws, at, out);
                space(out, at);
            }
            out.push('}');
        }
    }
}

/// Pieces of JSON string text: plain, escaped, multi-byte and astral characters, some
/// written both ways.
const PIECES: [&str; 14] = [
    "a",
    "hi ",
    "secret",
    r"\n",
    r#"\""#,
    r"\\",
    "é",
    r"\u00e9",
    "😀",
    r"\ud83d\ude00",
    r"\/",
    r"\t",
    "user",
    "",
];

fn string() -> impl Strategy<Value = String> {
    proptest::collection::vec(0..PIECES.len(), 0..5)
        .prop_map(|p| format!("\"{}\"", p.iter().map(|&i| PIECES[i]).collect::<String>()))
}

fn decoded(json: &str) -> String {
    serde_json::from_str(json).unwrap()
}

fn lit() -> impl Strategy<Value = J> {
    prop_oneof![
        Just("null"),
        Just("true"),
        Just("false"),
        Just("0.50"),
        Just("1e3"),
        Just("-0"),
        Just("12"),
        Just("3.25E-2"),
        Just("512"),
        Just("-1"),
    ]
    .prop_map(|s| J::Raw(s.into()))
}

fn key(names: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::sample::select(names).prop_map(|n| format!("\"{n}\""))
}

fn part() -> impl Strategy<Value = J> {
    prop_oneof![
        string().prop_map(J::Raw),
        string().prop_map(|t| J::Obj(vec![
            ("\"type\"".into(), J::Raw("\"text\"".into())),
            ("\"text\"".into(), J::Raw(t))
        ])),
        string().prop_map(|u| J::Obj(vec![
            ("\"type\"".into(), J::Raw("\"image_url\"".into())),
            (
                "\"image_url\"".into(),
                J::Obj(vec![("\"url\"".into(), J::Raw(u))])
            ),
        ])),
    ]
}

fn message() -> impl Strategy<Value = J> {
    let role = prop_oneof![proptest::sample::select(
        &[
            "\"system\"",
            "\"developer\"",
            "\"user\"",
            "\"assistant\"",
            "\"tool\"",
            "\"sy\\u0073tem\"",
            "5"
        ][..]
    )
    .prop_map(|r| J::Raw(r.into())),];
    let content = prop_oneof![
        3 => string().prop_map(J::Raw),
        2 => proptest::collection::vec(part(), 0..3).prop_map(J::Arr),
        1 => lit(),
    ];
    let member = prop_oneof![
        3 => role.prop_map(|r| ("\"role\"".to_owned(), r)),
        4 => content.clone().prop_map(|c| ("\"content\"".to_owned(), c)),
        1 => content.prop_map(|c| ("\"text\"".to_owned(), c)),
        1 => (key(&["name", "tool_call_id", "r\\u006fle"]), string()).prop_map(|(k, v)| (k, J::Raw(v))),
        1 => lit().prop_map(|n| ("\"tool_calls\"".to_owned(), J::Arr(vec![J::Obj(vec![("\"n\"".into(), n)])]))),
    ];
    proptest::collection::vec(member, 0..5).prop_map(J::Obj)
}

/// A prompt field's value: a string, strings, messages.
fn prompt() -> impl Strategy<Value = J> {
    prop_oneof![
        1 => string().prop_map(J::Raw),
        1 => proptest::collection::vec(string().prop_map(J::Raw), 0..3).prop_map(J::Arr),
        3 => proptest::collection::vec(message(), 0..6).prop_map(J::Arr),
    ]
}

/// A top-level member: any field an endpoint reads, and others; names may repeat.
fn member() -> impl Strategy<Value = (String, J)> {
    let options = (lit(), lit()).prop_map(|(a, b)| {
        J::Obj(vec![
            ("\"temperature\"".into(), a),
            ("\"num_predict\"".into(), b),
        ])
    });
    let stream_options = prop_oneof![
        lit(),
        lit().prop_map(|v| J::Obj(vec![
            ("\"include_usage\"".into(), v),
            ("\"other\"".into(), J::Raw("1".into()))
        ]))
    ];
    prop_oneof![
        3 => (key(&["model", "mod\\u0065l"]), prop_oneof![4 => string().prop_map(J::Raw), 1 => lit()]),
        1 => (key(&["messages", "prompt", "input", "system", "instructions"]), prompt()),
        2 => (key(&["max_tokens", "max_completion_tokens", "max_output_tokens", "temperature"]), lit()),
        1 => (key(&["stream"]), prop_oneof![Just(J::Raw("true".into())), Just(J::Raw("false".into()))]),
        1 => (key(&["stream_options"]), stream_options),
        1 => (key(&["options"]), options),
        1 => (key(&["x", "tools"]), proptest::collection::vec(prop_oneof![lit(), string().prop_map(J::Raw)], 0..3).prop_map(J::Arr)),
    ]
}

/// What the gateway does to a text, by the text's place in the walk.
#[derive(Debug, Clone)]
enum Act {
    Keep,
    Replace(String),
    Stop,
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![3 => Just(Act::Keep), 2 => string().prop_map(|s| Act::Replace(decoded(&s))), 1 => Just(Act::Stop)]
}

/// A prompt visitor doing `acts` in turn, noting what it saw.
fn visitor<'a>(
    acts: &'a [Act],
    seen: &'a mut Vec<(Role, String)>,
) -> impl FnMut(Role, &str) -> Visit + 'a {
    move |role, text| {
        seen.push((role, text.to_owned()));
        match &acts[(seen.len() - 1) % acts.len()] {
            Act::Keep => Visit::Keep,
            Act::Replace(s) => Visit::Replace(s.clone()),
            Act::Stop => Visit::Stop,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4_000))]

    #[test]
    fn splicing_sends_what_the_reference_sends(
        endpoint in proptest::sample::select(&Endpoint::ALL[..]),
        mut members in proptest::collection::vec(member(), 0..7),
        prompts in proptest::collection::vec((prompt(), any::<usize>()), 1..4),
        ws in proptest::collection::vec(any::<u8>(), 1..16),
        model in proptest::option::of(string()),
        acts in proptest::collection::vec(act(), 1..6),
        max in proptest::option::of(1u64..1000),
        usage in any::<bool>(),
    ) {
        // The endpoint's prompt fields, at any place, sometimes twice.
        let slots = super::prompt_fields(endpoint);
        let wanted = slots.len() + usize::from(prompts.len() == 3);
        for (i, (value, at)) in prompts.into_iter().take(wanted).enumerate() {
            let name = format!("\"{}\"", slots[i % slots.len()].0);
            members.insert(at % (members.len() + 1), (name, value));
        }
        let mut text = String::new();
        write(&J::Obj(members), &ws, &mut 0, &mut text);
        let original = Bytes::from(text);
        let new = LlmRequest::parse(endpoint, original.clone());
        let old = Old::parse(endpoint, &original);
        prop_assert_eq!(new.is_ok(), old.is_some(), "{:?}", original);
        let (Ok(mut new), Some(mut old)) = (new, old) else { return Ok(()) };
        prop_assert_eq!(&new.model, &old.model);
        prop_assert_eq!(new.stream, old.stream);
        prop_assert_eq!(new.prompt_text(), old.prompt_text());
        prop_assert_eq!(new.prompt_shape(), old.prompt_shape());
        prop_assert_eq!(new.max_tokens(), old.max_tokens());

        let mut changed = false;
        if let Some(m) = &model {
            let m = decoded(m);
            new.set_model(&m);
            old.set_model(&m);
            changed = true;
        }
        let (mut seen, mut want_seen) = (Vec::new(), Vec::new());
        new.visit_prompt(visitor(&acts, &mut seen));
        old.visit_prompt(visitor(&acts, &mut want_seen));
        prop_assert_eq!(&seen, &want_seen);
        changed |= (0..seen.len()).any(|n| matches!(acts[n % acts.len()], Act::Replace(_)));
        if let Some(n) = max {
            new.set_max_tokens(n);
            old.set_max_tokens(n);
            changed |= !endpoint.is_embedding();
        }
        if usage {
            let added = new.ensure_stream_usage();
            prop_assert_eq!(added, old.ensure_stream_usage());
            changed |= added;
        }
        prop_assert_eq!(new.max_tokens(), old.max_tokens());
        prop_assert_eq!(new.prompt_text(), old.prompt_text());
        prop_assert_eq!(new.prompt_shape(), old.prompt_shape());

        let sent = new.body();
        let want = old.body(&original);
        let parsed = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)));
        prop_assert_eq!(parsed(&sent), parsed(&want), "sent {:?}", sent);
        if !changed {
            prop_assert_eq!(&sent, &original);
        } else {
            // What the gateway decided on is what an upstream taking the first of
            // duplicate keys reads too.
            prop_assert_eq!(first_wins(&sent), parsed(&sent), "sent {:?}", sent);
        }
        let again = LlmRequest::parse(endpoint, sent.clone()).unwrap();
        prop_assert_eq!(&again.model, &new.model);
        prop_assert_eq!(again.max_tokens(), new.max_tokens());
        prop_assert_eq!(again.prompt_text(), new.prompt_text());
    }
}

/// The body's top level as a reader that takes the first of duplicate keys sees it.
pub(super) fn first_wins(body: &[u8]) -> Value {
    let mut out = serde_json::Map::new();
    for (k, v) in serde_json::from_slice::<Pairs>(body).unwrap().0 {
        out.entry(k).or_insert(v);
    }
    Value::Object(out)
}

/// An object's members, duplicates kept.
struct Pairs(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Pairs, A::Error> {
                let mut v = Vec::new();
                while let Some(pair) = map.next_entry()? {
                    v.push(pair);
                }
                Ok(Pairs(v))
            }
        }
        de.deserialize_map(V)
    }
}
