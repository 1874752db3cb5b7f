//! Token estimates for answers whose provider reported no usage, calibrated against the
//! answers of the same (upstream, model) that did. Pure: no I/O, no clock, no locks (the
//! caller owns one [`Calibration`] and feeds it from a single task, as the recorder
//! does), so every rule here is unit-tested.
//!
//! Why calibrate: the gateway counts with tiktoken (cl100k/o200k), which is far off for
//! open models (another vocabulary) and never sees the chat template a server wraps the
//! messages in. Answers that do carry usage (non-streamed ones, streams that honour
//! `stream_options.include_usage`, a tokenize endpoint asked afterwards) pair our count
//! with the true one; the pairs of one (upstream, model) fit a correction:
//!
//! - prompt: `true = a x ours + b x messages + c`. `a` is the vocabularies' ratio, `b` the
//!   chat template's cost per message (role markers, turn ends), `c` its fixed cost (the
//!   generation prompt, BOS). llama.cpp's Gemma template costs 8 tokens for one user turn
//!   and 5 to 6 for each further one (docs/tokens.md), which one slope and intercept
//!   cannot follow across conversations of different lengths. And a server may drop
//!   system text (Gemma has no system role): the same fit is kept twice, over all our
//!   tokens and over those outside system messages, and the one that predicted this
//!   key's answers better is used. Prompts of one message count, or of one length, fall
//!   back to `slope x ours + intercept`, then to a ratio.
//! - completion: `true = slope x ours`, through the origin (no template on an answer;
//!   an empty answer is zero tokens).
//!
//! And where a server emits one token per content event (llama.cpp's server does), the
//! count of content events is the completion's token count; trusted only once the
//! answers of that key showed it: streams that reported usage agreeing with their events
//! ([`Calibration::observe_events`]), or, where streams never report usage (llama.cpp's
//! never do), streams whose events add up to what the calibrated completion fit predicts
//! for their text ([`Calibration::observe_events_against_fit`]): a server that puts two
//! tokens in an event shows half the fit's count and is never trusted.

use std::collections::HashMap;

use crate::budget::{MAX_MODEL_KEYS, OTHER_MODELS};

/// Samples a fit needs before it is trusted over the raw tiktoken count: fewer, and one
/// odd answer (a cut stream, a tool call) would set the correction.
pub const MIN_SAMPLES: u32 = 5;

/// Weight each earlier sample keeps when a new one arrives (exponential decay per
/// sample, not per second: an idle key keeps its fit, since the model behind it did
/// not change by waiting). 0.9 gives the last ~10 samples most of the weight, so a
/// drift is followed within a few dozen answers.
const DECAY: f64 = 0.9;

/// A sample whose true count is off the fit's prediction by more than this fraction
/// (and by more than [`OUTLIER_MIN_TOKENS`]) is an outlier; [`SWAP_AFTER`] in a row mean
/// the model behind the key changed (a new model under the same name, a different
/// template), and the fit restarts from those outliers instead of decaying towards
/// them for dozens of answers.
const OUTLIER_FRACTION: f64 = 0.25;

/// Small counts vary by a token or two for reasons a fit cannot see (a leading space,
/// a merge across a boundary): not an outlier below this.
const OUTLIER_MIN_TOKENS: f64 = 4.0;

/// Consecutive outliers that restart a fit.
const SWAP_AFTER: usize = 3;

/// The spread of our prompt counts below which a slope is not fitted (every prompt of
/// about one length says nothing about the slope): the fit is then a plain ratio.
const MIN_VARIANCE: f64 = 1.0;

/// A fitted slope outside this range is taken for noise, not a tokenizer: the fit falls
/// back to the ratio. Vocabularies differ by well under a factor of four.
const SLOPE_RANGE: (f64, f64) = (0.25, 4.0);

/// The spread of message counts below which no per-message cost is fitted.
const MIN_MESSAGE_VARIANCE: f64 = 0.1;

/// A fitted per-message cost outside this range is noise: chat templates spend a few
/// tokens per message (a token or two of noise below zero is tolerated).
const PER_MESSAGE_RANGE: (f64, f64) = (-2.0, 64.0);

