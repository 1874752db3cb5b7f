//! One matcher for a set of text rules: literals (one Aho-Corasick automaton per case
//! mode), regexes and built-in detectors. It finds the leftmost match (longest at a
//! tie, then the first rule) and, for streams, tells how much of a text's end could
//! still become the start of a match once more text arrives.

use aho_corasick::{packed, AhoCorasick, AhoCorasickBuilder, Input, MatchKind, Span};
use regex::Regex;
use regex_syntax::hir::{Class, Hir, HirKind};

use crate::detect::Detector;
use crate::starts::Starts;

/// What a rule matches.
#[derive(Debug, Clone)]
pub enum Pattern {
    Literals {
        words: Vec<String>,
        case_sensitive: bool,
    },
    Regex(String),
    Detector(Detector),
}

/// A pattern could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("invalid regex: {0}")]
    Regex(String),
    #[error("literals must not be empty")]
    EmptyLiteral,
    #[error("this regex can match text of any length; on streams a rule must be bounded (use {{m,n}} instead of + or *)")]
    Unbounded,
    #[error("this regex can match empty text; a rule must match at least one character")]
    MatchesEmpty,
}

/// One match: bytes `start..end` of the text, found by rule `rule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    pub start: usize,
    pub end: usize,
    pub rule: usize,
}

struct Automaton {
    ac: AhoCorasick,
    /// The same words as a packed (SIMD) searcher, when they are few enough for one:
    /// the automaton's own prefilter picks rare bytes of the words, which English
    /// prompts are full of, and then steps through the text byte by byte.
    packed: Option<packed::Searcher>,
    /// Pattern id to rule index.
    rules: Vec<usize>,
    /// The literals, lower-cased when the automaton ignores case, for prefix checks.
    words: Vec<Vec<u8>>,
    /// The longest of them, in bytes.
    longest: usize,
    ignore_case: bool,
    /// When case is ignored: every spelling of the words' first bytes, to find them in a
    /// long text without lower-casing a copy of it (see [`Automaton::find_spelled`]).
    spellings: Option<packed::Searcher>,
    /// The bytes the words start with (both cases when case is ignored).
    starts: ByteSet,
}

impl Automaton {
    /// The leftmost-longest match in `text[span]`: start, end, pattern.
    fn find_in(&self, text: &[u8], span: std::ops::Range<usize>) -> Option<(usize, usize, usize)> {
        let m = match &self.packed {
            Some(packed) => packed.find_in(text, Span::from(span))?,
            None => self.ac.find(Input::new(text).range(span))?,
        };
        Some((m.start(), m.end(), m.pattern().as_usize()))
    }

    /// The leftmost-longest match at or after `pos`: start, end, pattern.
    fn find_at(&self, text: &[u8], pos: usize) -> Option<(usize, usize, usize)> {
        if text.len().saturating_sub(pos) <= SHORT_TEXT && self.words.len() <= SPELLING_WORDS_MAX {
            return self.find_short(text, pos);
        }
        if !self.ignore_case {
            return self.find_in(text, pos..text.len());
        }
        match &self.spellings {
            Some(spellings) if text.len().saturating_sub(pos) > SHORT_TEXT => {
                self.find_spelled(spellings, text, pos)
            }
            _ => self.find_folded(text, pos),
        }
    }

    /// A case-ignoring search by the words' first bytes: each place one of their
    /// spellings starts is checked against the words, longest first. Lower-casing the
    /// text first cost as much as the search itself (64 KiB: ~3 of ~7 us). A text that
    /// keeps starting words it does not finish is searched folded from there on, whose
    /// automaton checks its own candidates more cheaply than a restart here.
    fn find_spelled(
        &self,
        spellings: &packed::Searcher,
        text: &[u8],
        pos: usize,
    ) -> Option<(usize, usize, usize)> {
        let mut from = pos;
        for _ in 0..SPELLING_MISSES {
            let start = spellings
                .find_in(text, Span::from(from..text.len()))?
                .start();
            let rest = text.get(start..)?;
            let word = self
                .words
                .iter()
                .enumerate()
                .filter(|(_, w)| rest.len() >= w.len() && rest[..w.len()].eq_ignore_ascii_case(w))
                .max_by_key(|(i, w)| (w.len(), std::cmp::Reverse(*i)));
            if let Some((pattern, w)) = word {
                return Some((start, start + w.len(), pattern));
            }
            from = start + 1;
        }
        self.find_folded(text, from)
    }

