//! The words of the benches' generated bodies (those of `llm_bodies.py`), drawn by a
//! fixed-seed generator: `request` writes prose of them, `stream` streams them.

const WORDS: &str = "the cluster gateway routes each request to a model and meters the tokens it \
    uses while the platform team reviews latency budgets namespaces and rollout plans for \
    inference services running on shared nodes with quotas dashboards alerts and careful \
    capacity planning across regions zones and release trains this week";

/// Draws words from a seed (xorshift64: deterministic, no dependency).
pub struct Words {
    seed: u64,
    words: Vec<&'static str>,
}

impl Words {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            words: WORDS.split_whitespace().collect(),
        }
    }

    /// The next draw: a word, and whether a sentence ends after the word before it (one
    /// draw in 13).
    pub fn next(&mut self) -> (&'static str, bool) {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let word = self.words[(self.seed >> 8) as usize % self.words.len()];
        (word, self.seed.is_multiple_of(13))
    }
}
