//! Model rules: what model a request gets. Weighted splits (canaries) and the rewrite
//! map are tried first (exact names and `*` globs, first match wins), then the allow and
//! deny lists judge the model that would be used.

use globset::{Glob, GlobMatcher};

/// Why a model rule could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum ModelRewriteError {
    #[error("model pattern {pattern:?} is not a valid glob: {source}")]
    BadGlob {
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error("model name must not be empty")]
    EmptyTarget { pattern: String },
    #[error("split weights must add up to more than 0")]
    NoWeight,
}

/// An exact model name, or a glob (`*`, `?`, `[...]`) over names.
#[derive(Debug, Clone)]
pub struct ModelPattern {
    text: String,
    glob: Option<GlobMatcher>,
}

impl ModelPattern {
    pub fn new(pattern: &str) -> Result<Self, ModelRewriteError> {
        let glob = if pattern.contains(['*', '?', '[']) {
            let g = Glob::new(pattern).map_err(|source| ModelRewriteError::BadGlob {
                pattern: pattern.to_owned(),
                source,
            })?;
            Some(g.compile_matcher())
        } else {
            None
        };
        Ok(Self {
            text: pattern.to_owned(),
            glob,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, model: &str) -> bool {
        match &self.glob {
            Some(g) => g.is_match(model),
            None => self.text == model,
        }
    }
}

fn target(pattern: &str, target: &str) -> Result<String, ModelRewriteError> {
    if target.is_empty() {
        return Err(ModelRewriteError::EmptyTarget {
            pattern: pattern.to_owned(),
        });
    }
    Ok(target.to_owned())
}

/// One rewrite: requests whose model matches `pattern` use `target` instead.
#[derive(Debug, Clone)]
pub struct RewriteRule {
    pattern: ModelPattern,
    target: String,
}

impl RewriteRule {
    pub fn new(pattern: &str, to: &str) -> Result<Self, ModelRewriteError> {
        Ok(Self {
            target: target(pattern, to)?,
            pattern: ModelPattern::new(pattern)?,
        })
    }

    pub fn pattern(&self) -> &str {
        self.pattern.as_str()
    }

    pub fn target(&self) -> &str {
        &self.target
    }
}

/// An ordered list of rewrite rules.
#[derive(Debug, Clone, Default)]
pub struct ModelRewrite {
    rules: Vec<RewriteRule>,
}

impl ModelRewrite {
    pub fn new(rules: Vec<RewriteRule>) -> Self {
        Self { rules }
    }

    /// Every model becomes `target`: what `--model` (the `ai-model` annotation) asks for.
    pub fn everything_to(target: &str) -> Result<Self, ModelRewriteError> {
        Ok(Self::new(vec![RewriteRule::new("*", target)?]))
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Appends `other`'s rules after these (they apply where none of these does).
    pub fn then(mut self, other: &ModelRewrite) -> Self {
        self.rules.extend(other.rules.iter().cloned());
        self
    }

    /// The model to use instead of `model`, if a rule applies and changes it.
    pub fn apply(&self, model: &str) -> Option<&str> {
        self.rules
            .iter()
            .find(|rule| rule.pattern.matches(model))
            .map(RewriteRule::target)
            .filter(|target| *target != model)
    }
}

/// A weighted split: a share of the requests for matching models goes to each target.
#[derive(Debug, Clone)]
pub struct Split {
    pattern: ModelPattern,
    targets: Vec<(String, u32)>,
    total: u64,
}

impl Split {
    pub fn new(pattern: &str, targets: Vec<(String, u32)>) -> Result<Self, ModelRewriteError> {
        let total: u64 = targets.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return Err(ModelRewriteError::NoWeight);
        }
        for (t, _) in &targets {
            target(pattern, t)?;
        }
        Ok(Self {
            pattern: ModelPattern::new(pattern)?,
            targets,
            total,
        })
    }

    pub fn targets(&self) -> &[(String, u32)] {
        &self.targets
    }

    /// The target for a request, chosen by a stable hash of `key`: the same key (a
    /// retried request) always lands on the same model.
    pub fn pick(&self, key: &[u8]) -> &str {
        let mut slot = stable_hash(key) % self.total;
        for (t, w) in &self.targets {
            let w = u64::from(*w);
            if slot < w {
                return t;
            }
            slot -= w;
        }
        // Unreachable: the weights add up to `total`.
        &self.targets[self.targets.len() - 1].0
    }
}

/// FNV-1a with a final avalanche: stable across processes, releases and platforms.
fn stable_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// What the model rules decided for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelDecision {
    /// Use this model (`changed`: it is not the one asked for).
    Use { model: String, changed: bool },
    /// Refused, naming the rule.
    Denied { rule: String },
}

/// The model rules of a policy.
#[derive(Debug, Clone, Default)]
pub struct ModelRules {
    pub splits: Vec<Split>,
    pub rewrite: ModelRewrite,
    pub allow: Vec<ModelPattern>,
    pub deny: Vec<ModelPattern>,
}

impl ModelRules {
    pub fn is_empty(&self) -> bool {
        self.splits.is_empty()
            && self.rewrite.is_empty()
            && self.allow.is_empty()
            && self.deny.is_empty()
    }

