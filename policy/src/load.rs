//! Loading a policy: parse (YAML or JSON), deserialize strictly with the path of any
//! error, then validate and compile, reporting every error at once with its path. The
//! proof of concept's JSON format is recognized and converted, its paths kept in errors.

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::budget::{Budget, Limits, Scope, Window};
use crate::doc::*;
use crate::limits::MaxTokens;
use crate::matcher::{Pattern, PatternError};
use crate::model::{ModelPattern, ModelRewrite, ModelRules, RewriteRule, Split};
use crate::prompt::{PromptAction, PromptRule, PromptRules, Role};
use crate::response::{ResponseAction, ResponseRule, ResponseRules};
use crate::tokens::Encoding;
use crate::{Format, Policy};

/// One problem in a policy document, at a path such as `promptRules[2].match.regex`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a policy document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

fn err(path: impl Into<String>, message: impl fmt::Display) -> PolicyError {
    PolicyError {
        path: path.into(),
        message: message.to_string(),
    }
}

/// A parsed document of either format, as a tree that keeps paths for errors.
enum Tree {
    Json(serde_json::Value),
    Yaml(serde_yaml_ng::Value),
}

impl Tree {
    fn parse(text: &str) -> Result<Self, PolicyError> {
        if text.trim_start().starts_with('{') {
            serde_json::from_str(text)
                .map(Tree::Json)
                .map_err(|e| err("", format!("not valid JSON: {e}")))
        } else {
            serde_yaml_ng::from_str(text)
                .map(Tree::Yaml)
                .map_err(|e| err("", format!("not valid YAML: {e}")))
        }
    }

    fn has_key(&self, key: &str) -> bool {
        match self {
            Tree::Json(v) => v.get(key).is_some(),
            Tree::Yaml(v) => v.get(key).is_some(),
        }
    }

    fn typed<T: DeserializeOwned>(self) -> Result<T, PolicyError> {
        let result = match self {
            Tree::Json(v) => serde_path_to_error::deserialize(v)
                .map_err(|e| (e.path().to_string(), e.into_inner().to_string())),
            Tree::Yaml(v) => serde_path_to_error::deserialize(v)
                .map_err(|e| (e.path().to_string(), e.into_inner().to_string())),
        };
        result
            .map_err(|(path, message)| err(if path == "." { String::new() } else { path }, message))
    }
}

/// Where each part of the compiled policy came from, for error paths.
struct Origins {
    rewrite: Vec<String>,
    prompt: Vec<String>,
    response: Vec<String>,
    max_tokens: String,
}

impl Origins {
    fn v1(doc: &PolicyDoc) -> Self {
        Self {
            rewrite: (0..doc.models.rewrite.len())
                .map(|i| format!("models.rewrite[{i}]"))
                .collect(),
            prompt: (0..doc.prompt_rules.len())
                .map(|i| format!("promptRules[{i}]"))
                .collect(),
            response: (0..doc.response_rules.len())
                .map(|i| format!("responseRules[{i}]"))
                .collect(),
            max_tokens: "maxTokens.default".into(),
        }
    }
}

/// Loads and compiles a policy from its text.
pub fn load(text: &str) -> Result<Policy, PolicyErrors> {
    let one = |e: PolicyError| PolicyErrors(vec![e]);
    let tree = Tree::parse(text).map_err(one)?;
    let (doc, origins, format, mut notes) = if tree.has_key("apiVersion") {
        let doc: PolicyDoc = tree.typed().map_err(one)?;
        if doc.api_version != API_VERSION {
            return Err(one(err(
                "apiVersion",
                format!("must be {API_VERSION:?}, not {:?}", doc.api_version),
            )));
        }
        let origins = Origins::v1(&doc);
        (doc, origins, Format::V1Alpha1, Vec::new())
    } else if tree.has_key("request") || tree.has_key("response") {
        let legacy: LegacyDoc = tree.typed().map_err(one)?;
        let (doc, origins, notes) = from_legacy(legacy).map_err(one)?;
        (doc, origins, Format::ProofOfConcept, notes)
    } else {
        return Err(one(err(
            "apiVersion",
            format!("missing: a policy starts with `apiVersion: {API_VERSION}`"),
        )));
    };
    let mut policy = compile(doc, &origins)?;
    policy.format = format;
    policy.notes.append(&mut notes);
    policy.hash = hash(text);
    Ok(policy)
}

