//! Model rewrite: maps the model a client asked for to the model it gets. Rules are
//! exact names or `*` globs, tried in order; the first match wins.

use globset::{Glob, GlobMatcher};

/// Why a rewrite rule could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum ModelRewriteError {
    #[error("model pattern {pattern:?} is not a valid glob: {source}")]
    BadGlob {
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error("model rewrite target must not be empty (pattern {pattern:?})")]
    EmptyTarget { pattern: String },
}

#[derive(Debug, Clone)]
enum Matcher {
    Exact(String),
    Glob(GlobMatcher),
}

/// One compiled rule: requests whose model matches `pattern` use `target` instead.
#[derive(Debug, Clone)]
pub struct RewriteRule {
    pattern: String,
    matcher: Matcher,
    target: String,
}

impl RewriteRule {
    /// Compiles a rule. Patterns containing `*`, `?` or `[` are globs; others are exact.
    pub fn new(pattern: &str, target: &str) -> Result<Self, ModelRewriteError> {
        if target.is_empty() {
            return Err(ModelRewriteError::EmptyTarget {
                pattern: pattern.to_owned(),
            });
        }
        let matcher = if pattern.contains(['*', '?', '[']) {
            let glob = Glob::new(pattern).map_err(|source| ModelRewriteError::BadGlob {
                pattern: pattern.to_owned(),
                source,
            })?;
            Matcher::Glob(glob.compile_matcher())
        } else {
            Matcher::Exact(pattern.to_owned())
        };
        Ok(Self {
            pattern: pattern.to_owned(),
            matcher,
            target: target.to_owned(),
        })
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    fn matches(&self, model: &str) -> bool {
        match &self.matcher {
            Matcher::Exact(name) => name == model,
            Matcher::Glob(glob) => glob.is_match(model),
        }
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

    /// The model to use instead of `model`, if a rule applies and changes it.
    pub fn apply(&self, model: &str) -> Option<&str> {
        self.rules
            .iter()
            .find(|rule| rule.matches(model))
            .map(RewriteRule::target)
            .filter(|target| *target != model)
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
    fn first_match_wins() {
        let r = rewrite(&[("gpt-4o", "a"), ("gpt-*", "b")]);
        assert_eq!(r.apply("gpt-4o"), Some("a"));
        assert_eq!(r.apply("gpt-4.1"), Some("b"));
    }

    #[test]
    fn rewrite_to_same_name_is_not_a_change() {
        let r = ModelRewrite::everything_to("m").unwrap();
        assert_eq!(r.apply("m"), None);
        assert_eq!(r.apply("other"), Some("m"));
        assert_eq!(r.apply(""), Some("m"));
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
    }
}
