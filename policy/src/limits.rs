//! Max-tokens clamp: a ceiling on how much a model may generate, per model or by default.
//! It sets the limit where the client asked none and lowers it where the client asked
//! more; it never raises what the client asked.

use crate::model::ModelPattern;

/// The configured ceilings.
#[derive(Debug, Clone, Default)]
pub struct MaxTokens {
    pub default: Option<u64>,
    /// First match wins, before the default.
    pub per_model: Vec<(ModelPattern, u64)>,
}

impl MaxTokens {
    pub fn is_empty(&self) -> bool {
        self.default.is_none() && self.per_model.is_empty()
    }

    /// The ceiling for `model`, if any.
    pub fn limit(&self, model: &str) -> Option<u64> {
        self.per_model
            .iter()
            .find(|(p, _)| p.matches(model))
            .map(|(_, n)| *n)
            .or(self.default)
    }

    /// The value to set for a request to `model` that asked `asked`, if it must change.
    pub fn clamp(&self, model: &str, asked: Option<u64>) -> Option<u64> {
        let limit = self.limit(model)?;
        match asked {
            Some(a) if a <= limit => None,
            _ => Some(limit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_or_lowers_never_raises() {
        let m = MaxTokens {
            default: Some(100),
            per_model: vec![(ModelPattern::new("gpt-4o*").unwrap(), 50)],
        };
        assert_eq!(m.clamp("llama", None), Some(100));
        assert_eq!(m.clamp("llama", Some(500)), Some(100));
        assert_eq!(m.clamp("llama", Some(20)), None);
        assert_eq!(m.clamp("gpt-4o-mini", Some(80)), Some(50));
        assert_eq!(MaxTokens::default().clamp("x", None), None);
    }
}