/// Prompt lengths and message counts that move together this closely (the squared
/// correlation above 1 - this) cannot be told apart: the fit keeps to the length alone.
const COLLINEAR: f64 = 0.05;

/// The fit over text outside system messages is used only when its prediction error
/// is below this fraction of the all-text fit's: a server that drops system text makes
/// the all-text fit miss by the whole system prompt; noise alone makes them about equal.
const SYSTEM_DROPPED_MARGIN: f64 = 0.8;

/// Upstreams a calibration keeps apart; later ones share one entry, [`OTHER_MODELS`]'s
/// name (transparent mode's upstreams are whatever the workloads connect to).
pub const MAX_UPSTREAMS: usize = 64;

/// Which (upstream, model) a count belongs to. `model` is the model that answered (the
/// response's, else the one the request was sent with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key<'a> {
    pub upstream: &'a str,
    pub model: &'a str,
}

/// How an estimated count was made, from best to worst. The names are the ones rows,
/// labels and logs are to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// One token per content event, a rule this key's answers were shown to follow.
    ContentEvents,
    /// Our tiktoken count corrected by this key's calibration.
    Calibrated,
    /// Our tiktoken count as is: nothing to correct it with yet.
    Tiktoken,
}

impl Method {
    /// The name in rows, labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::ContentEvents => "content_events",
            Method::Calibrated => "calibrated",
            Method::Tiktoken => "tiktoken",
        }
    }
}

/// Our count of a prompt and its layout: what the prompt fit reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prompt {
    /// Tiktoken tokens of the prompt's whole text (system text included).
    pub tokens: u64,
    /// Of which in system (and developer) messages, instructions or `system` fields.
    pub system_tokens: u64,
    /// Messages; 0 for a plain prompt.
    pub messages: u64,
    /// Of which system (or developer) messages.
    pub system_messages: u64,
}

impl Prompt {
    /// A prompt of one user text, or a plain one: just its count.
    pub fn text(tokens: u64) -> Self {
        Prompt {
            tokens,
            ..Default::default()
        }
    }

    /// (ours, messages) under each hypothesis: all text counts, or system text does not.
    fn features(&self) -> [(f64, f64); 2] {
        [
            (self.tokens as f64, self.messages as f64),
            (
                self.tokens.saturating_sub(self.system_tokens) as f64,
                self.messages.saturating_sub(self.system_messages) as f64,
            ),
        ]
    }
}

/// One estimated count and how it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    pub tokens: u64,
    pub method: Method,
}

/// What [`Calibration::estimate`] makes of one answer: prompt and completion each with
/// its own method (a prompt is never counted by events; a completion may be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub prompt: Count,
    pub completion: Count,
}

/// Exponentially decayed sums of (x = ours, m = messages, y = true) samples: a weighted
/// least-squares plane, line and ratio in constant memory.
#[derive(Debug, Clone, Default)]
struct Fit {
    w: f64,
    x: f64,
    m: f64,
    y: f64,
    xx: f64,
    xm: f64,
    mm: f64,
    xy: f64,
    my: f64,
    samples: u32,
    /// The last consecutive outliers, oldest first (a restart seeds from them; at most
    /// [`SWAP_AFTER`]).
    outliers: Vec<(f64, f64, f64)>,
}

impl Fit {
    fn add(&mut self, x: f64, m: f64, y: f64) {
        self.w = self.w * DECAY + 1.0;
        self.x = self.x * DECAY + x;
        self.m = self.m * DECAY + m;
        self.y = self.y * DECAY + y;
        self.xx = self.xx * DECAY + x * x;
        self.xm = self.xm * DECAY + x * m;
        self.mm = self.mm * DECAY + m * m;
        self.xy = self.xy * DECAY + x * y;
        self.my = self.my * DECAY + m * y;
        self.samples = self.samples.saturating_add(1);
    }

