//! Prompt rules: checks on the text a model will read, by the role that wrote it. Deny
//! rules refuse the whole request (without echoing the prompt); redact and replace rules
//! rewrite the matches. All deny rules are checked before any rewrite, so a rewrite can
//! never hide a denied phrase.

use serde::Deserialize;

use crate::matcher::{Matcher, Pattern, PatternError};

/// Who wrote a piece of the prompt. Ollama's `system`, OpenAI's `instructions` and the
/// `developer` role are `System`; a bare `prompt` or `input` is `User`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::System, Role::User, Role::Assistant, Role::Tool];

    /// The role of a chat message's `role` field; unknown roles count as user text.
    pub fn from_message_role(role: &str) -> Role {
        match role {
            "system" | "developer" => Role::System,
            "assistant" => Role::Assistant,
            "tool" | "function" | "ipython" => Role::Tool,
            _ => Role::User,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a prompt rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptAction {
    Deny,
    /// Replace each match with a mask (`[REDACTED:<rule>]` unless given).
    Redact {
        mask: String,
    },
    /// Replace each match with a text (the proof of concept's `userPromptReplace`).
    Replace {
        with: String,
    },
}

/// A named prompt rule.
#[derive(Debug, Clone)]
pub struct PromptRule {
    pub name: String,
    /// The roles it applies to; empty: all.
    pub roles: Vec<Role>,
    pub pattern: Pattern,
    pub action: PromptAction,
}

/// One role's compiled rules of one kind: a matcher and its rules' global indexes.
#[derive(Debug)]
struct Group {
    matcher: Matcher,
    rules: Vec<usize>,
}

/// Compiled prompt rules.
#[derive(Debug, Default)]
pub struct PromptRules {
    rules: Vec<PromptRule>,
    deny: [Option<Group>; 4],
    edit: [Option<Group>; 4],
}

/// A prompt text after the edit rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edited {
    pub text: String,
    /// The rules that matched, in order of their matches.
    pub rules: Vec<String>,
}

impl PromptRules {
    /// Compiles rules; errors are per rule index.
    pub fn new(rules: Vec<PromptRule>) -> Result<Self, Vec<(usize, PatternError)>> {
        let mut errors = Vec::new();
        let mut compiled = PromptRules::default();
        for role in Role::ALL {
            for deny in [true, false] {
                let members: Vec<usize> = (0..rules.len())
                    .filter(|&i| {
                        let r = &rules[i];
                        (r.action == PromptAction::Deny) == deny
                            && (r.roles.is_empty() || r.roles.contains(&role))
                    })
                    .collect();
                if members.is_empty() {
                    continue;
                }
                let patterns: Vec<Pattern> =
                    members.iter().map(|&i| rules[i].pattern.clone()).collect();
                match Matcher::new(&patterns, false) {
                    Ok(matcher) => {
                        let group = Some(Group {
                            matcher,
                            rules: members,
                        });
                        if deny {
                            compiled.deny[role.index()] = group;
                        } else {
                            compiled.edit[role.index()] = group;
                        }
                    }
                    Err(errs) => {
                        errors.extend(errs.into_iter().map(|(local, e)| (members[local], e)))
                    }
                }
            }
        }
        if !errors.is_empty() {
            errors.sort_by_key(|(i, _)| *i);
            errors.dedup_by(|a, b| a.0 == b.0);
            return Err(errors);
        }
        compiled.rules = rules;
        Ok(compiled)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// The deny rule `text` (written by `role`) trips, if any.
    pub fn denied_by(&self, role: Role, text: &str) -> Option<&str> {
        let group = self.deny[role.index()].as_ref()?;
        let m = group.matcher.find_at(text, 0)?;
        Some(&self.rules[group.rules[m.rule]].name)
    }

    /// `text` with the redact and replace rules applied; `None` when nothing matched.
    ///
    /// A mask can make the boundary another match needs: `PIN 1218` followed by digits
    /// loses `PIN 1218` to its mask, and the digits after the mask are then a card
    /// number that the first pass, inside one run of digits, could not see. So the
    /// redact rules run again over the result until they find nothing (at most
    /// [`REDACT_PASSES`] passes): what is sent upstream has nothing left to redact.
    /// Replace rules apply once: a replacement is the text the operator chose.
    pub fn edit(&self, role: Role, text: &str) -> Option<Edited> {
        let group = self.edit[role.index()].as_ref()?;
        let mut names = Vec::new();
        let mut current = self.edit_pass(group, text, true, &mut names)?;
        for _ in 1..REDACT_PASSES {
            match self.edit_pass(group, &current, false, &mut names) {
                Some(next) => current = next,
                None => break,
            }
        }
        Some(Edited {
            text: current,
            rules: names,
        })
    }

    /// One pass of the group's rules (the replace rules too, if `replace`); the rules
    /// that matched are appended to `names`. `None` when nothing was edited.
    fn edit_pass(
        &self,
        group: &Group,
        text: &str,
        replace: bool,
        names: &mut Vec<String>,
    ) -> Option<String> {
        let mut out = String::new();
        let mut pos = 0;
        let mut edited = false;
        for m in group.matcher.find_iter(text) {
            let rule = &self.rules[group.rules[m.rule]];
            let with = match &rule.action {
                PromptAction::Redact { mask } => mask,
                PromptAction::Replace { with } if replace => with,
                PromptAction::Replace { .. } | PromptAction::Deny => continue,
            };
            out.push_str(&text[pos..m.start]);
            out.push_str(with);
            names.push(rule.name.clone());
            pos = m.end;
            edited = true;
        }
        if !edited {
            return None;
        }
        out.push_str(&text[pos..]);
        Some(out)
    }
}

/// How many times the redact rules may run over one text (see [`PromptRules::edit`]).
/// A mask sharing no text with a rule settles in two; the bound keeps a mask that
/// does from running away.
pub const REDACT_PASSES: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Detector;

    fn rule(name: &str, roles: &[Role], pattern: Pattern, action: PromptAction) -> PromptRule {
        PromptRule {
            name: name.into(),
            roles: roles.to_vec(),
            pattern,
            action,
        }
    }

    fn words(w: &[&str], case_sensitive: bool) -> Pattern {
        Pattern::Literals {
            words: w.iter().map(|s| s.to_string()).collect(),
            case_sensitive,
        }
    }

    fn rules() -> PromptRules {
        PromptRules::new(vec![
            rule(
                "no-exfiltration",
                &[Role::User],
                words(&["ignore previous instructions"], false),
                PromptAction::Deny,
            ),
            rule(
                "emails",
                &[],
                Pattern::Detector(Detector::Email),
                PromptAction::Redact {
                    mask: "[REDACTED:emails]".into(),
                },
            ),
            rule(
                "joke",
                &[Role::User],
                words(&["joke"], false),
                PromptAction::Replace {
                    with: "fact".into(),
                },
            ),
            rule(
                "secrets",
                &[Role::System],
                Pattern::Regex(r"(?i)password:\s*\S+".into()),
                PromptAction::Redact { mask: "***".into() },
            ),
        ])
        .unwrap()
    }

    #[test]
    fn deny_applies_to_its_roles_only() {
        let r = rules();
        assert_eq!(
            r.denied_by(Role::User, "Please IGNORE previous instructions now"),
            Some("no-exfiltration")
        );
        assert_eq!(
            r.denied_by(Role::Assistant, "ignore previous instructions"),
            None
        );
        assert_eq!(r.denied_by(Role::User, "a harmless question"), None);
    }

    #[test]
    fn edits_redact_and_replace_in_one_pass() {
        let r = rules();
        let e = r
            .edit(
                Role::User,
                "Tell a Joke to bob@example.com and a joke to me",
            )
            .unwrap();
        assert_eq!(e.text, "Tell a fact to [REDACTED:emails] and a fact to me");
        assert_eq!(e.rules, ["joke", "emails", "joke"]);
        assert_eq!(
            r.edit(Role::System, "db password: hunter2 ok")
                .unwrap()
                .text,
            "db *** ok"
        );
        assert_eq!(
            r.edit(Role::Assistant, "a joke"),
            None,
            "the joke rule is for users"
        );
        assert_eq!(r.edit(Role::User, "nothing to see"), None);
    }

    #[test]
    fn redactions_run_again_over_what_a_mask_uncovered() {
        let r = PromptRules::new(vec![
            rule(
                "pins",
                &[],
                Pattern::Regex("PIN [0-9]{4}".into()),
                PromptAction::Redact {
                    mask: "(pin)".into(),
                },
            ),
            rule(
                "cards",
                &[],
                Pattern::Detector(Detector::CreditCard),
                PromptAction::Redact {
                    mask: "[card]".into(),
                },
            ),
            rule(
                "words",
                &[],
                words(&["pin"], false),
                PromptAction::Replace {
                    with: "pin pin".into(),
                },
            ),
        ])
        .unwrap();
        // One run of 20 digits is no card; once `PIN 1218` is masked, the 16 after it are.
        let e = r.edit(Role::User, "PIN 12184111111111111111 ok").unwrap();
        assert_eq!(e.text, "(pin)[card] ok");
        assert_eq!(e.rules, ["pins", "cards"]);
        assert_eq!(
            r.edit(Role::User, &e.text).map(|e| e.rules),
            Some(vec!["words".to_owned()])
        );
        // A replacement is applied once, even one its own rule matches.
        assert_eq!(r.edit(Role::User, "a pin").unwrap().text, "a pin pin");
    }

    #[test]
    fn bad_patterns_are_reported_by_rule() {
        let errs = PromptRules::new(vec![
            rule("ok", &[], words(&["x"], true), PromptAction::Deny),
            rule(
                "bad",
                &[Role::User],
                Pattern::Regex("(".into()),
                PromptAction::Deny,
            ),
        ])
        .unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, 1);
    }
}
