//! Where a regex's match can start, beyond its first byte: after a word boundary when
//! the regex opens with one, and only where the text agrees with one of its literal
//! prefixes. A stream holds back text only from where a match could still start, so
//! these keep a plural's `s` from being held for `\bsk-...` (an API key), which had
//! changed most events of an ordinary answer.

use regex_syntax::hir::literal::{ExtractKind, Extractor};
use regex_syntax::hir::{Hir, HirKind, Look};

/// More prefixes than this are not worth comparing at every candidate start.
const PREFIXES_MAX: usize = 64;

/// What the start of every match of one regex must look like.
#[derive(Debug, Clone, Default)]
pub(crate) struct Starts {
    /// Every match begins at a word boundary or word start: none begins between two
    /// word characters.
    boundary: bool,
    /// Every match begins with one of these (`None`: no short list says).
    prefixes: Option<Vec<Vec<u8>>>,
}

impl Starts {
    pub(crate) fn of(hir: &Hir) -> Self {
        let seq = Extractor::new().kind(ExtractKind::Prefix).extract(hir);
        let prefixes = seq
            .literals()
            .filter(|lits| lits.len() <= PREFIXES_MAX && lits.iter().all(|l| !l.is_empty()))
            .map(|lits| lits.iter().map(|l| l.as_bytes().to_vec()).collect());
        Self {
            boundary: opens_with_boundary(hir),
            prefixes,
        }
    }

    /// Whether a match could start at `text[p]`, given the text around it (the text may
    /// go on past its end: a prefix longer than what is left only has to agree so far).
    pub(crate) fn may_start_at(&self, text: &[u8], p: usize) -> bool {
        let Some(&b) = text.get(p) else {
            return true;
        };
        // A word character after a word character is no boundary, ASCII or Unicode.
        if self.boundary && p > 0 && is_word_byte(b) && is_word_byte(text[p - 1]) {
            return false;
        }
        match &self.prefixes {
            None => true,
            Some(prefixes) => {
                let rest = &text[p..];
                prefixes.iter().any(|l| {
                    let n = l.len().min(rest.len());
                    rest[..n] == l[..n]
                })
            }
        }
    }
}

/// ASCII letters, digits and `_`: word characters for `\b` in both its modes.
fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Whether every match of `hir` begins with a look that needs a non-word character (or
/// the text's start) before a word character.
fn opens_with_boundary(hir: &Hir) -> bool {
    match hir.kind() {
        HirKind::Look(look) => matches!(
            look,
            Look::WordAscii
                | Look::WordUnicode
                | Look::WordStartAscii
                | Look::WordStartUnicode
                | Look::WordStartHalfAscii
                | Look::WordStartHalfUnicode
        ),
        HirKind::Capture(cap) => opens_with_boundary(&cap.sub),
        HirKind::Concat(subs) => subs.first().is_some_and(opens_with_boundary),
        HirKind::Alternation(subs) => subs.iter().all(opens_with_boundary),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts(pattern: &str) -> Starts {
        Starts::of(&regex_syntax::parse(pattern).unwrap())
    }

    #[test]
    fn a_boundary_regex_cannot_start_inside_a_word() {
        let s = starts(r"\bsk-[a-z]{3,9}");
        assert!(s.boundary);
        assert!(!s.may_start_at(b"regions", 6), "the plural's s");
        assert!(s.may_start_at(b"a s", 2));
        assert!(s.may_start_at(b"s", 0), "the text's start is a boundary");
        assert!(!s.may_start_at(b" so", 1), "no key starts with 'so'");
        assert!(s.may_start_at(b" sk-ab", 1));
        assert!(!starts(r"(?:\bab|cd)").boundary, "one branch has none");
        assert!(starts(r"(\bab|\b{start}cd)").boundary);
    }

    #[test]
    fn long_or_open_prefix_lists_are_not_kept() {
        assert!(starts(r"[0-9]{3}-[0-9]{4}").prefixes.is_none());
        assert!(starts(r"x?[a-z]{2}").prefixes.is_none());
        assert_eq!(
            starts(r"(?i)pin").prefixes.map(|p| p.len()),
            Some(8),
            "every case spelling"
        );
    }
}