/// The hash that identifies a policy text: SHA-256, hex.
pub fn hash(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The proof of concept's format in v1alpha1 terms.
fn from_legacy(l: LegacyDoc) -> Result<(PolicyDoc, Origins, Vec<String>), PolicyError> {
    let max = match l.request.max_tokens.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| err("request.maxTokens", format!("{s:?} is not a whole number")))?,
        ),
    };
    let mut notes = Vec::new();
    if l.request.debug || l.response.debug {
        notes.push(
            "the proof of concept's `debug` flags have no effect here; use RUST_LOG=debug"
                .to_owned(),
        );
    }
    let n_replace = l.request.user_prompt_replace.len();
    let doc = PolicyDoc {
        api_version: API_VERSION.into(),
        kind: None,
        models: ModelsDoc {
            rewrite: l
                .request
                .model_replace
                .into_iter()
                .map(|r| RewriteDoc {
                    from: r.orig,
                    to: r.new,
                })
                .collect(),
            ..Default::default()
        },
        max_tokens: MaxTokensDoc {
            default: max,
            models: Vec::new(),
        },
        prompt_rules: l
            .request
            .user_prompt_replace
            .into_iter()
            .enumerate()
            .map(|(i, r)| PromptRuleDoc {
                name: format!("userPromptReplace[{i}]"),
                roles: vec![Role::User],
                matches: MatchDoc {
                    literals: vec![r.orig],
                    case_sensitive: r.case_sensitive,
                    ..Default::default()
                },
                action: PromptActionDoc::Replace,
                mask: None,
                replacement: Some(r.new),
            })
            .collect(),
        // The example lists "rabbit" and "Rabbit" apart: its matching was case-sensitive.
        response_rules: if l.response.banned_words.is_empty() {
            Vec::new()
        } else {
            vec![ResponseRuleDoc {
                name: "bannedWords".into(),
                matches: MatchDoc {
                    literals: l.response.banned_words,
                    case_sensitive: true,
                    ..Default::default()
                },
                action: ResponseActionDoc::Redact,
                mask: None,
            }]
        },
        tokenizers: Vec::new(),
        budgets: Vec::new(),
    };
    let origins = Origins {
        rewrite: (0..doc.models.rewrite.len())
            .map(|i| format!("request.modelReplace[{i}]"))
            .collect(),
        prompt: (0..n_replace)
            .map(|i| format!("request.userPromptReplace[{i}]"))
            .collect(),
        response: vec!["response.bannedWords".into()],
        max_tokens: "request.maxTokens".into(),
    };
    Ok((doc, origins, notes))
}

fn pattern(m: MatchDoc, at: &str, errors: &mut Vec<PolicyError>) -> Option<Pattern> {
    let given = usize::from(!m.literals.is_empty())
        + usize::from(m.regex.is_some())
        + usize::from(m.detector.is_some());
    if given != 1 {
        errors.push(err(
            format!("{at}.match"),
            "give exactly one of `literals`, `regex`, `detector`",
        ));
        return None;
    }
    Some(if let Some(re) = m.regex {
        Pattern::Regex(re)
    } else if let Some(d) = m.detector {
        Pattern::Detector(d)
    } else {
        Pattern::Literals {
            words: m.literals,
            case_sensitive: m.case_sensitive,
        }
    })
}

/// Per-rule pattern errors, at the paths of the rules they name (`at[rule]`).
fn pattern_errors(errs: Vec<(usize, PatternError)>, at: &[String], errors: &mut Vec<PolicyError>) {
    for (i, e) in errs {
        let path = match e {
            PatternError::EmptyLiteral => format!("{}.match.literals", at[i]),
            PatternError::Regex(_) | PatternError::Unbounded | PatternError::MatchesEmpty => {
                format!("{}.match.regex", at[i])
            }
        };
        errors.push(err(path, e));
    }
}

