//! Token counting with tiktoken-rs, for estimates when a provider reports no usage and
//! for prompt estimates before a request is sent. Each encoding is built once, on first
//! use, and shared by every caller.

use std::sync::{Arc, OnceLock};

use tiktoken_rs::CoreBPE;

/// The BPE encodings the counter knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// GPT-4, GPT-3.5 and, as the closest public stand-in, open models.
    Cl100kBase,
    /// GPT-4o, GPT-4.1, the o-series and GPT-5.
    O200kBase,
}

impl Encoding {
    /// The encoding a model name most likely uses.
    pub fn for_model(model: &str) -> Self {
        let model = model.rsplit('/').next().unwrap_or(model);
        const O200K_PREFIXES: [&str; 7] =
            ["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4"];
        if O200K_PREFIXES.iter().any(|p| model.starts_with(p)) || model.starts_with("chatgpt-4o") {
            Encoding::O200kBase
        } else {
            Encoding::Cl100kBase
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::Cl100kBase => "cl100k_base",
            Encoding::O200kBase => "o200k_base",
        }
    }
}

/// The embedded BPE data of an encoding could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("tokenizer {encoding} could not be built: {message}")]
pub struct TokenizerError {
    pub encoding: &'static str,
    pub message: String,
}

/// Counts tokens. Cheap to clone; clones share the built encodings.
#[derive(Clone, Default)]
pub struct TokenCounter {
    inner: Arc<Encoders>,
}

#[derive(Default)]
struct Encoders {
    cl100k: OnceLock<Result<CoreBPE, String>>,
    o200k: OnceLock<Result<CoreBPE, String>>,
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCounter").finish_non_exhaustive()
    }
}

impl TokenCounter {
    pub fn new() -> Self {
        Self::default()
    }

    fn encoder(&self, encoding: Encoding) -> Result<&CoreBPE, TokenizerError> {
        let (cell, build): (&OnceLock<builders::R>, fn() -> builders::R) = match encoding {
            Encoding::Cl100kBase => (&self.inner.cl100k, builders::cl100k),
            Encoding::O200kBase => (&self.inner.o200k, builders::o200k),
        };
        cell.get_or_init(build)
            .as_ref()
            .map_err(|message| TokenizerError {
                encoding: encoding.name(),
                message: message.clone(),
            })
    }

    /// Builds an encoding now, so the first request does not pay for it.
    pub fn warm(&self, encoding: Encoding) -> Result<(), TokenizerError> {
        self.encoder(encoding).map(|_| ())
    }

    /// Tokens in `text` under `encoding`. Special-token text counts as ordinary text,
    /// since it came from a user, not from a template. Linear in the text's length: a
    /// run of more than [`MAX_RUN`] bytes without a change between whitespace and
    /// non-whitespace is counted in chunks (exact for text without such runs).
    pub fn count(&self, encoding: Encoding, text: &str) -> Result<u64, TokenizerError> {
        if text.is_empty() {
            return Ok(0);
        }
        let bpe = self.encoder(encoding)?;
        Ok(segments(text)
            .map(|s| bpe.encode_ordinary(s).len() as u64)
            .sum())
    }

    /// Tokens in `text` for `model`.
    pub fn count_for_model(&self, model: &str, text: &str) -> Result<u64, TokenizerError> {
        self.count(Encoding::for_model(model), text)
    }

    /// `text` cut into its tokens' strings, in order; they concatenate back to `text`
    /// wherever a token boundary falls on a character boundary.
    pub fn pieces(&self, encoding: Encoding, text: &str) -> Result<Vec<String>, TokenizerError> {
        let bpe = self.encoder(encoding)?;
        let tokens = bpe.encode_ordinary(text);
        let mut out = Vec::with_capacity(tokens.len());
        let mut pending: Vec<u32> = Vec::new();
        for token in tokens {
            pending.push(token);
            // A multi-byte character can span tokens: hold them until they decode.
            if let Ok(piece) = bpe.decode(&pending) {
                out.push(piece);
                pending.clear();
            }
        }
        if !pending.is_empty() {
            out.push(bpe.decode(&pending).map_err(|e| TokenizerError {
                encoding: encoding.name(),
                message: e.to_string(),
            })?);
        }
        Ok(out)
    }
}