    /// A short text (a streamed piece) read directly: each place a word starts is
    /// checked against the words, longest first. Folding a copy and setting up a packed
    /// search cost more than the whole piece (~250 instructions an event).
    fn find_short(&self, text: &[u8], pos: usize) -> Option<(usize, usize, usize)> {
        let same = |a: &[u8], w: &[u8]| {
            if self.ignore_case {
                a.eq_ignore_ascii_case(w)
            } else {
                a == w
            }
        };
        for start in pos..text.len() {
            if !self.starts.contains(text[start]) {
                continue;
            }
            let rest = &text[start..];
            let word = self
                .words
                .iter()
                .enumerate()
                .filter(|(_, w)| rest.len() >= w.len() && same(&rest[..w.len()], w))
                .max_by_key(|(i, w)| (w.len(), std::cmp::Reverse(*i)));
            if let Some((pattern, w)) = word {
                return Some((start, start + w.len(), pattern));
            }
        }
        None
    }

    /// A case-ignoring search over lower-cased copies of the text.
    fn find_folded(&self, text: &[u8], pos: usize) -> Option<(usize, usize, usize)> {
        // Lower-cased a window at a time, so that a search stopping at its first match
        // costs what it reads (a prompt with many matches is searched once per match).
        let window = FOLD_WINDOW.max(2 * self.longest);
        let mut from = pos;
        // A short text (a streamed piece) is folded on the stack.
        let mut stack = [0u8; SHORT_TEXT];
        let mut heap = Vec::new();
        loop {
            let end = from.saturating_add(window).min(text.len());
            let piece = text.get(from..end)?;
            let folded: &mut [u8] = if piece.len() <= SHORT_TEXT {
                &mut stack[..piece.len()]
            } else {
                heap.clear();
                heap.resize(piece.len(), 0);
                &mut heap
            };
            folded.copy_from_slice(piece);
            folded.make_ascii_lowercase();
            match self.find_in(folded, 0..folded.len()) {
                // Settled when no match starting before it can run past the window.
                Some((start, stop, pattern))
                    if end == text.len() || from + start + self.longest <= end =>
                {
                    return Some((from + start, from + stop, pattern));
                }
                // Look again from its start, with all of its possible length in view.
                Some((start, _, _)) => from += start,
                None if end == text.len() => return None,
                // A match may span the window's end: the next one overlaps it.
                None => from = end - (self.longest - 1),
            }
        }
    }
}

/// How much text a case-ignoring literal search lower-cases at a time.
const FOLD_WINDOW: usize = 4096;

/// How many of the words' first bytes a spelling covers, and how many spellings a
/// packed searcher may hold (more, and case-ignoring words are searched folded).
const SPELLING_LEN: usize = 3;
const SPELLINGS_MAX: usize = 64;

/// Word starts a case-ignoring search checks in vain before it folds the rest instead.
const SPELLING_MISSES: usize = 32;

/// Each word start is checked against every word: past this many words (a long list,
/// whose words may share their first bytes), the automaton's own check is cheaper.
const SPELLING_WORDS_MAX: usize = 16;

/// A packed searcher for every ASCII-case spelling of the distinct first
/// [`SPELLING_LEN`] bytes of `words` (lower-cased); `None` when a word is shorter, or
/// there are more than [`SPELLING_WORDS_MAX`] words or [`SPELLINGS_MAX`] spellings.
fn spellings(words: &[String]) -> Option<packed::Searcher> {
    if words.len() > SPELLING_WORDS_MAX {
        return None;
    }
    let mut prefixes: Vec<&[u8]> = Vec::new();
    for w in words {
        let prefix = w.as_bytes().get(..SPELLING_LEN)?;
        if !prefixes.contains(&prefix) {
            prefixes.push(prefix);
        }
    }
    let mut all: Vec<Vec<u8>> = Vec::new();
    for prefix in prefixes {
        let mut spelled = vec![Vec::with_capacity(SPELLING_LEN)];
        for &b in prefix {
            let upper = b.to_ascii_uppercase();
            let mut next = Vec::with_capacity(spelled.len() * 2);
            for s in &spelled {
                for c in std::iter::once(b).chain((upper != b).then_some(upper)) {
                    let mut t: Vec<u8> = s.clone();
                    t.push(c);
                    next.push(t);
                }
            }
            spelled = next;
        }
        all.extend(spelled);
        if all.len() > SPELLINGS_MAX {
            return None;
        }
    }
    packed::Config::new()
        .match_kind(packed::MatchKind::LeftmostFirst)
        .builder()
        .extend(&all)
        .build()
}

