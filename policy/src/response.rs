//! Response rules over generated text: redact (mask in place) or block (end the answer).
//! On a stream, text is held back only while it could still be the start of a match;
//! everything before that goes out at once, and a match split across chunks is caught.
//! Streamed or whole, the result is the same.

use std::sync::Arc;

use crate::matcher::{Matcher, Pattern, PatternError};

/// What a response rule does to a match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseAction {
    Redact { mask: String },
    Block,
}

/// A named response rule.
#[derive(Debug, Clone)]
pub struct ResponseRule {
    pub name: String,
    pub pattern: Pattern,
    pub action: ResponseAction,
}

/// Compiled response rules.
#[derive(Debug)]
pub struct ResponseRules {
    matcher: Matcher,
    rules: Vec<(String, ResponseAction)>,
}

/// What to send now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Emit {
    pub text: String,
    /// The rule that ended the answer, if one did: send nothing after `text`.
    pub blocked: Option<String>,
}

impl ResponseRules {
    /// Compiles rules; regexes must be bounded. Errors are per rule index.
    pub fn new(rules: Vec<ResponseRule>) -> Result<Self, Vec<(usize, PatternError)>> {
        let patterns: Vec<Pattern> = rules.iter().map(|r| r.pattern.clone()).collect();
        let matcher = Matcher::new(&patterns, true)?;
        Ok(Self {
            matcher,
            rules: rules.into_iter().map(|r| (r.name, r.action)).collect(),
        })
    }

    /// No rules.
    pub fn empty() -> Self {
        Self {
            matcher: Matcher::empty(),
            rules: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.matcher.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether any rule acts on `text` (what [`apply`](Self::apply) would hit), read
    /// without copying it.
    pub fn acts_on(&self, text: &str) -> bool {
        self.matcher.find_at(text, 0).is_some()
    }

    /// A filter for one streamed answer.
    pub fn stream(self: &Arc<Self>) -> ResponseFilter {
        ResponseFilter {
            rules: self.clone(),
            pending: String::new(),
            out: String::new(),
            context: 0,
            ended: false,
            hits: Vec::new(),
        }
    }

    /// Filters a whole answer at once.
    pub fn apply(self: &Arc<Self>, text: &str) -> (Emit, Vec<String>) {
        let mut f = self.stream();
        f.pending.push_str(text);
        let blocked = f.run(true);
        let emit = Emit {
            text: std::mem::take(&mut f.out),
            blocked,
        };
        (emit, f.hits())
    }
}

/// What a push released, borrowed from the filter.
#[derive(Debug, PartialEq, Eq)]
pub struct Released<'a> {
    pub text: &'a str,
    /// The rule that ended the answer, if one did: send nothing after `text`.
    pub blocked: Option<String>,
}

impl Released<'_> {
    fn to_emit(&self) -> Emit {
        Emit {
            text: self.text.to_owned(),
            blocked: self.blocked.clone(),
        }
    }
}

/// Filters one answer as it streams.
pub struct ResponseFilter {
    rules: Arc<ResponseRules>,
    pending: String,
    /// What the last push released (kept: one buffer for the whole answer).
    out: String,
    /// The first bytes of `pending` went out already: the character before the held
    /// text, kept so that a regex that looks behind its match (`\b`, `(?m)^`) sees what
    /// it would see in the whole answer.
    context: usize,
    ended: bool,
    hits: Vec<usize>,
}

impl ResponseFilter {
    /// Takes the next piece of generated text.
    pub fn push(&mut self, text: &str) -> Emit {
        self.push_released(text).to_emit()
    }