/// The longest run of whitespace or of non-whitespace given to BPE whole. tiktoken's
/// pre-split keeps a run of letters (or of spaces) as one piece, and BPE's time on a
/// piece grows with the square of its length: one unbroken 5 MB "word" took seconds and
/// hundreds of MB. Words, numbers and indentation in real text are far shorter, so their
/// counts stay exact; a longer run (a base64 blob, a hash, a wall of letters) is cut
/// into chunks of this size, each a token or so off where it was cut.
pub const MAX_RUN: usize = 256;

/// `text` cut inside runs longer than [`MAX_RUN`] bytes (at character boundaries), and
/// nowhere else.
fn segments(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut run_start = 0;
        let mut run_space = None;
        let mut cut = rest.len();
        for (i, c) in rest.char_indices() {
            let space = c.is_whitespace();
            if run_space != Some(space) {
                run_space = Some(space);
                run_start = i;
            } else if i - run_start >= MAX_RUN {
                cut = i;
                break;
            }
        }
        let (segment, tail) = rest.split_at(cut);
        rest = tail;
        Some(segment)
    })
}

/// The encodings, built from the vocabularies packed in `policy/assets` (1.5 MB instead
/// of the 5.3 MB of base64 text tiktoken-rs would embed: the image's size). Errors stay
/// plain strings.
mod builders {
    use rustc_hash::FxHashMap;
    use tiktoken_rs::{CoreBPE, Rank};

    pub type R = Result<CoreBPE, String>;

    static CL100K: &[u8] = include_bytes!("../assets/cl100k_base.ranks.zlib");
    static O200K: &[u8] = include_bytes!("../assets/o200k_base.ranks.zlib");

    /// How cl100k_base splits text before BPE (its published definition).
    const CL100K_PATTERN: &str = concat!(
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+",
        r"| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s",
    );

    /// Token bytes to rank: each token's length (one byte) then its bytes, in rank order.
    fn ranks(packed: &[u8]) -> Result<FxHashMap<Vec<u8>, Rank>, String> {
        let raw = miniz_oxide::inflate::decompress_to_vec_zlib(packed)
            .map_err(|e| format!("the packed vocabulary does not inflate: {e:?}"))?;
        let mut map = FxHashMap::default();
        let mut rest = &raw[..];
        let mut rank: Rank = 0;
        while let Some((&len, tail)) = rest.split_first() {
            let len = usize::from(len);
            if tail.len() < len {
                return Err(format!("the packed vocabulary ends inside token {rank}"));
            }
            map.insert(tail[..len].to_vec(), rank);
            rank += 1;
            rest = &tail[len..];
        }
        Ok(map)
    }

    fn special(tokens: &[(&str, Rank)]) -> FxHashMap<String, Rank> {
        tokens.iter().map(|&(t, r)| (t.to_owned(), r)).collect()
    }

    pub fn cl100k() -> R {
        let special = special(&[
            ("<|endoftext|>", 100_257),
            ("<|fim_prefix|>", 100_258),
            ("<|fim_middle|>", 100_259),
            ("<|fim_suffix|>", 100_260),
            ("<|endofprompt|>", 100_276),
        ]);
        CoreBPE::new(ranks(CL100K)?, special, CL100K_PATTERN).map_err(|e| e.to_string())
    }