/// A text up to this long (a streamed piece) is lower-cased in a buffer on the stack,
/// and checked for a regex's first bytes before the regex runs.
const SHORT_TEXT: usize = 256;

struct RegexRule {
    regex: Regex,
    rule: usize,
    detector: Option<Detector>,
    /// The shortest match, in bytes (`usize::MAX`: it matches nothing).
    shortest: usize,
    /// The longest match, in bytes (`None`: unbounded).
    longest: Option<usize>,
    /// The bytes a match can contain.
    bytes: ByteSet,
    /// The bytes a match can start with (`None`: it can be empty).
    first: Option<ByteSet>,
    /// What else the start of a match needs (a word boundary, a prefix).
    starts: Starts,
}

impl RegexRule {
    /// Whether a match could start at `text[p]` (for all the text after it shows).
    fn may_start_at(&self, text: &[u8], p: usize) -> bool {
        self.first.as_ref().is_none_or(|f| f.contains(text[p])) && self.starts.may_start_at(text, p)
    }
}

/// A set of bytes. Bytes past ASCII are all in or all out, so a byte outside the set
/// always ends a whole character.
#[derive(Clone, Copy)]
struct ByteSet([bool; 256]);

impl ByteSet {
    fn empty() -> Self {
        Self([false; 256])
    }

    /// The bytes any match of `hir` can contain (look-arounds match none).
    fn of(hir: &Hir) -> Self {
        let mut set = Self::empty();
        set.add(hir);
        set.widen()
    }

    /// The bytes a match of `hir` can start with; `None` when it can match the empty
    /// text (then it can start anywhere).
    fn first_of(hir: &Hir) -> Option<Self> {
        let mut set = Self::empty();
        (!set.add_first(hir)).then(|| set.widen())
    }

    fn widen(mut self) -> Self {
        if self.0[0x80..].iter().any(|&b| b) {
            self.0[0x80..].fill(true);
        }
        self
    }

    fn add(&mut self, hir: &Hir) {
        match hir.kind() {
            HirKind::Empty | HirKind::Look(_) => {}
            HirKind::Literal(lit) => lit.0.iter().for_each(|&b| self.0[usize::from(b)] = true),
            HirKind::Class(class) => self.add_class(class),
            HirKind::Repetition(rep) => self.add(&rep.sub),
            HirKind::Capture(cap) => self.add(&cap.sub),
            HirKind::Concat(subs) | HirKind::Alternation(subs) => {
                subs.iter().for_each(|h| self.add(h))
            }
        }
    }

    /// Adds the bytes a match of `hir` can start with; returns whether it can be empty.
    fn add_first(&mut self, hir: &Hir) -> bool {
        match hir.kind() {
            HirKind::Empty | HirKind::Look(_) => true,
            HirKind::Literal(lit) => match lit.0.first() {
                Some(&b) => {
                    self.0[usize::from(b)] = true;
                    false
                }
                None => true,
            },
            HirKind::Class(class) => {
                self.add_class(class);
                false
            }
            HirKind::Repetition(rep) => self.add_first(&rep.sub) || rep.min == 0,
            HirKind::Capture(cap) => self.add_first(&cap.sub),
            HirKind::Concat(subs) => subs.iter().all(|h| self.add_first(h)),
            HirKind::Alternation(subs) => {
                // Every branch adds its first bytes: no short circuit.
                let mut empty = false;
                for h in subs {
                    empty |= self.add_first(h);
                }
                empty
            }
        }
    }

    fn add_class(&mut self, class: &Class) {
        match class {
            Class::Bytes(c) => {
                for r in c.ranges() {
                    self.0[usize::from(r.start())..=usize::from(r.end())].fill(true);
                }
            }
            Class::Unicode(c) => {
                for r in c.ranges() {
                    let (start, end) = (u32::from(r.start()), u32::from(r.end()));
                    if start < 0x80 {
                        self.0[start as usize..=end.min(0x7f) as usize].fill(true);
                    }
                    if end >= 0x80 {
                        self.0[0x80..].fill(true);
                    }
                }
            }
        }
    }

    fn contains(&self, b: u8) -> bool {
        self.0[usize::from(b)]
    }

