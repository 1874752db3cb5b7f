//! The request reader's tests by example: what it reads, and the exact bytes it sends
//! (every byte it did not change kept, duplicates, escapes, empty objects).

use bytes::Bytes;
use kube_gateway_policy::Role;

use super::reference::first_wins;
use super::{Endpoint, LlmRequest, ParseError, Visit};

fn parse(endpoint: Endpoint, body: &'static str) -> LlmRequest {
    LlmRequest::parse(endpoint, body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn sent(req: &LlmRequest) -> String {
    String::from_utf8(req.body().to_vec()).unwrap()
}

#[test]
fn splicing_keeps_every_other_byte() {
    let mut req = parse(
        Endpoint::ChatCompletions,
        "{ \"temperature\" : 0.50,\n  \"model\":\t\"llama3\" , \"x\": [1e3, -0, {\"y\" :null}],\n  \"messages\": [ {\"content\" : \"my secret\" , \"role\":\"user\"} ],\"max_tokens\" :  500 }\n",
    );
    req.set_model("gemma2:2b");
    req.visit_prompt(|_, t| Visit::Replace(t.replace("secret", "[X]")));
    req.set_max_tokens(50);
    assert_eq!(
        sent(&req),
        "{ \"temperature\" : 0.50,\n  \"model\":\t\"gemma2:2b\" , \"x\": [1e3, -0, {\"y\" :null}],\n  \"messages\": [ {\"content\" : \"my [X]\" , \"role\":\"user\"} ],\"max_tokens\" :  50 }\n"
    );
}

#[test]
fn fields_are_added_to_an_empty_object() {
    for (body, want) in [
        ("{}", r#"{"model":"m","max_completion_tokens":5}"#),
        ("{ \n}", "{ \n\"model\":\"m\",\"max_completion_tokens\":5}"),
        (" {} ", r#" {"model":"m","max_completion_tokens":5} "#),
    ] {
        let mut req = parse(Endpoint::ChatCompletions, body);
        req.set_model("m");
        req.set_max_tokens(5);
        assert_eq!(sent(&req), want);
        assert_eq!(req.max_tokens(), Some(5));
    }
    let mut ollama = parse(Endpoint::Chat, r#"{"options":{ }}"#);
    ollama.set_max_tokens(7);
    assert_eq!(sent(&ollama), r#"{"options":{ "num_predict":7}}"#);
    assert_eq!(ollama.max_tokens(), Some(7));
}

#[test]
fn a_repeated_model_is_written_once_with_the_model_decided_on() {
    let mut req = parse(
        Endpoint::ChatCompletions,
        r#"{"model":"gpt-4o", "temperature":0.50, "model":"llama3", "mod\u0065l":"llama3.2"}"#,
    );
    assert_eq!(
        req.model.as_deref(),
        Some("llama3.2"),
        "the last one is read"
    );
    req.set_model("gemma2:2b");
    let out = req.body();
    assert_eq!(&out[..], br#"{"model":"gemma2:2b","temperature":0.50}"#);
    assert_eq!(first_wins(&out)["model"], "gemma2:2b");
    // Unchanged, a body with duplicates goes as it came.
    let same = parse(Endpoint::ChatCompletions, r#"{"model":"a","model":"b"}"#);
    assert_eq!(&same.body()[..], br#"{"model":"a","model":"b"}"#);
}

#[test]
fn an_escaped_text_is_replaced_in_place() {
    let mut req = parse(
        Endpoint::ChatCompletions,
        r#"{"messages":[{"role":"user","content":"say \"secret\"\n caf\u00e9 \ud83d\ude00"},{"role":"user","content":"plain"}],"n":1}"#,
    );
    let mut seen = Vec::new();
    req.visit_prompt(|_, t| {
        seen.push(t.to_owned());
        match t.contains("secret") {
            true => Visit::Replace(t.replace("secret", "[X]")),
            false => Visit::Keep,
        }
    });
    assert_eq!(seen, ["say \"secret\"\n café 😀", "plain"]);
    assert_eq!(
        sent(&req),
        r#"{"messages":[{"role":"user","content":"say \"[X]\"\n café 😀"},{"role":"user","content":"plain"}],"n":1}"#
    );
    assert_eq!(req.prompt_text(), "say \"[X]\"\n café 😀\nplain");
}

#[test]
fn a_stop_ends_the_walk_and_keeps_earlier_replacements() {
    let mut req = parse(
        Endpoint::Responses,
        r#"{"instructions":"one","input":[{"content":"two"},{"content":"three"}]}"#,
    );
    let mut seen = Vec::new();
    req.visit_prompt(|role, t| {
        seen.push((role, t.to_owned()));
        match t {
            "one" => Visit::Replace("1".into()),
            _ => Visit::Stop,
        }
    });
    assert_eq!(
        seen,
        [(Role::System, "one".into()), (Role::User, "two".into())]
    );
    assert_eq!(
        sent(&req),
        r#"{"instructions":"1","input":[{"content":"two"},{"content":"three"}]}"#
    );
}

#[test]
fn a_role_after_content_and_text_before_content_read_as_a_value_reads_them() {
    let mut req = parse(
        Endpoint::Chat,
        r#"{"messages":[{"text":"b","content":[{"text":"a"}],"role":"system"},{"content":"c","content":"d","role":"assistant"}]}"#,
    );
    let mut seen = Vec::new();
    req.visit_prompt(|role, t| {
        seen.push((role, t.to_owned()));
        Visit::Keep
    });
    assert_eq!(
        seen,
        [
            (Role::System, "a".into()),
            (Role::System, "b".into()),
            (Role::Assistant, "d".into())
        ]
    );
    let shape = req.prompt_shape();
    assert_eq!((shape.messages, shape.system_messages), (2, 1));
    assert_eq!(shape.system, "a\nb");
}

#[test]
fn a_prompt_serde_json_reads_only_raw_has_no_texts_and_the_rest_still_reads() {
    // As before splicing: a lone surrogate escape, or a number past f64, in the prompt
    // leaves it unread; the body still parses and is forwarded.
    for body in [
        r#"{"model":"llama3","messages":[{"role":"user","content":"\ud800 hi"}],"max_tokens":9}"#,
        r#"{"model":"llama3","messages":[{"role":"user","content":"hi"},1e999],"max_tokens":9}"#,
    ] {
        let mut req = parse(Endpoint::ChatCompletions, body);
        assert_eq!(req.model.as_deref(), Some("llama3"));
        assert_eq!(req.max_tokens(), Some(9));
        assert_eq!(req.prompt_text(), "", "{body}");
        req.set_model("b");
        assert_eq!(sent(&req), body.replacen("llama3", "b", 1));
    }
}

mod parse {
    use super::*;

    #[test]
    fn unchanged_body_is_forwarded_as_is() {
        let body = Bytes::from_static(br#"{ "model" : "a",  "x": [1, 2.50, {"y": null}] }"#);
        let req = LlmRequest::parse(Endpoint::ChatCompletions, body.clone()).unwrap();
        assert_eq!(req.model.as_deref(), Some("a"));
        assert!(!req.stream);
        assert_eq!(req.body(), body);
    }

    #[test]
    fn model_rewrite_keeps_every_other_field_verbatim() {
        let body = Bytes::from_static(
            br#"{"model":"a","temperature":0.70,"x":{"deep":[1e3, "\u00e9"]},"zzz":true}"#,
        );
        let mut req = LlmRequest::parse(Endpoint::Chat, body.clone()).unwrap();
        assert!(req.stream, "Ollama chat streams by default");
        req.set_model("b");
        assert_eq!(
            &req.body()[..],
            br#"{"model":"b","temperature":0.70,"x":{"deep":[1e3, "\u00e9"]},"zzz":true}"#
        );
    }

    #[test]
    fn stream_usage_is_added_once_and_keeps_other_options() {
        let body =
            Bytes::from_static(br#"{"model":"a","stream":true,"stream_options":{"other":1}}"#);
        let mut req = LlmRequest::parse(Endpoint::ChatCompletions, body.clone()).unwrap();
        assert!(req.ensure_stream_usage());
        let out = req.body();
        assert_eq!(
            &out[..],
            br#"{"model":"a","stream":true,"stream_options":{"other":1,"include_usage":true}}"#
        );
        let mut again = LlmRequest::parse(Endpoint::ChatCompletions, out.clone()).unwrap();
        assert!(!again.ensure_stream_usage());
        let plain = LlmRequest::parse(Endpoint::ChatCompletions, r#"{"model":"a"}"#);
        assert!(!plain.unwrap().ensure_stream_usage(), "not a stream");
    }

    #[test]
    fn bad_bodies_are_typed_errors() {
        assert!(matches!(
            LlmRequest::parse(Endpoint::Chat, "[1]"),
            Err(ParseError::NotAnObject(_))
        ));
        assert!(matches!(
            LlmRequest::parse(Endpoint::Chat, r#"{"model":"a""#),
            Err(ParseError::NotAnObject(_))
        ));
        assert!(matches!(
            LlmRequest::parse(Endpoint::Chat, r#"{"model":5}"#),
            Err(ParseError::FieldType { field: "model", .. })
        ));
    }

    #[test]
    fn prompt_text_reads_messages_parts_and_prompts() {
        let req = LlmRequest::parse(
            Endpoint::ChatCompletions,
            r#"{"model":"a","messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"u"}}]}]}"#,
        )
        .unwrap();
        assert_eq!(req.prompt_text(), "be brief\nhi");
        let gen = LlmRequest::parse(
            Endpoint::Generate,
            r#"{"model":"a","system":"s","prompt":"p"}"#,
        )
        .unwrap();
        assert_eq!(gen.prompt_text(), "s\np");
    }
}

mod prompt {
    use super::*;

    fn texts(req: &mut LlmRequest) -> Vec<(Role, String)> {
        let mut out = Vec::new();
        req.visit_prompt(|role, text| {
            out.push((role, text.to_owned()));
            Visit::Keep
        });
        out
    }

    #[test]
    fn visits_every_text_with_its_role() {
        let mut chat = LlmRequest::parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"developer","content":"rules"},{"role":"user","content":[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:x"}}]},{"role":"assistant","content":"ok"},{"role":"tool","content":"42"}]}"#,
        )
        .unwrap();
        assert_eq!(
            texts(&mut chat),
            vec![
                (Role::System, "rules".into()),
                (Role::User, "look".into()),
                (Role::Assistant, "ok".into()),
                (Role::Tool, "42".into())
            ]
        );
        let mut gen = LlmRequest::parse(
            Endpoint::Generate,
            r#"{"model":"m","system":"s","prompt":"p","images":["aGk="]}"#,
        )
        .unwrap();
        assert_eq!(
            texts(&mut gen),
            vec![(Role::System, "s".into()), (Role::User, "p".into())]
        );
        let mut resp = LlmRequest::parse(Endpoint::Responses, r#"{"model":"m","instructions":"i","input":[{"role":"user","content":[{"type":"input_text","text":"t"}]}]}"#).unwrap();
        assert_eq!(
            texts(&mut resp),
            vec![(Role::System, "i".into()), (Role::User, "t".into())]
        );
    }

    #[test]
    fn replacing_a_text_rewrites_only_its_field() {
        let body = Bytes::from_static(br#"{"model":"m","temperature":0.50,"messages":[{"role":"user","content":"my secret"}]}"#);
        let mut req = LlmRequest::parse(Endpoint::Chat, body.clone()).unwrap();
        req.visit_prompt(|_, t| Visit::Replace(t.replace("secret", "[X]")));
        assert_eq!(
            &req.body()[..],
            br#"{"model":"m","temperature":0.50,"messages":[{"role":"user","content":"my [X]"}]}"#
        );
    }

    #[test]
    fn max_tokens_read_and_set_per_dialect() {
        let mut c = LlmRequest::parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","max_tokens":500}"#,
        )
        .unwrap();
        assert_eq!(c.max_tokens(), Some(500));
        c.set_max_tokens(100);
        assert_eq!(c.raw_field("max_tokens").as_deref(), Some("100"));
        let mut fresh = LlmRequest::parse(Endpoint::ChatCompletions, r#"{"model":"m"}"#).unwrap();
        fresh.set_max_tokens(64);
        assert_eq!(
            fresh.raw_field("max_completion_tokens").as_deref(),
            Some("64")
        );
        let mut o = LlmRequest::parse(
            Endpoint::Chat,
            r#"{"model":"m","options":{"temperature":0,"num_predict":-1}}"#,
        )
        .unwrap();
        assert_eq!(o.max_tokens(), None, "-1 is unlimited");
        o.set_max_tokens(50);
        assert_eq!(
            o.raw_field("options").as_deref(),
            Some(r#"{"temperature":0,"num_predict":50}"#)
        );
        let mut r = LlmRequest::parse(Endpoint::Responses, r#"{"model":"m"}"#).unwrap();
        r.set_max_tokens(7);
        assert_eq!(r.max_tokens(), Some(7));
    }
}