    pub fn o200k() -> R {
        let special = special(&[("<|endoftext|>", 199_999), ("<|endofprompt|>", 200_018)]);
        CoreBPE::new(ranks(O200K)?, special, tiktoken_rs::O200K_BASE_PAT_STR)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_encoding_by_model() {
        assert_eq!(Encoding::for_model("gpt-4o-mini"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("openai/gpt-5"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("o3-mini"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("gpt-4"), Encoding::Cl100kBase);
        assert_eq!(Encoding::for_model("llama3.2:1b"), Encoding::Cl100kBase);
    }

    #[test]
    fn counts_known_strings() {
        let c = TokenCounter::new();
        // Reference counts from the published cl100k_base / o200k_base vocabularies.
        assert_eq!(c.count(Encoding::Cl100kBase, "hello world").unwrap(), 2);
        assert_eq!(c.count(Encoding::O200kBase, "hello world").unwrap(), 2);
        assert_eq!(c.count(Encoding::Cl100kBase, "").unwrap(), 0);
        assert_eq!(
            c.count(Encoding::Cl100kBase, "<|endoftext|>").unwrap(),
            c.pieces(Encoding::Cl100kBase, "<|endoftext|>")
                .unwrap()
                .len() as u64
        );
    }

    #[test]
    fn ordinary_text_is_one_segment_and_long_runs_are_cut() {
        let text = "Grüße, 世界! A sentence with   spaces,\n\tindentation and 1234567 numbers.";
        assert_eq!(segments(text).collect::<Vec<_>>(), vec![text]);
        let word = "é".repeat(1000); // 2,000 bytes, one run
        let parts: Vec<_> = segments(&word).collect();
        assert_eq!(parts.concat(), word);
        assert!(parts.iter().all(|p| p.len() <= MAX_RUN + 1), "{parts:?}");
        assert_eq!(parts.len(), 2000usize.div_ceil(MAX_RUN));
        let spaces = format!("a{}b", " ".repeat(3 * MAX_RUN));
        assert_eq!(segments(&spaces).count(), 3);
    }

    #[test]
    fn counts_of_ordinary_text_are_unchanged() {
        // The whole-text count (tiktoken alone) against the segmented one, on text whose
        // runs are all shorter than MAX_RUN: identical.
        let c = TokenCounter::new();
        let corpus = [
            include_str!("../../README.md"),
            include_str!("tokens.rs"),
            "Ünïcödé text, 日本語のテキスト, emoji 🙂🙂🙂 and\r\n\r\nblank lines.",
        ];
        for text in corpus {
            for enc in [Encoding::Cl100kBase, Encoding::O200kBase] {
                let bpe = c.encoder(enc).unwrap();
                assert_eq!(
                    c.count(enc, text).unwrap(),
                    bpe.encode_ordinary(text).len() as u64
                );
            }
        }
    }

    #[test]
    fn one_long_word_is_counted_in_linear_time_and_near_its_true_count() {
        let c = TokenCounter::new();
        let word = "abcdefghij".repeat(2_000); // 20 kB: still quick for BPE whole
        let bpe = c.encoder(Encoding::Cl100kBase).unwrap();
        let whole = bpe.encode_ordinary(&word).len() as f64;
        let cut = c.count(Encoding::Cl100kBase, &word).unwrap() as f64;
        assert!((cut - whole).abs() / whole < 0.05, "{cut} vs {whole}");
        // 2 MB in one run: BPE on it whole took seconds (release); in chunks, linear.
        let big = "x".repeat(2 << 20);
        assert!(c.count(Encoding::Cl100kBase, &big).unwrap() > 0);
    }

    #[test]
    fn the_packed_vocabularies_count_as_tiktoken_rs_does() {
        let ours = TokenCounter::new();
        let text = [
            include_str!("../../README.md"),
            include_str!("tokens.rs"),
            "Ünïcödé, 日本語のテキスト, emoji 🙂 and <|endoftext|> as text; 12345678 don't",
        ]
        .concat();
        for (enc, theirs) in [
            (Encoding::Cl100kBase, tiktoken_rs::cl100k_base().unwrap()),
            (Encoding::O200kBase, tiktoken_rs::o200k_base().unwrap()),
        ] {
            let bpe = ours.encoder(enc).unwrap();
            assert_eq!(bpe.encode_ordinary(&text), theirs.encode_ordinary(&text));
            let special = "a<|endoftext|>b<|endofprompt|>";
            assert_eq!(
                bpe.encode_with_special_tokens(special),
                theirs.encode_with_special_tokens(special)
            );
        }
    }

    #[test]
    fn pieces_concatenate_back() {
        let c = TokenCounter::new();
        let text = "Grüße, 世界! tokens🙂 and more";
        let pieces = c.pieces(Encoding::Cl100kBase, text).unwrap();
        assert_eq!(pieces.concat(), text);
        assert!(pieces.len() as u64 <= c.count(Encoding::Cl100kBase, text).unwrap());
    }
}