    /// Adds a sample, restarting the fit when it is the [`SWAP_AFTER`]th outlier in a
    /// row of a trusted fit. `line`: fit the plane (prompts), or a ratio.
    fn observe(&mut self, x: f64, m: f64, y: f64, line: bool) {
        if self.samples >= MIN_SAMPLES {
            let predicted = if line {
                self.predict(x, m)
            } else {
                self.ratio() * x
            };
            let off = (y - predicted).abs();
            if off > OUTLIER_MIN_TOKENS && off > OUTLIER_FRACTION * y.max(predicted) {
                self.outliers.push((x, m, y));
                if self.outliers.len() >= SWAP_AFTER {
                    let seed = std::mem::take(&mut self.outliers);
                    *self = Fit::default();
                    for (x, m, y) in seed {
                        self.add(x, m, y);
                    }
                }
                return;
            }
        }
        self.outliers.clear();
        self.add(x, m, y);
    }

    /// `a x ours + b x messages + c` by weighted least squares, where the samples' spread
    /// in both allows it and the coefficients look like a tokenizer and a template;
    /// otherwise [`Self::line`].
    fn predict(&self, x: f64, m: f64) -> f64 {
        let w = self.w;
        if w > 0.0 {
            // Weighted (co)variances, times w.
            let sxx = self.xx - self.x * self.x / w;
            let smm = self.mm - self.m * self.m / w;
            let sxm = self.xm - self.x * self.m / w;
            let sxy = self.xy - self.x * self.y / w;
            let smy = self.my - self.m * self.y / w;
            let det = sxx * smm - sxm * sxm;
            if sxx / w >= MIN_VARIANCE
                && smm / w >= MIN_MESSAGE_VARIANCE
                && det > COLLINEAR * sxx * smm
            {
                let a = (smm * sxy - sxm * smy) / det;
                let b = (sxx * smy - sxm * sxy) / det;
                if (SLOPE_RANGE.0..=SLOPE_RANGE.1).contains(&a)
                    && (PER_MESSAGE_RANGE.0..=PER_MESSAGE_RANGE.1).contains(&b)
                {
                    let c = (self.y - a * self.x - b * self.m) / w;
                    return a * x + b * m + c;
                }
            }
        }
        self.line(x)
    }

    fn trusted(&self) -> bool {
        self.samples >= MIN_SAMPLES && self.x > 0.0
    }

    /// True per ours, over every sample (weighted).
    fn ratio(&self) -> f64 {
        if self.x > 0.0 {
            self.y / self.x
        } else {
            1.0
        }
    }

    /// The weighted least-squares line at `x`; the ratio where the samples' spread or
    /// the slope says a line would be noise.
    fn line(&self, x: f64) -> f64 {
        let var = self.w * self.xx - self.x * self.x;
        // var / w^2 is the weighted variance of x.
        if self.w > 0.0 && var / (self.w * self.w) >= MIN_VARIANCE {
            let slope = (self.w * self.xy - self.x * self.y) / var;
            if (SLOPE_RANGE.0..=SLOPE_RANGE.1).contains(&slope) {
                let intercept = (self.y - slope * self.x) / self.w;
                return slope * x + intercept.max(0.0);
            }
        }
        self.ratio() * x
    }
}

/// Whether a key's streams carry one token per content event: the consecutive answers
/// (with a true count) where they did.
#[derive(Debug, Clone, Default)]
struct Events {
    agreeing: u32,
    /// The last stream with a true count disagreed: no trust from the fit until
    /// [`MIN_SAMPLES`] agree again.
    disagreed: bool,
    /// Decayed sums over streams without usage: their content events, and what the
    /// completion fit predicted for their text.
    against_fit: u32,
    events: f64,
    predicted: f64,
}

impl Events {
    fn trusted(&self) -> bool {
        self.agreeing >= MIN_SAMPLES
            || (!self.disagreed
                && self.against_fit >= MIN_SAMPLES
                && self.predicted > 0.0
                && (self.events / self.predicted - 1.0).abs() <= OUTLIER_FRACTION)
    }
}

/// The prompt fit under both hypotheses (see the module doc), and how well each
/// predicted the samples it had not seen yet (decayed mean relative error).
#[derive(Debug, Clone, Default)]
struct PromptFit {
    /// [0]: all text counts; [1]: system text does not.
    fits: [Fit; 2],
    errors: [f64; 2],
}

