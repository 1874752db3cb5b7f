//! Label selectors in their string form (`app=chat,tier in (a,b),!legacy`), as
//! `kubectl get -l` takes them: the `kube-gateway.io/selector` annotation of a policy
//! ConfigMap. Parsed into kube's [`Selector`], which does the matching.

use std::collections::BTreeSet;

use kube::core::{Expression, Selector};

/// Why a selector string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label selector {text:?}: {reason}")]
pub struct SelectorError {
    pub text: String,
    pub reason: String,
}

/// Parses a label selector. The empty string selects everything.
///
/// Supported, as in Kubernetes: `key`, `!key`, `key=value`, `key==value`,
/// `key!=value`, `key in (v1,v2)`, `key notin (v1,v2)`, joined by commas (all must
/// hold). Keys and values are checked against Kubernetes' label syntax.
pub fn parse(text: &str) -> Result<Selector, SelectorError> {
    let fail = |reason: String| SelectorError {
        text: text.to_owned(),
        reason,
    };
    let mut expressions = Vec::new();
    if text.trim().is_empty() {
        return Ok(Selector::default());
    }
    for part in split_top_level(text).map_err(&fail)? {
        expressions.push(requirement(part.trim()).map_err(&fail)?);
    }
    Ok(expressions.into_iter().collect())
}

/// Splits at the commas that are not inside parentheses.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' if depth == 0 => depth = 1,
            '(' => return Err("nested parentheses".into()),
            ')' if depth == 1 => depth = 0,
            ')' => return Err("unbalanced `)`".into()),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unclosed `(`".into());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn requirement(part: &str) -> Result<Expression, String> {
    if part.is_empty() {
        return Err("empty requirement (two commas, or a comma at an end)".into());
    }
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        check_key(key)?;
        return Ok(Expression::DoesNotExist(key.to_owned()));
    }
    let key_end = part
        .find(|c: char| c.is_whitespace() || "=!(".contains(c))
        .unwrap_or(part.len());
    let key = &part[..key_end];
    check_key(key)?;
    let rest = part[key_end..].trim_start();
    if rest.is_empty() {
        return Ok(Expression::Exists(key.to_owned()));
    }
    for (op, not) in [("==", false), ("!=", true), ("=", false)] {
        if let Some(value) = rest.strip_prefix(op) {
            let value = value.trim();
            check_value(value)?;
            return Ok(if not {
                Expression::NotEqual(key.to_owned(), value.to_owned())
            } else {
                Expression::Equal(key.to_owned(), value.to_owned())
            });
        }
    }
    for (word, not) in [("notin", true), ("in", false)] {
        if let Some(set) = rest.strip_prefix(word) {
            let values = value_set(set.trim_start(), key)?;
            return Ok(if not {
                Expression::NotIn(key.to_owned(), values)
            } else {
                Expression::In(key.to_owned(), values)
            });
        }
    }
    Err(format!(
        "after key {key:?}: expected `=`, `==`, `!=`, `in (...)`, `notin (...)` or a comma, found {rest:?}"
    ))
}

fn value_set(text: &str, key: &str) -> Result<BTreeSet<String>, String> {
    let inner = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| format!("the values for {key:?} must be in parentheses: `(a,b)`"))?;
    if inner.trim().is_empty() {
        return Err(format!("the set of values for {key:?} is empty"));
    }
    inner
        .split(',')
        .map(|v| {
            let v = v.trim();
            check_value(v).map(|()| v.to_owned())
        })
        .collect()
}

/// A name segment: at most 63 characters, alphanumeric at both ends, `-_.` inside.
fn name_ok(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || "-_.".contains(c))
}

/// A DNS subdomain (a key's prefix): lowercase labels joined by dots, at most 253.
fn prefix_ok(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn check_key(key: &str) -> Result<(), String> {
    let ok = match key.split_once('/') {
        Some((prefix, name)) => prefix_ok(prefix) && name_ok(name),
        None => name_ok(key),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{key:?} is not a valid label key"))
    }
}

fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() || name_ok(value) {
        Ok(())
    } else {
        Err(format!("{value:?} is not a valid label value"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::core::SelectorExt;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_every_operator() {
        let s = parse("app=chat, tier in (a, b),env!=prod,gpu,!legacy,x==y,z notin (q)").unwrap();
        assert_eq!(
            s.to_string(),
            "app=chat,tier in (a,b),env!=prod,gpu,!legacy,x=y,z notin (q)"
        );
    }

    #[test]
    fn matches_like_kubernetes() {
        let s = parse("app=chat,tier in (a,b)").unwrap();
        assert!(s.matches(&labels(&[("app", "chat"), ("tier", "b")])));
        assert!(!s.matches(&labels(&[("app", "chat"), ("tier", "c")])));
        assert!(!s.matches(&labels(&[("app", "chat")])));
        let s = parse("env!=prod,!legacy").unwrap();
        assert!(s.matches(&labels(&[])), "absent keys satisfy != and !");
        assert!(!s.matches(&labels(&[("legacy", "")])));
        let s = parse("team notin (x)").unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(!s.matches(&labels(&[("team", "x")])));
    }

    #[test]
    fn empty_selects_everything() {
        let s = parse("  ").unwrap();
        assert!(s.selects_all());
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn prefixed_keys() {
        let s = parse("app.kubernetes.io/name=chat").unwrap();
        assert!(s.matches(&labels(&[("app.kubernetes.io/name", "chat")])));
        assert!(parse("Bad_Prefix/name=x").is_err());
    }

    #[test]
    fn refuses_malformed_text() {
        for bad in [
            "app=chat,",
            ",app",
            "app in a,b",
            "app in ()",
            "app in (a",
            "app)",
            "app > 3",
            "app=has space",
            "-app",
            "app=x(y)",
        ] {
            let e = parse(bad).expect_err(bad);
            assert_eq!(e.text, bad);
        }
    }
}