    /// As [`push`](Self::push), what it releases borrowed: most pieces of an answer
    /// go out as they came, and then nothing is allocated.
    pub fn push_released(&mut self, text: &str) -> Released<'_> {
        if self.ended {
            return Released {
                text: "",
                blocked: None,
            };
        }
        self.pending.push_str(text);
        let blocked = self.run(false);
        Released {
            text: &self.out,
            blocked,
        }
    }

    /// The answer ended: releases what was held back, filtered.
    pub fn finish(&mut self) -> Emit {
        if self.ended {
            return Emit::default();
        }
        self.ended = true;
        let blocked = self.run(true);
        Emit {
            text: std::mem::take(&mut self.out),
            blocked,
        }
    }

    /// Bytes held back now.
    pub fn held(&self) -> usize {
        self.pending.len() - self.context
    }

    /// Whether a block rule ended the answer.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// How many matches so far (what [`ResponseFilter::hits`] names).
    pub fn hit_count(&self) -> usize {
        self.hits.len()
    }

    /// The names of the rules that matched so far, in order.
    pub fn hits(&self) -> Vec<String> {
        self.hits
            .iter()
            .map(|&i| self.rules.rules[i].0.clone())
            .collect()
    }

    /// Releases into `out` what is settled of `pending`; the rule that blocked, if one did.
    fn run(&mut self, last: bool) -> Option<String> {
        let buf = std::mem::take(&mut self.pending);
        let matcher = &self.rules.matcher;
        let out = &mut self.out;
        out.clear();
        let mut pos = std::mem::take(&mut self.context);
        loop {
            let hold = if last {
                buf.len()
            } else {
                matcher.hold_from(&buf, pos)
            };
            match matcher.find_at(&buf, pos) {
                // Settled: nothing that starts before `hold` can change with more text.
                Some(m) if m.start < hold => {
                    out.push_str(&buf[pos..m.start]);
                    self.hits.push(m.rule);
                    match &self.rules.rules[m.rule].1 {
                        ResponseAction::Redact { mask } => {
                            out.push_str(mask);
                            pos = m.end;
                        }
                        ResponseAction::Block => {
                            self.ended = true;
                            return Some(self.rules.rules[m.rule].0.clone());
                        }
                    }
                }
                _ => {
                    out.push_str(&buf[pos..hold]);
                    let keep = buf[..hold].char_indices().next_back().map_or(0, |(i, _)| i);
                    // The held text stays in the same buffer (no allocation an event).
                    let mut buf = buf;
                    buf.drain(..keep);
                    self.pending = buf;
                    self.context = hold - keep;
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lit(name: &str, words: &[&str], cs: bool, action: ResponseAction) -> ResponseRule {
        ResponseRule {
            name: name.into(),
            pattern: Pattern::Literals {
                words: words.iter().map(|w| w.to_string()).collect(),
                case_sensitive: cs,
            },
            action,
        }
    }

    fn redact() -> ResponseAction {
        ResponseAction::Redact { mask: "#".into() }
    }

    fn literal_rules() -> Arc<ResponseRules> {
        Arc::new(
            ResponseRules::new(vec![
                lit("animals", &["rabbit", "rat"], false, redact()),
                lit("stop", &["STOP"], true, ResponseAction::Block),
            ])
            .unwrap(),
        )
    }

    fn rules() -> Arc<ResponseRules> {
        Arc::new(
            ResponseRules::new(vec![
                lit("animals", &["rabbit", "rat"], false, redact()),
                lit("bar", &["bar", "aa"], true, redact()),
                ResponseRule {
                    name: "bees".into(),
                    pattern: Pattern::Regex("b{2,3}".into()),
                    action: redact(),
                },
                lit("stop", &["STOP"], true, ResponseAction::Block),
            ])
            .unwrap(),
        )
    }

    fn streamed(rules: &Arc<ResponseRules>, chunks: &[&str]) -> (Vec<Emit>, Emit) {
        let mut f = rules.stream();
        let emits = chunks.iter().map(|c| f.push(c)).collect();
        (emits, f.finish())
    }

    fn joined(emits: &[Emit], last: &Emit) -> Emit {
        let mut text = String::new();
        let mut blocked = None;
        for e in emits.iter().chain(std::iter::once(last)) {
            text.push_str(&e.text);
            blocked = blocked.or(e.blocked.clone());
        }
        Emit { text, blocked }
    }

    #[test]
    fn redacts_a_word_split_across_chunks() {
        let r = literal_rules();
        let (emits, last) = streamed(&r, &["The rab", "bit ran", " away"]);
        assert_eq!(
            emits[0].text, "The ",
            "'rab' is held: it may become 'rabbit'"
        );
        assert_eq!(
            emits[1].text, "# ran",
            "'ran' cannot start a match any more"
        );
        assert_eq!(joined(&emits, &last).text, "The # ran away");
    }

    #[test]
    fn text_that_cannot_match_is_never_held() {
        let r = literal_rules();
        let mut f = r.stream();
        assert_eq!(f.push("hello world, ").text, "hello world, ");
        assert_eq!(f.held(), 0);
        assert_eq!(f.push("xyz").text, "xyz");
    }

    #[test]
    fn a_bounded_regex_holds_only_what_could_still_match() {
        let r = Arc::new(
            ResponseRules::new(vec![ResponseRule {
                name: "pin".into(),
                pattern: Pattern::Regex(r"\bPIN [0-9]{4}\b".into()),
                action: redact(),
            }])
            .unwrap(),
        );
        let mut f = r.stream();
        assert_eq!(
            f.push("your code: ").text,
            "your code: ",
            "no match can span the ':', and none starts with a space"
        );
        assert_eq!(f.held(), 0);
        assert_eq!(f.push("PIN 12").text, "");
        assert_eq!(f.held(), 6);
        assert_eq!(f.push("34 thanks").text, "# thanks");
        assert_eq!(f.finish().text, "");
        // At most its longest match (8 bytes) is held, from a byte a match starts with.
        let mut f = r.stream();
        assert_eq!(f.push("x PIN PIN PIN").text, "x PIN ");
        assert_eq!(f.held(), 7);
        assert_eq!(f.finish().text, "PIN PIN");
    }

    #[test]
    fn block_ends_the_answer_before_the_match() {
        let r = rules();
        let (emits, last) = streamed(&r, &["all good ST", "OP now", " more"]);
        let all = joined(&emits, &last);
        assert_eq!(all.text, "all good ");
        assert_eq!(all.blocked.as_deref(), Some("stop"));
        assert_eq!(emits[2], Emit::default(), "nothing after a block");
        assert_eq!(r.apply("all good STOP now more").0, all);
    }

    #[test]
    fn whole_answers_are_checked_whole() {
        let (emit, hits) = rules().apply("A RAT drank aa at the bar, bbbb");
        assert_eq!(emit.text, "A # drank # at the #, #b");
        assert_eq!(hits, ["animals", "bar", "bar", "bees"]);
    }

    fn chunkings() -> impl Strategy<Value = (String, Vec<usize>)> {
        (
            "[abrtiSTOP ]{0,60}",
            proptest::collection::vec(0usize..61, 0..8),
        )
    }

    /// Regexes that open with a word boundary or a literal prefix: a stream holds less
    /// for them (see `starts`), never so little that a match slips out.
    fn boundary_rules() -> Arc<ResponseRules> {
        let regex = |name: &str, re: &str| ResponseRule {
            name: name.into(),
            pattern: Pattern::Regex(re.into()),
            action: redact(),
        };
        Arc::new(
            ResponseRules::new(vec![
                regex("key", r"\bsk-[a-z_-]{2,6}"),
                regex("pin", r"(?i)\bpin ?\d{2}\b"),
                regex("word", r"\b{start}ab\b"),
                regex("inside", r"k_[0-9]{1,2}"),
                lit("rat", &["rat"], false, redact()),
            ])
            .unwrap(),
        )
    }

    /// `text` cut at `cuts` (clamped to its length; cuts inside a character are dropped).
    fn split(text: &str, cuts: Vec<usize>) -> Vec<&str> {
        let mut cuts: Vec<usize> = cuts
            .into_iter()
            .map(|c| c.min(text.len()))
            .filter(|&c| text.is_char_boundary(c))
            .collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for c in cuts {
            chunks.push(&text[start..c]);
            start = c;
        }
        chunks.push(&text[start..]);
        chunks
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_whole_text_result((text, cuts) in chunkings()) {
            let r = rules();
            let (emits, last) = streamed(&r, &split(&text, cuts));
            let streamed = joined(&emits, &last);
            let (whole, _) = r.apply(&text);
            prop_assert_eq!(&streamed, &whole);
            // Never a byte of a banned match: no rule matches anything emitted.
            let out: String = streamed.text.clone();
            prop_assert!(r.matcher.find_at(&out, 0).is_none(), "a match got out in {:?}", out);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]
        #[test]
        fn boundary_and_prefix_regexes_stream_as_whole(
            text in "(sk-|sk|pin|PIN|ab|rat|k_|s|k|-|_|[0-9]|[a-c]| |é){0,40}",
            cuts in proptest::collection::vec(0usize..120, 0..10),
        ) {
            let r = boundary_rules();
            let (emits, last) = streamed(&r, &split(&text, cuts));
            let streamed = joined(&emits, &last);
            let (whole, _) = r.apply(&text);
            prop_assert_eq!(&streamed, &whole);
        }
    }

    #[test]
    fn a_plural_is_not_held_for_an_api_key() {
        let r = Arc::new(
            ResponseRules::new(vec![ResponseRule {
                name: "key".into(),
                pattern: Pattern::Detector(crate::detect::Detector::OpenaiKey),
                action: redact(),
            }])
            .unwrap(),
        );
        let mut f = r.stream();
        assert_eq!(
            f.push(" regions").text,
            " regions",
            "no key starts in a word"
        );
        assert_eq!(f.push(" so").text, " so", "nor with 'so'");
        assert_eq!(f.push(" s").text, " ", "'s' may still become 'sk-'");
        assert_eq!(f.push("k-").text, "");
        assert_eq!(f.push("abcdefghijklmnopqrstuvwxyz ").text, "# ");
    }
}