    /// Adds every byte of `other`.
    fn add_all(&mut self, other: &ByteSet) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine |= theirs;
        }
    }

    /// The bytes `words` start with, in both ASCII cases with `ignore_case`.
    fn starts_of(words: &[String], ignore_case: bool) -> Self {
        let mut set = Self::empty();
        for &b in words.iter().filter_map(|w| w.as_bytes().first()) {
            set.0[usize::from(b)] = true;
            if ignore_case {
                set.0[usize::from(b.to_ascii_uppercase())] = true;
            }
        }
        set
    }
}

/// A compiled set of rules' patterns.
pub struct Matcher {
    automata: Vec<Automaton>,
    regexes: Vec<RegexRule>,
    /// The longest literal, in bytes.
    longest_literal: usize,
    /// Every byte a match of any pattern can start with: a short text (a streamed
    /// piece) with none of them is settled without asking each pattern.
    starters: ByteSet,
}

impl std::fmt::Debug for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matcher")
            .field("automata", &self.automata.len())
            .field("regexes", &self.regexes.len())
            .field("longest_literal", &self.longest_literal)
            .finish()
    }
}

/// What a regex's matches can be: their longest length (`None`: unbounded), the bytes
/// they can contain and start with.
struct Shape {
    shortest: Option<usize>,
    longest: Option<usize>,
    bytes: ByteSet,
    first: Option<ByteSet>,
    starts: Starts,
}

fn shape(pattern: &str) -> Result<Shape, PatternError> {
    let hir = regex_syntax::parse(pattern).map_err(|e| PatternError::Regex(e.to_string()))?;
    Ok(Shape {
        shortest: hir.properties().minimum_len(),
        longest: hir.properties().maximum_len(),
        bytes: ByteSet::of(&hir),
        first: ByteSet::first_of(&hir),
        starts: Starts::of(&hir),
    })
}

