//! What the Prometheus series and the OTLP instruments label alike, decided once per
//! record: the bounded model names, whether the model was rewritten, the GenAI
//! operation. No label ever holds prompt text or a request id.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::api::Endpoint;
use crate::budget::OTHER_MODELS;
use crate::record::UsageRecord;

/// Distinct model names a gateway shows as label values. A workload chooses the model
/// names it sends, so without a bound one sending a new name per request would grow the
/// exposition (and a Prometheus server) without end.
pub const MAX_MODEL_LABELS: usize = 64;

/// The OpenTelemetry operation name of an endpoint.
pub fn operation(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Chat | Endpoint::ChatCompletions | Endpoint::Responses => "chat",
        Endpoint::Completions | Endpoint::Generate => "text_completion",
        Endpoint::Embeddings | Endpoint::Embed | Endpoint::LegacyEmbeddings => "embeddings",
    }
}

/// The model names shown so far; the first to arrive keep their own label for good
/// (later ones are [`OTHER_MODELS`]).
#[derive(Default)]
pub struct ModelNames(Mutex<HashSet<String>>);

impl ModelNames {
    /// A record's model names as labels: names already shown keep theirs, new ones get
    /// one while there is room.
    pub fn labels(&self, r: &UsageRecord) -> ModelLabels {
        let used = r.used_model.as_deref().unwrap_or_default();
        // A rewrite is told by the names, not by their labels (two names past the bound
        // are both `OTHER_MODELS`); from "" when the request named none.
        let rewrite = !used.is_empty() && r.requested_model.as_deref() != Some(used);
        let mut seen = self.0.lock().ok();
        let mut label = |name: Option<&str>| -> String {
            let name = name.unwrap_or_default();
            match seen.as_mut() {
                Some(seen) if seen.contains(name) || seen.len() < MAX_MODEL_LABELS => {
                    seen.insert(name.to_owned());
                    name.to_owned()
                }
                _ => OTHER_MODELS.to_owned(),
            }
        };
        ModelLabels {
            requested: label(r.requested_model.as_deref()),
            used: label(Some(used)),
            response: label(r.response_model.as_deref()),
            rewrite,
        }
    }
}

/// A record's model names as metric labels (bounded).
pub struct ModelLabels {
    pub requested: String,
    pub used: String,
    pub response: String,
    /// The model used is not the one asked for.
    pub rewrite: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_follow_the_convention() {
        assert_eq!(operation(Endpoint::ChatCompletions), "chat");
        assert_eq!(operation(Endpoint::Generate), "text_completion");
        assert_eq!(operation(Endpoint::Embed), "embeddings");
    }
}