impl PromptFit {
    fn observe(&mut self, p: &Prompt, y: f64) {
        let features = p.features();
        // Scored before the sample is added: how each fit does on what it has not seen.
        if self.fits.iter().all(|f| f.samples >= 2) {
            for ((fit, err), (x, m)) in self.fits.iter().zip(&mut self.errors).zip(features) {
                let off = (y - fit.predict(x, m)).abs() / y.max(1.0);
                *err = *err * DECAY + off;
            }
        }
        for (fit, (x, m)) in self.fits.iter_mut().zip(features) {
            fit.observe(x, m, y, true);
        }
    }

    /// The fit to use, and our count in its terms.
    fn chosen(&self, p: &Prompt) -> (&Fit, (f64, f64)) {
        let i = usize::from(self.errors[1] < SYSTEM_DROPPED_MARGIN * self.errors[0]);
        (&self.fits[i], p.features()[i])
    }
}

#[derive(Debug, Clone, Default)]
struct Entry {
    prompt: PromptFit,
    completion: Fit,
    events: Events,
}

/// Calibration per (upstream, model), bounded like the budgets' and metrics' model
/// names: per upstream the first [`MAX_MODEL_KEYS`] model names keep their own entry and
/// later ones share [`OTHER_MODELS`]'s; past [`MAX_UPSTREAMS`] upstreams, likewise. An
/// entry is a few dozen bytes whatever the traffic, so the whole is bounded too.
#[derive(Debug, Default)]
pub struct Calibration {
    upstreams: HashMap<String, HashMap<String, Entry>>,
}

fn to_count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        // Rounded, not truncated: a fit's error is symmetric. `as` saturates.
        v.round() as u64
    } else {
        0
    }
}

impl Calibration {
    pub fn new() -> Self {
        Self::default()
    }

    /// Names (upstream, model) under the bounds; `None` when the bound took it to a shared
    /// entry that does not exist yet (only [`Self::observe`] creates entries).
    fn entry(&self, key: Key<'_>) -> Option<&Entry> {
        let models = self
            .upstreams
            .get(key.upstream)
            .or_else(|| self.upstreams.get(OTHER_MODELS))?;
        models.get(key.model).or_else(|| models.get(OTHER_MODELS))
    }

    fn entry_mut(&mut self, key: Key<'_>) -> &mut Entry {
        let upstream =
            if self.upstreams.contains_key(key.upstream) || self.upstreams.len() < MAX_UPSTREAMS {
                key.upstream
            } else {
                OTHER_MODELS
            };
        let models = self.upstreams.entry(upstream.to_owned()).or_default();
        let model = if models.contains_key(key.model) || models.len() < MAX_MODEL_KEYS {
            key.model
        } else {
            OTHER_MODELS
        };
        models.entry(model.to_owned()).or_default()
    }

    /// Learns from an answer whose true counts are known (the provider's usage, or a
    /// tokenize endpoint's count): `ours_*` is what we counted for it with tiktoken. A
    /// count not known (`None`) teaches nothing; zero-token prompts teach nothing either
    /// (nothing was counted, so there is nothing to correct).
    pub fn observe(
        &mut self,
        key: Key<'_>,
        ours_prompt: &Prompt,
        true_prompt: Option<u64>,
        ours_completion: u64,
        true_completion: Option<u64>,
    ) {
        let prompt = true_prompt.filter(|_| ours_prompt.tokens > 0);
        let completion = true_completion.filter(|_| ours_completion > 0);
        if prompt.is_none() && completion.is_none() {
            return;
        }
        let entry = self.entry_mut(key);
        if let Some(y) = prompt {
            entry.prompt.observe(ours_prompt, y as f64);
        }
        if let Some(y) = completion {
            entry
                .completion
                .observe(ours_completion as f64, 0.0, y as f64, false);
        }
    }