impl Matcher {
    /// Compiles the patterns of rules `0..patterns.len()`. With `bounded`, every regex
    /// must have a maximum match length (streams need one). Errors are per rule.
    pub fn new(patterns: &[Pattern], bounded: bool) -> Result<Self, Vec<(usize, PatternError)>> {
        let mut errors = Vec::new();
        let mut by_case: [(Vec<String>, Vec<usize>); 2] = Default::default();
        let mut regexes = Vec::new();
        for (rule, pattern) in patterns.iter().enumerate() {
            let (source, detector) = match pattern {
                Pattern::Literals {
                    words,
                    case_sensitive,
                } => {
                    if words.is_empty() || words.iter().any(String::is_empty) {
                        errors.push((rule, PatternError::EmptyLiteral));
                    }
                    let slot = &mut by_case[usize::from(!*case_sensitive)];
                    for w in words.iter().filter(|w| !w.is_empty()) {
                        slot.0.push(w.clone());
                        slot.1.push(rule);
                    }
                    continue;
                }
                Pattern::Regex(source) => (source.as_str(), None),
                Pattern::Detector(d) => (d.pattern(), Some(*d)),
            };
            let shape = match shape(source) {
                Ok(shape) => shape,
                Err(e) => {
                    errors.push((rule, e));
                    continue;
                }
            };
            // An empty match found first would hide a real one after it (the search
            // stops there), and where it is found depends on where the search starts.
            if shape.shortest == Some(0) {
                errors.push((rule, PatternError::MatchesEmpty));
                continue;
            }
            if bounded && shape.longest.is_none() {
                errors.push((rule, PatternError::Unbounded));
                continue;
            }
            match Regex::new(source) {
                Ok(regex) => regexes.push(RegexRule {
                    regex,
                    rule,
                    detector,
                    shortest: shape.shortest.unwrap_or(usize::MAX),
                    longest: shape.longest,
                    bytes: shape.bytes,
                    first: shape.first,
                    starts: shape.starts,
                }),
                Err(e) => errors.push((rule, PatternError::Regex(e.to_string()))),
            }
        }
        let mut automata = Vec::new();
        let mut longest_literal = 0;
        for (i, (words, rules)) in by_case.into_iter().enumerate() {
            if words.is_empty() {
                continue;
            }
            let ignore_case = i == 1;
            longest_literal = longest_literal.max(words.iter().map(String::len).max().unwrap_or(0));
            // Case is ignored by searching lower-cased text for lower-cased words: the
            // automaton then keeps its fast literal prefilter (with ASCII case folding
            // it must step through every byte of a prompt itself; 64 KiB of prompt took
            // ~95 us that way). Lower-casing ASCII keeps every byte offset.
            let folded: Vec<String> = if ignore_case {
                words.iter().map(|w| w.to_ascii_lowercase()).collect()
            } else {
                words.clone()
            };
            let ac = AhoCorasickBuilder::new()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&folded);
            let packed = packed::Config::new()
                .match_kind(packed::MatchKind::LeftmostLongest)
                .builder()
                .extend(&folded)
                .build();
            match ac {
                Ok(ac) => automata.push(Automaton {
                    ac,
                    packed,
                    spellings: if ignore_case {
                        spellings(&folded)
                    } else {
                        None
                    },
                    rules,
                    starts: ByteSet::starts_of(&folded, ignore_case),
                    longest: folded.iter().map(String::len).max().unwrap_or(1),
                    words: folded.into_iter().map(String::into_bytes).collect(),
                    ignore_case,
                }),
                Err(e) => errors.push((rules[0], PatternError::Regex(e.to_string()))),
            }
        }
        if errors.is_empty() {
            let mut starters = ByteSet::empty();
            for r in &regexes {
                match &r.first {
                    Some(first) => starters.add_all(first),
                    None => starters.0.fill(true),
                }
            }
            for a in &automata {
                starters.add_all(&a.starts);
            }
            Ok(Self {
                automata,
                regexes,
                longest_literal,
                starters,
            })
        } else {
            Err(errors)
        }
    }

    /// A matcher that matches nothing.
    pub fn empty() -> Self {
        Self {
            automata: Vec::new(),
            regexes: Vec::new(),
            longest_literal: 0,
            starters: ByteSet::empty(),
        }
    }

    /// Whether `text[pos..]` is a short text in which no match can start.
    fn settled_short(&self, text: &str, pos: usize) -> bool {
        let rest = text.as_bytes().get(pos..).unwrap_or_default();
        rest.len() <= SHORT_TEXT && !rest.iter().any(|&b| self.starters.contains(b))
    }

    pub fn is_empty(&self) -> bool {
        self.automata.is_empty() && self.regexes.is_empty()
    }

    /// The leftmost match starting at or after `pos` (longest at the same start, then
    /// the lowest rule).
    pub fn find_at(&self, text: &str, pos: usize) -> Option<Match> {
        if self.settled_short(text, pos) {
            return None;
        }
        let mut best: Option<Match> = None;
        let mut consider = |m: Match| {
            let better = match best {
                None => true,
                Some(b) => {
                    (m.start, std::cmp::Reverse(m.end), m.rule)
                        < (b.start, std::cmp::Reverse(b.end), b.rule)
                }
            };
            if better {
                best = Some(m);
            }
        };
        for a in &self.automata {
            if let Some((start, end, pattern)) = a.find_at(text.as_bytes(), pos) {
                consider(Match {
                    start,
                    end,
                    rule: a.rules[pattern],
                });
            }
        }
        for r in &self.regexes {
            // A streamed piece is a few bytes: shorter than any match (an API key is
            // 23 or more), or with none that can start one, it is not worth starting
            // the regex (a long text is left to the regex's own prefilter).
            let rest = text.as_bytes().get(pos..).unwrap_or_default();
            if rest.len() < r.shortest {
                continue;
            }
            if rest.len() <= SHORT_TEXT
                && !(pos..text.len()).any(|p| r.may_start_at(text.as_bytes(), p))
            {
                continue;
            }
            let mut from = pos;
            while let Some(m) = r.regex.find_at(text, from) {
                if r.detector.is_none_or(|d| d.accepts(m.as_str())) {
                    if m.start() < m.end() {
                        consider(Match {
                            start: m.start(),
                            end: m.end(),
                            rule: r.rule,
                        });
                    }
                    break;
                }
                // A look-alike (say, a number failing Luhn): look past its first char.
                from = next_char(text, m.start());
                if from > text.len() {
                    break;
                }
            }
        }
        best
    }

    /// Every non-overlapping match, left to right.
    pub fn find_iter<'t>(&'t self, text: &'t str) -> impl Iterator<Item = Match> + 't {
        let mut pos = 0;
        std::iter::from_fn(move || {
            let m = self.find_at(text, pos)?;
            pos = m.end;
            Some(m)
        })
    }

    /// For a text that may continue: the earliest index at or after `pos` where a match
    /// could still start once more text arrives. Bytes before it are settled.
    pub fn hold_from(&self, text: &str, pos: usize) -> usize {
        let len = text.len();
        if self.settled_short(text, pos) {
            return len.max(pos);
        }
        let mut hold = len;
        for r in &self.regexes {
            // A match starting before `len - longest` cannot reach the end (nor depend on
            // the next character, as \b and $ do), none can span a byte it cannot
            // contain, and each starts with one of its first bytes: the earliest such
            // byte after the last one no match can contain is where the text is open.
            let window = r
                .longest
                .map_or(pos, |longest| len.saturating_sub(longest).max(pos));
            let tail = &text.as_bytes()[window..];
            let mut open = tail
                .iter()
                .rposition(|&b| !r.bytes.contains(b))
                .map_or(window, |i| window + i + 1);
            // Of those, the first where a match could start (its first byte, the
            // boundary or prefix it opens with).
            if r.first.is_some() {
                open = (open..len)
                    .find(|&p| r.may_start_at(text.as_bytes(), p))
                    .unwrap_or(len);
            }
            hold = hold.min(floor_char(text, open));
        }
        if self.longest_literal > 1 {
            let first = floor_char(text, len.saturating_sub(self.longest_literal - 1));
            for p in (first.max(pos)..hold).filter(|p| text.is_char_boundary(*p)) {
                if self.is_literal_prefix(&text.as_bytes()[p..]) {
                    hold = p;
                    break;
                }
            }
        }
        hold.max(pos)
    }

    fn is_literal_prefix(&self, tail: &[u8]) -> bool {
        self.automata.iter().any(|a| {
            a.words.iter().any(|w| {
                w.len() > tail.len()
                    && if a.ignore_case {
                        w[..tail.len()]
                            .iter()
                            .zip(tail)
                            .all(|(x, y)| *x == y.to_ascii_lowercase())
                    } else {
                        w.starts_with(tail)
                    }
            })
        })
    }
}