    /// Decides the model for a request asking for `requested`; `key` picks split targets.
    pub fn decide(&self, requested: &str, key: &[u8]) -> ModelDecision {
        let model = match self.splits.iter().find(|s| s.pattern.matches(requested)) {
            Some(split) => split.pick(key),
            None => self.rewrite.apply(requested).unwrap_or(requested),
        };
        if let Some(d) = self.deny.iter().find(|d| d.matches(model)) {
            return ModelDecision::Denied {
                rule: format!("models.deny {:?}", d.as_str()),
            };
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|a| a.matches(model)) {
            return ModelDecision::Denied {
                rule: "models.allow".to_owned(),
            };
        }
        ModelDecision::Use {
            changed: model != requested,
            model: model.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(rules: &[(&str, &str)]) -> ModelRewrite {
        ModelRewrite::new(
            rules
                .iter()
                .map(|(p, t)| RewriteRule::new(p, t).unwrap())
                .collect(),
        )
    }

    #[test]
    fn exact_rule_matches_only_its_name() {
        let r = rewrite(&[("llama3.2:1b", "gemma2:2b")]);
        assert_eq!(r.apply("llama3.2:1b"), Some("gemma2:2b"));
        assert_eq!(r.apply("llama3.2:1b-instruct"), None);
        assert_eq!(r.apply("llama3.2"), None);
    }

    #[test]
    fn glob_matches_across_tags_and_slashes() {
        let r = rewrite(&[("llama3*", "qwen2.5:1.5b"), ("org/*", "gpt-4o-mini")]);
        assert_eq!(r.apply("llama3.2:1b"), Some("qwen2.5:1.5b"));
        assert_eq!(r.apply("org/team/model"), Some("gpt-4o-mini"));
        assert_eq!(r.apply("mistral"), None);
    }

    #[test]
    fn first_match_wins_and_then_appends() {
        let r = rewrite(&[("gpt-4o", "a"), ("gpt-*", "b")]);
        assert_eq!(r.apply("gpt-4o"), Some("a"));
        assert_eq!(r.apply("gpt-4.1"), Some("b"));
        let all = r.then(&ModelRewrite::everything_to("c").unwrap());
        assert_eq!(all.apply("llama"), Some("c"));
        assert_eq!(all.apply("gpt-4o"), Some("a"));
    }

    #[test]
    fn rewrite_to_same_name_is_not_a_change() {
        let r = ModelRewrite::everything_to("m").unwrap();
        assert_eq!(r.apply("m"), None);
        assert_eq!(r.apply("other"), Some("m"));
    }

    #[test]
    fn bad_rules_are_errors() {
        assert!(matches!(
            RewriteRule::new("a[", "b"),
            Err(ModelRewriteError::BadGlob { .. })
        ));
        assert!(matches!(
            RewriteRule::new("a", ""),
            Err(ModelRewriteError::EmptyTarget { .. })
        ));
        assert!(matches!(
            Split::new("a", vec![("b".into(), 0)]),
            Err(ModelRewriteError::NoWeight)
        ));
    }

    #[test]
    fn splits_are_weighted_and_stable_per_key() {
        let split = Split::new(
            "llama3.2:1b",
            vec![("gemma2:2b".into(), 90), ("qwen2.5:1.5b".into(), 10)],
        )
        .unwrap();
        let n = 10_000;
        let gemma = (0..n)
            .filter(|i| split.pick(format!("req-{i}").as_bytes()) == "gemma2:2b")
            .count();
        let share = gemma as f64 / n as f64;
        assert!((share - 0.9).abs() < 0.015, "gemma share {share}");
        assert_eq!(split.pick(b"retry-me"), split.pick(b"retry-me"));
    }

    #[test]
    fn allow_and_deny_judge_the_model_that_would_be_used() {
        let rules = ModelRules {
            rewrite: rewrite(&[("gpt-4", "gpt-4o-mini")]),
            allow: vec![
                ModelPattern::new("gpt-4o*").unwrap(),
                ModelPattern::new("llama*").unwrap(),
            ],
            deny: vec![ModelPattern::new("llama3.3*").unwrap()],
            ..Default::default()
        };
        assert_eq!(
            rules.decide("gpt-4", b""),
            ModelDecision::Use {
                model: "gpt-4o-mini".into(),
                changed: true
            }
        );
        assert_eq!(
            rules.decide("llama3.2", b""),
            ModelDecision::Use {
                model: "llama3.2".into(),
                changed: false
            }
        );
        assert_eq!(
            rules.decide("llama3.3:70b", b""),
            ModelDecision::Denied {
                rule: "models.deny \"llama3.3*\"".into()
            }
        );
        assert_eq!(
            rules.decide("mistral", b""),
            ModelDecision::Denied {
                rule: "models.allow".into()
            }
        );
    }
}