    /// Learns whether this key's streams carry one token per content event: a streamed
    /// answer's content events against its true completion count (from a stream that did
    /// report usage, or the tokenize endpoint). [`MIN_SAMPLES`] agreeing answers in a row
    /// make events trusted; one that disagrees (by more than a token: the last event may
    /// carry the end of the text and a stop token with it) withdraws the trust.
    pub fn observe_events(&mut self, key: Key<'_>, content_events: u64, true_completion: u64) {
        let events = &mut self.entry_mut(key).events;
        if content_events.abs_diff(true_completion) <= 1 {
            events.agreeing = events.agreeing.saturating_add(1);
            events.disagreed = false;
        } else {
            // Shown not to hold: what the fit suggested is forgotten too.
            *events = Events {
                disagreed: true,
                ..Events::default()
            };
        }
    }

    /// Learns the same from a stream that reported no usage, against the calibrated
    /// completion fit (only once that is trusted; `ours_completion` is our tiktoken count
    /// of the stream's text). Over [`MIN_SAMPLES`] such streams the content events must
    /// add up to the fit's prediction within [`OUTLIER_FRACTION`]: one stream is as noisy
    /// as the fit, the sum is not, and a server with several tokens per event is far off.
    pub fn observe_events_against_fit(
        &mut self,
        key: Key<'_>,
        content_events: u64,
        ours_completion: u64,
    ) {
        let Some(ratio) = self
            .entry(key)
            .map(|e| &e.completion)
            .filter(|f| f.trusted())
            .map(Fit::ratio)
        else {
            return;
        };
        if ours_completion == 0 {
            return;
        }
        let events = &mut self.entry_mut(key).events;
        events.against_fit = events.against_fit.saturating_add(1);
        events.events = events.events * DECAY + content_events as f64;
        events.predicted = events.predicted * DECAY + ratio * ours_completion as f64;
    }

    /// The best counts for an answer that reported none: `ours_*` are tiktoken counts of
    /// the prompt and the answer, `content_events` the stream's content events (`None`
    /// for an answer that was not streamed).
    pub fn estimate(
        &self,
        key: Key<'_>,
        ours_prompt: &Prompt,
        ours_completion: u64,
        content_events: Option<u64>,
    ) -> Estimate {
        let entry = self.entry(key);
        let prompt = match entry
            .map(|e| e.prompt.chosen(ours_prompt))
            .filter(|(f, _)| f.trusted())
        {
            Some((fit, (x, m))) => Count {
                tokens: to_count(fit.predict(x, m)),
                method: Method::Calibrated,
            },
            None => Count {
                tokens: ours_prompt.tokens,
                method: Method::Tiktoken,
            },
        };
        let events_trusted = entry.is_some_and(|e| e.events.trusted());
        let completion = match (content_events, entry) {
            (Some(n), _) if events_trusted => Count {
                tokens: n,
                method: Method::ContentEvents,
            },
            (_, Some(e)) if e.completion.trusted() => Count {
                tokens: to_count(e.completion.ratio() * ours_completion as f64),
                method: Method::Calibrated,
            },
            _ => Count {
                tokens: ours_completion,
                method: Method::Tiktoken,
            },
        };
        Estimate { prompt, completion }
    }

    /// Entries kept, across upstreams (for tests and a gauge).
    pub fn len(&self) -> usize {
        self.upstreams.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Key<'static> = Key {
        upstream: "10.0.0.9:8080",
        model: "gemma-3-270m",
    };

    /// Feeds answers whose true counts follow `prompt = a x + b`, `completion = c x`.
    fn feed(cal: &mut Calibration, key: Key<'_>, n: u64, a: f64, b: f64, c: f64) {
        for i in 0..n {
            // Prompts of 10..~200 tokens, answers of 5..~120, varied so a slope shows.
            let p = 10 + (i * 37) % 190;
            let o = 5 + (i * 53) % 115;
            let tp = (a * p as f64 + b).round() as u64;
            let to = (c * o as f64).round() as u64;
            cal.observe(key, &Prompt::text(p), Some(tp), o, Some(to));
        }
    }

    #[test]
    fn nothing_learned_means_tiktoken_as_is() {
        let cal = Calibration::new();
        let e = cal.estimate(K, &Prompt::text(11), 88, Some(60));
        assert_eq!(
            e.prompt,
            Count {
                tokens: 11,
                method: Method::Tiktoken
            }
        );
        assert_eq!(
            e.completion,
            Count {
                tokens: 88,
                method: Method::Tiktoken
            }
        );
    }