fn next_char(text: &str, i: usize) -> usize {
    text[i..]
        .chars()
        .next()
        .map_or(text.len() + 1, |c| i + c.len_utf8())
}

fn floor_char(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lits(words: &[&str], case_sensitive: bool) -> Pattern {
        Pattern::Literals {
            words: words.iter().map(|w| w.to_string()).collect(),
            case_sensitive,
        }
    }

    #[test]
    fn leftmost_then_longest_then_first_rule() {
        let m = Matcher::new(
            &[
                lits(&["ab"], true),
                lits(&["abcd"], true),
                Pattern::Regex("b.".into()),
            ],
            false,
        )
        .unwrap();
        let found: Vec<_> = m
            .find_iter("xxabcd ab bz")
            .map(|m| (m.start, m.end, m.rule))
            .collect();
        assert_eq!(found, vec![(2, 6, 1), (7, 9, 0), (10, 12, 2)]);
    }

    #[test]
    fn case_modes_and_detectors_coexist() {
        let m = Matcher::new(
            &[
                lits(&["Secret"], true),
                lits(&["password"], false),
                Pattern::Detector(Detector::CreditCard),
            ],
            false,
        )
        .unwrap();
        let rules: Vec<_> = m
            .find_iter("secret Secret PASSWORD 4111111111111111 4111111111111112")
            .map(|m| m.rule)
            .collect();
        assert_eq!(rules, vec![0, 1, 2]);
    }

    #[test]
    fn hold_keeps_only_what_could_still_match() {
        let m = Matcher::new(&[lits(&["rabbit", "rat"], false)], true).unwrap();
        assert_eq!(m.hold_from("a big RAB", 0), 6, "'RAB' may become 'rabbit'");
        assert_eq!(
            m.hold_from("a big rabbix", 0),
            12,
            "nothing can start in 'rabbix'"
        );
        assert_eq!(m.hold_from("a big ra", 0), 6);
        assert_eq!(m.hold_from("a big r", 7), 7, "never before pos");
        let r = Matcher::new(&[Pattern::Regex(r"\bab{1,3}\b".into())], true).unwrap();
        // Its longest match is 4 bytes: one starting in the last 4 could still grow, or
        // hinge on the \b after it; but a match holds only `a` and `b`.
        assert_eq!(r.hold_from("0123 abbb", 0), 5);
        assert_eq!(r.hold_from("0123 a-abab", 0), 7);
        // And after a word character no match can start: \b would not hold there.
        assert_eq!(
            r.hold_from("0123abbb", 0),
            8,
            "no match starts inside a word"
        );
        assert_eq!(r.hold_from("0123 ababab", 0), 11);
        assert_eq!(r.hold_from("0123abbbbb", 0), 10, "a match starts with `a`");
        assert_eq!(r.hold_from("01234 ab", 0), 6);
        assert_eq!(r.hold_from("0123456789", 0), 10);
        assert_eq!(r.hold_from("0123bbbb", 0), 8);
        // Every branch of an alternation gives its first bytes, after an empty one too.
        let alt = Matcher::new(&[Pattern::Regex(r"(?:a{0,1}|b)c{1,2}".into())], true).unwrap();
        assert_eq!(alt.hold_from("00b", 0), 2);
        assert_eq!(alt.hold_from("00d", 0), 3);
        // Past ASCII, a class of letters lets any non-ASCII character through.
        let w = Matcher::new(&[Pattern::Regex(r"\w{1,6}".into())], true).unwrap();
        assert_eq!(w.hold_from("ab, żółw", 0), 4);
    }

    #[test]
    fn errors_name_their_rule() {
        let errs = Matcher::new(
            &[
                lits(&[""], true),
                Pattern::Regex("(".into()),
                Pattern::Regex("a+".into()),
                Pattern::Regex("a{0,3}|b".into()),
            ],
            true,
        )
        .unwrap_err();
        let rules: Vec<_> = errs.iter().map(|(r, _)| *r).collect();
        assert_eq!(rules, vec![0, 1, 2, 3]);
        assert_eq!(errs[2].1, PatternError::Unbounded);
        // An empty match would stop the search before a real one: streams and whole
        // texts would disagree (found by the policy_loader fuzz target).
        assert_eq!(errs[3].1, PatternError::MatchesEmpty);
        assert!(Matcher::new(&[Pattern::Regex("x*".into())], false).is_err());
        assert!(
            Matcher::new(&[Pattern::Regex("a+".into())], false).is_ok(),
            "prompt rules may be unbounded"
        );
    }

    #[test]
    fn a_case_ignoring_match_across_a_window_end_is_found_whole() {
        let m = Matcher::new(&[lits(&["a", "aaaaaa", "bcd"], false)], false).unwrap();
        // Around the window's end, and around the largest text folded on the stack.
        for off in (FOLD_WINDOW - 8..FOLD_WINDOW + 8).chain(SHORT_TEXT - 12..SHORT_TEXT + 4) {
            // The longer word at the same start wins, though the shorter fits the window.
            let text = format!("{}AaAaAa", " ".repeat(off));
            let found: Vec<_> = m.find_iter(&text).map(|f| (f.start, f.end)).collect();
            assert_eq!(found, [(off, off + 6)], "at {off}");
            // A word that only fits across the window's end.
            let text = format!("{}BcD xyz {}BCD", " ".repeat(off), " ".repeat(off));
            let found: Vec<_> = m.find_iter(&text).map(|f| f.start).collect();
            assert_eq!(found, [off, 2 * off + 8], "at {off}");
        }
    }

    proptest::proptest! {
        /// A regex rule finds what the regex finds, on short texts (where the matcher
        /// looks for a first byte before running it) and long ones.
        #[test]
        fn regex_rules_find_what_the_regex_finds(
            text in "[0-9a-z \\-@.Ss]{0,40}|[0-9a-z \\-]{200,300}",
            re in proptest::sample::select(vec![
                r"\b\d{3}-\d{2}-\d{4}\b", r"\bsk-[a-z0-9]{3,8}", r"(?i)\bdrop\s{1,8}table\b",
                r"[a-z]{1,4}@[a-z]{1,4}\.[a-z]{2,3}", r"9{1,3}",
            ]),
            pos in 0usize..40,
        ) {
            let m = Matcher::new(&[Pattern::Regex(re.to_owned())], true).unwrap();
            let reference = Regex::new(re).unwrap();
            let pos = pos.min(text.len());
            let found = m.find_at(&text, pos).map(|f| (f.start, f.end));
            let expected = reference.find_at(&text, pos).map(|f| (f.start(), f.end()));
            proptest::prop_assert_eq!(found, expected);
        }
    }

    #[test]
    fn a_case_ignoring_search_by_first_bytes_finds_every_word() {
        let m = Matcher::new(
            &[lits(&["ignore previous", "Ignore all", "disregard"], false)],
            false,
        )
        .unwrap();
        assert!(m.automata[0].spellings.is_some());
        // Past a run of starts that finish no word (the search folds from there on),
        // and with a longer word at the same start.
        let decoys = "IGNorance dis ".repeat(SPELLING_MISSES);
        for (lead, expected) in [("", 0), (decoys.as_str(), decoys.len())] {
            let text = format!(
                "{lead}IGNORE ALL of it, iGnOrE PrEvIoUs; DISREGARD{}",
                " ".repeat(SHORT_TEXT)
            );
            let found: Vec<_> = m
                .find_iter(&text)
                .map(|f| (f.start, f.end, f.rule))
                .collect();
            let at = expected;
            assert_eq!(
                found,
                [
                    (at, at + 10, 0),
                    (at + 18, at + 33, 0),
                    (at + 35, at + 44, 0)
                ]
            );
        }
        // The longest word at the same start, in a long text and a short one.
        let nested = Matcher::new(&[lits(&["abc", "abcdef"], false)], false).unwrap();
        assert!(nested.automata[0].spellings.is_some());
        for pad in [SHORT_TEXT, 0] {
            let text = format!("xx ABCDEF{}", " ".repeat(pad));
            let found = nested.find_at(&text, 0).map(|f| (f.start, f.end));
            assert_eq!(found, Some((3, 9)), "after {pad} spaces");
        }
        // Words shorter than a spelling, too many spellings or words: searched folded.
        assert!(Matcher::new(&[lits(&["ab", "abcd"], false)], false)
            .unwrap()
            .automata[0]
            .spellings
            .is_none());
        let many: Vec<String> = (0..9)
            .map(|i| format!("w{}rd", (b'a' + i) as char))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(
            Matcher::new(&[lits(&many, false)], false).unwrap().automata[0]
                .spellings
                .is_none()
        );
        let shared: Vec<String> = (0..=SPELLING_WORDS_MAX)
            .map(|i| format!("abc{i}"))
            .collect();
        let shared: Vec<&str> = shared.iter().map(String::as_str).collect();
        assert!(Matcher::new(&[lits(&shared[1..], false)], false)
            .unwrap()
            .automata[0]
            .spellings
            .is_some());
        assert!(Matcher::new(&[lits(&shared, false)], false)
            .unwrap()
            .automata[0]
            .spellings
            .is_none());
    }

    /// The reference for literal searches: an automaton folding ASCII case itself.
    fn folding_automaton(words: &[&str], case_sensitive: bool) -> AhoCorasick {
        AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .ascii_case_insensitive(!case_sensitive)
            .build(words)
            .unwrap()
    }

    proptest::proptest! {
        /// A short text (a streamed piece) is read directly: the matches are still the
        /// automaton's, from any start.
        #[test]
        fn short_texts_find_what_case_folding_finds(
            text in "[abAB é]{0,40}",
            words in proptest::collection::vec("[abAé]{1,5}", 1..5),
            pos in 0usize..42,
        ) {
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            for case_sensitive in [false, true] {
                let m = Matcher::new(&[lits(&words, case_sensitive)], true).unwrap();
                let reference = folding_automaton(&words, case_sensitive);
                let pos = pos.min(text.len());
                let expected = reference
                    .find(Input::new(&text).range(pos..))
                    .map(|f| (f.start(), f.end()));
                let found = m.find_at(&text, pos).map(|f| (f.start, f.end));
                proptest::prop_assert_eq!(found, expected, "case sensitive: {}", case_sensitive);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Case is ignored by lower-casing windows of the text: the matches are those of
        /// an automaton folding ASCII case itself, across window ends too.
        #[test]
        fn folded_windows_find_what_case_folding_finds(
            text in "[abAB é]{0,9000}|([ é]{3000,4200}[abAé]{1,14}){1,3}",
            // Words of three bytes or more are found by their first bytes' spellings.
            words in proptest::prop_oneof![
                proptest::collection::vec("[abAé]{1,12}", 1..4),
                proptest::collection::vec("[abAé][abAé ]{2,11}", 1..4),
            ],
        ) {
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            // Case ignored (folded windows), then kept (the packed searcher alone): the
            // matches are the automaton's.
            for case_sensitive in [false, true] {
                let m = Matcher::new(&[lits(&words, case_sensitive)], false).unwrap();
                let reference = folding_automaton(&words, case_sensitive);
                let expected: Vec<(usize, usize)> =
                    reference.find_iter(&text).map(|f| (f.start(), f.end())).collect();
                let found: Vec<(usize, usize)> =
                    m.find_iter(&text).map(|f| (f.start, f.end)).collect();
                proptest::prop_assert_eq!(found, expected, "case sensitive: {}", case_sensitive);
            }
        }
    }
}