fn budget_paths(i: usize) -> String {
    format!("budgets[{i}]")
}

/// A redact rule's mask when it gives none.
fn default_mask(rule: &str) -> String {
    format!("[REDACTED:{rule}]")
}

fn model_pattern(p: &str, at: String, errors: &mut Vec<PolicyError>) -> Option<ModelPattern> {
    ModelPattern::new(p)
        .map_err(|e| errors.push(err(at, e)))
        .ok()
}

fn check_names<'a>(names: impl Iterator<Item = (&'a str, &'a str)>, errors: &mut Vec<PolicyError>) {
    let mut seen = std::collections::HashSet::new();
    for (name, at) in names {
        if name.is_empty() {
            errors.push(err(format!("{at}.name"), "must not be empty"));
        } else if !seen.insert(name) {
            errors.push(err(
                format!("{at}.name"),
                format!("{name:?} is used by an earlier rule"),
            ));
        }
    }
}

/// Validates and compiles a document; every error, with its path.
fn compile(doc: PolicyDoc, o: &Origins) -> Result<Policy, PolicyErrors> {
    let mut errors = Vec::new();
    let m = doc.models;

    let rewrite = m
        .rewrite
        .iter()
        .zip(&o.rewrite)
        .filter_map(|(r, at)| {
            RewriteRule::new(&r.from, &r.to)
                .map_err(|e| errors.push(err(at.clone(), e)))
                .ok()
        })
        .collect();
    let splits = m
        .splits
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| {
            Split::new(&s.from, s.to.into_iter().collect())
                .map_err(|e| errors.push(err(format!("models.splits[{i}]"), e)))
                .ok()
        })
        .collect();
    let allow = m
        .allow
        .iter()
        .enumerate()
        .filter_map(|(i, p)| model_pattern(p, format!("models.allow[{i}]"), &mut errors))
        .collect();
    let deny = m
        .deny
        .iter()
        .enumerate()
        .filter_map(|(i, p)| model_pattern(p, format!("models.deny[{i}]"), &mut errors))
        .collect();

    let mut max_tokens = MaxTokens {
        default: doc.max_tokens.default,
        per_model: Vec::new(),
    };
    if max_tokens.default == Some(0) {
        errors.push(err(o.max_tokens.clone(), "must be at least 1"));
    }
    for (i, mm) in doc.max_tokens.models.iter().enumerate() {
        if mm.max == 0 {
            errors.push(err(
                format!("maxTokens.models[{i}].max"),
                "must be at least 1",
            ));
        }
        if let Some(p) = model_pattern(
            &mm.model,
            format!("maxTokens.models[{i}].model"),
            &mut errors,
        ) {
            max_tokens.per_model.push((p, mm.max));
        }
    }

    check_names(
        doc.prompt_rules
            .iter()
            .zip(&o.prompt)
            .map(|(r, at)| (r.name.as_str(), at.as_str())),
        &mut errors,
    );
    let mut prompt_rules = Vec::new();
    let mut prompt_at = Vec::new();
    for (r, at) in doc.prompt_rules.into_iter().zip(&o.prompt) {
        let action = match r.action {
            PromptActionDoc::Deny => PromptAction::Deny,
            PromptActionDoc::Redact => PromptAction::Redact {
                mask: r.mask.unwrap_or_else(|| default_mask(&r.name)),
            },
            PromptActionDoc::Replace => match r.replacement {
                Some(with) => PromptAction::Replace { with },
                None => {
                    errors.push(err(
                        format!("{at}.replacement"),
                        "a replace rule needs a replacement",
                    ));
                    continue;
                }
            },
        };
        if let Some(p) = pattern(r.matches, at, &mut errors) {
            prompt_rules.push(PromptRule {
                name: r.name,
                roles: r.roles,
                pattern: p,
                action,
            });
            prompt_at.push(at.clone());
        }
    }
    let prompt = PromptRules::new(prompt_rules).unwrap_or_else(|errs| {
        pattern_errors(errs, &prompt_at, &mut errors);
        PromptRules::default()
    });

    check_names(
        doc.response_rules
            .iter()
            .zip(&o.response)
            .map(|(r, at)| (r.name.as_str(), at.as_str())),
        &mut errors,
    );
    let mut response_rules = Vec::new();
    let mut response_at = Vec::new();
    for (r, at) in doc.response_rules.into_iter().zip(&o.response) {
        let action = match r.action {
            ResponseActionDoc::Redact => ResponseAction::Redact {
                mask: r.mask.unwrap_or_else(|| default_mask(&r.name)),
            },
            ResponseActionDoc::Block => ResponseAction::Block,
        };
        if let Some(p) = pattern(r.matches, at, &mut errors) {
            response_rules.push(ResponseRule {
                name: r.name,
                pattern: p,
                action,
            });
            response_at.push(at.clone());
        }
    }
    let response = ResponseRules::new(response_rules).unwrap_or_else(|errs| {
        pattern_errors(errs, &response_at, &mut errors);
        ResponseRules::empty()
    });

    let tokenizers = doc
        .tokenizers
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let p = model_pattern(&t.model, format!("tokenizers[{i}].model"), &mut errors)?;
            Some((
                p,
                match t.encoding {
                    EncodingDoc::Cl100kBase => Encoding::Cl100kBase,
                    EncodingDoc::O200kBase => Encoding::O200kBase,
                },
            ))
        })
        .collect();

    let budget_at: Vec<String> = (0..doc.budgets.len()).map(budget_paths).collect();
    check_names(
        doc.budgets
            .iter()
            .zip(&budget_at)
            .map(|(b, at)| (b.name.as_str(), at.as_str())),
        &mut errors,
    );
    let mut budgets = Vec::new();
    for (i, b) in doc.budgets.into_iter().enumerate() {
        let at = budget_paths(i);
        let l = &b.limits;
        if l.total_tokens.is_none()
            && l.input_tokens.is_none()
            && l.output_tokens.is_none()
            && l.requests.is_none()
        {
            errors.push(err(
                format!("{at}.limits"),
                "set at least one of totalTokens, inputTokens, outputTokens, requests",
            ));
        }
        let slice_percent = b
            .slice_percent
            .unwrap_or(crate::budget::DEFAULT_SLICE_PERCENT);
        if !(1..=100).contains(&slice_percent) {
            errors.push(err(
                format!("{at}.slicePercent"),
                format!("{slice_percent} is not a percentage between 1 and 100"),
            ));
        }
        let models = b
            .models
            .iter()
            .enumerate()
            .filter_map(|(j, m)| model_pattern(m, format!("{at}.models[{j}]"), &mut errors))
            .collect();
        budgets.push(Budget {
            name: b.name,
            scope: match b.scope {
                ScopeDoc::Pod => Scope::Pod,
                ScopeDoc::Namespace => Scope::Namespace,
                ScopeDoc::Model => Scope::Model,
            },
            models,
            window: match b.window {
                WindowDoc::Minute => Window::Minute,
                WindowDoc::Hour => Window::Hour,
                WindowDoc::Day => Window::Day,
                WindowDoc::Month => Window::Month,
            },
            limits: Limits {
                total_tokens: l.total_tokens,
                input_tokens: l.input_tokens,
                output_tokens: l.output_tokens,
                requests: l.requests,
            },
            slice_percent,
        });
    }

    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    Ok(Policy {
        budgets,
        models: ModelRules {
            splits,
            rewrite: ModelRewrite::new(rewrite),
            allow,
            deny,
        },
        max_tokens,
        prompt,
        response: Arc::new(response),
        tokenizers,
        format: Format::V1Alpha1,
        hash: String::new(),
        notes: Vec::new(),
    })
}