    #[test]
    fn a_fit_is_not_trusted_before_min_samples() {
        let mut cal = Calibration::new();
        feed(&mut cal, K, u64::from(MIN_SAMPLES) - 1, 1.3, 17.0, 0.7);
        assert_eq!(
            cal.estimate(K, &Prompt::text(50), 50, None).prompt.method,
            Method::Tiktoken
        );
        feed(&mut cal, K, 1, 1.3, 17.0, 0.7);
        assert_eq!(
            cal.estimate(K, &Prompt::text(50), 50, None).prompt.method,
            Method::Calibrated
        );
    }

    #[test]
    fn the_prompt_fit_finds_slope_and_template_overhead() {
        let mut cal = Calibration::new();
        feed(&mut cal, K, 30, 1.3, 17.0, 0.7);
        for ours in [5, 40, 150, 400] {
            let want = (1.3 * ours as f64 + 17.0).round() as u64;
            let got = cal.estimate(K, &Prompt::text(ours), 10, None).prompt;
            assert_eq!(got.method, Method::Calibrated);
            assert!(
                got.tokens.abs_diff(want) <= 2,
                "ours {ours}: {} vs {want}",
                got.tokens
            );
        }
    }

    #[test]
    fn the_completion_fit_is_a_ratio() {
        let mut cal = Calibration::new();
        feed(&mut cal, K, 30, 1.0, 0.0, 0.68);
        // 88 tiktoken tokens of a 60-token answer (the measurement).
        let got = cal.estimate(K, &Prompt::text(20), 88, None).completion;
        assert_eq!(got.method, Method::Calibrated);
        assert!(got.tokens.abs_diff(60) <= 1, "{}", got.tokens);
        assert_eq!(
            cal.estimate(K, &Prompt::text(20), 0, None)
                .completion
                .tokens,
            0
        );
    }

    #[test]
    fn prompts_of_one_length_fall_back_to_the_ratio() {
        let mut cal = Calibration::new();
        for _ in 0..10 {
            cal.observe(K, &Prompt::text(40), Some(60), 10, Some(10));
        }
        let got = cal.estimate(K, &Prompt::text(40), 10, None).prompt;
        assert_eq!(got.tokens, 60);
        assert_eq!(
            cal.estimate(K, &Prompt::text(80), 10, None).prompt.tokens,
            120
        );
    }

    #[test]
    fn a_model_swap_is_followed_within_min_samples_answers() {
        let mut cal = Calibration::new();
        feed(&mut cal, K, 40, 1.3, 17.0, 0.7);
        // Another model behind the same name: half the tokens, no template. Its first
        // answers are outliers of the old fit; SWAP_AFTER of them restart it, and
        // MIN_SAMPLES answers after the swap the new fit is trusted.
        feed(&mut cal, K, u64::from(MIN_SAMPLES) - 1, 0.5, 0.0, 1.5);
        assert_eq!(
            cal.estimate(K, &Prompt::text(100), 100, None).prompt.method,
            Method::Tiktoken
        );
        feed(&mut cal, K, 1, 0.5, 0.0, 1.5);
        let e = cal.estimate(K, &Prompt::text(100), 100, None);
        assert!(
            e.prompt.tokens.abs_diff(50) <= 2,
            "prompt {}",
            e.prompt.tokens
        );
        assert!(
            e.completion.tokens.abs_diff(150) <= 2,
            "completion {}",
            e.completion.tokens
        );
    }

    #[test]
    fn one_odd_answer_does_not_restart_a_fit() {
        let mut cal = Calibration::new();
        feed(&mut cal, K, 30, 1.3, 17.0, 0.7);
        cal.observe(K, &Prompt::text(100), Some(1000), 100, Some(1000));
        feed(&mut cal, K, 1, 1.3, 17.0, 0.7);
        let got = cal.estimate(K, &Prompt::text(100), 100, None);
        assert!(
            got.prompt.tokens.abs_diff(147) <= 1,
            "{}",
            got.prompt.tokens
        );
        assert!(
            got.completion.tokens.abs_diff(70) <= 1,
            "{}",
            got.completion.tokens
        );
    }

    #[test]
    fn a_noisy_slope_is_not_believed() {
        let mut cal = Calibration::new();
        // Two prompt lengths whose true counts go the wrong way: a line through them
        // slopes down (-0.5, intercept 80: 55 at 50), which no tokenizer does.
        for i in 0..10 {
            let (ours, truth) = if i % 2 == 0 { (40, 60) } else { (44, 58) };
            cal.observe(K, &Prompt::text(ours), Some(truth), 10, Some(10));
        }
        let got = cal.estimate(K, &Prompt::text(50), 10, None).prompt.tokens;
        // The ratio instead: between 58/44 and 60/40 per token.
        assert!((65..=75).contains(&got), "{got}");
    }

    #[test]
    fn content_events_count_only_once_shown_to_hold() {
        let mut cal = Calibration::new();
        feed(&mut cal, K, 10, 1.0, 0.0, 0.7);
        for _ in 0..MIN_SAMPLES - 1 {
            cal.observe_events(K, 60, 60);
        }
        assert_eq!(
            cal.estimate(K, &Prompt::text(20), 88, Some(60))
                .completion
                .method,
            Method::Calibrated
        );
        cal.observe_events(K, 61, 60);
        let e = cal.estimate(K, &Prompt::text(20), 88, Some(60));
        assert_eq!(
            e.completion,
            Count {
                tokens: 60,
                method: Method::ContentEvents
            }
        );
        // Not for a non-streamed answer: it has no events.
        assert_eq!(
            cal.estimate(K, &Prompt::text(20), 88, None)
                .completion
                .method,
            Method::Calibrated
        );
        // One answer that bundles tokens into events withdraws the trust.
        cal.observe_events(K, 30, 60);
        assert_ne!(
            cal.estimate(K, &Prompt::text(20), 88, Some(60))
                .completion
                .method,
            Method::ContentEvents
        );
    }

    #[test]
    fn keys_are_apart_and_bounded() {
        let mut cal = Calibration::new();
        feed(&mut cal, K, 10, 2.0, 0.0, 2.0);
        let other = Key {
            upstream: "10.0.0.10:8080",
            ..K
        };
        assert_eq!(
            cal.estimate(other, &Prompt::text(50), 50, None)
                .prompt
                .method,
            Method::Tiktoken
        );
        let names: Vec<String> = (0..MAX_MODEL_KEYS + 50).map(|i| format!("m{i}")).collect();
        for name in &names {
            cal.observe(
                Key {
                    upstream: "u",
                    model: name,
                },
                &Prompt::text(10),
                Some(20),
                10,
                Some(20),
            );
        }
        // The first names keep theirs, the rest share one entry.
        assert_eq!(cal.len(), 1 + MAX_MODEL_KEYS + 1);
        let upstreams: Vec<String> = (0..MAX_UPSTREAMS + 10)
            .map(|i| format!("h{i}:80"))
            .collect();
        for u in &upstreams {
            cal.observe(
                Key {
                    upstream: u,
                    model: "m",
                },
                &Prompt::text(10),
                Some(20),
                10,
                Some(20),
            );
        }
        assert_eq!(cal.upstreams.len(), MAX_UPSTREAMS + 1);
        // A name past the bound is estimated with the shared entry.
        let late = Key {
            upstream: "u",
            model: "never-seen",
        };
        assert_eq!(
            cal.estimate(late, &Prompt::text(10), 10, None)
                .prompt
                .tokens,
            20
        );
    }

    #[test]
    fn unknown_and_zero_counts_teach_nothing() {
        let mut cal = Calibration::new();
        cal.observe(K, &Prompt::text(0), Some(5), 0, Some(0));
        cal.observe(K, &Prompt::text(10), None, 10, None);
        assert!(cal.is_empty());
        for _ in 0..10 {
            cal.observe(K, &Prompt::text(10), Some(20), 0, Some(3));
        }
        let e = cal.estimate(K, &Prompt::text(10), 7, None);
        assert_eq!(e.prompt.tokens, 20);
        assert_eq!(
            e.completion.method,
            Method::Tiktoken,
            "no completion sample"
        );
    }
    /// A conversation prompt: `n` messages, `system` tokens of them in one system message.
    fn conversation(tokens: u64, messages: u64, system: u64) -> Prompt {
        Prompt {
            tokens,
            system_tokens: system,
            messages,
            system_messages: u64::from(system > 0),
        }
    }

    #[test]
    fn the_prompt_fit_follows_a_per_message_template() {
        // llama.cpp's Gemma: 8 tokens for one user turn, ~5.5 for each further one.
        let truth = |p: &Prompt| 1.3 * p.tokens as f64 + 5.5 * p.messages as f64 + 2.5;
        let mut cal = Calibration::new();
        for i in 0..20u64 {
            let p = conversation(5 + (i * 37) % 150, 1 + (i * 3) % 5, 0);
            cal.observe(K, &p, Some(truth(&p).round() as u64), 10, Some(10));
        }
        for (tokens, messages) in [(3, 1), (20, 5), (200, 2), (60, 9)] {
            let p = conversation(tokens, messages, 0);
            let got = cal.estimate(K, &p, 10, None).prompt;
            assert_eq!(got.method, Method::Calibrated);
            let want = truth(&p);
            assert!(
                (got.tokens as f64 - want).abs() <= 1.5,
                "{tokens} in {messages}: {} vs {want}",
                got.tokens
            );
        }
    }

    #[test]
    fn a_server_that_drops_system_text_is_told_from_one_that_counts_it() {
        let truth = |p: &Prompt, dropped: bool| {
            let (t, m) = if dropped {
                (p.tokens - p.system_tokens, p.messages - p.system_messages)
            } else {
                (p.tokens, p.messages)
            };
            (2.0 * t as f64 + 6.0 * m as f64 + 2.0).round() as u64
        };
        for dropped in [true, false] {
            let mut cal = Calibration::new();
            for i in 0..20u64 {
                let system = if i % 3 == 0 { 10 + i % 7 } else { 0 };
                let p = conversation(system + 5 + (i * 37) % 150, 1 + (i * 3) % 5, system);
                cal.observe(K, &p, Some(truth(&p, dropped)), 10, Some(10));
            }
            let p = conversation(40, 2, 14);
            let got = cal.estimate(K, &p, 10, None).prompt.tokens;
            assert!(
                got.abs_diff(truth(&p, dropped)) <= 2,
                "dropped {dropped}: {got} vs {}",
                truth(&p, dropped)
            );
        }
    }

    #[test]
    fn content_events_are_trusted_from_the_fit_where_streams_never_report_usage() {
        let mut cal = Calibration::new();
        // Before the completion fit is trusted, streams teach nothing.
        cal.observe_events_against_fit(K, 60, 30);
        feed(&mut cal, K, 10, 1.0, 0.0, 2.0);
        // One token per event: the events add up to the fit's count (2 per ours) give or
        // take the noise of single answers.
        for (events, ours) in [(50, 30), (70, 30), (44, 20), (90, 40), (18, 10)] {
            assert_ne!(
                cal.estimate(K, &Prompt::text(20), 40, Some(81))
                    .completion
                    .method,
                Method::ContentEvents
            );
            cal.observe_events_against_fit(K, events, ours);
        }
        assert_eq!(
            cal.estimate(K, &Prompt::text(20), 40, Some(81)).completion,
            Count {
                tokens: 81,
                method: Method::ContentEvents
            }
        );
        // A true count that disagrees withdraws it.
        cal.observe_events(K, 40, 81);
        assert_ne!(
            cal.estimate(K, &Prompt::text(20), 40, Some(81))
                .completion
                .method,
            Method::ContentEvents
        );
        // A server with two tokens per event is never trusted.
        let mut two = Calibration::new();
        feed(&mut two, K, 10, 1.0, 0.0, 2.0);
        for _ in 0..20 {
            two.observe_events_against_fit(K, 30, 30);
        }
        assert_eq!(
            two.estimate(K, &Prompt::text(20), 30, Some(30))
                .completion
                .method,
            Method::Calibrated
        );
    }
}
