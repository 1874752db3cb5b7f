//! Built-in detectors for secrets and personal data, usable in rules by name. Each is a
//! bounded regex, some with a check that weeds out look-alikes (Luhn for card numbers).

use serde::Deserialize;

/// A detector a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Detector {
    Email,
    CreditCard,
    Ipv4,
    AwsAccessKey,
    OpenaiKey,
    BearerToken,
    Jwt,
}

impl Detector {
    pub const ALL: [Detector; 7] = [
        Detector::Email,
        Detector::CreditCard,
        Detector::Ipv4,
        Detector::AwsAccessKey,
        Detector::OpenaiKey,
        Detector::BearerToken,
        Detector::Jwt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Detector::Email => "email",
            Detector::CreditCard => "credit-card",
            Detector::Ipv4 => "ipv4",
            Detector::AwsAccessKey => "aws-access-key",
            Detector::OpenaiKey => "openai-key",
            Detector::BearerToken => "bearer-token",
            Detector::Jwt => "jwt",
        }
    }

    /// The pattern; every one has a bounded match length, so detectors work on streams.
    pub fn pattern(self) -> &'static str {
        match self {
            Detector::Email => {
                r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,4}\b"
            }
            Detector::CreditCard => r"\b[0-9](?:[ -]?[0-9]){12,18}\b",
            Detector::Ipv4 => {
                r"\b(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\b"
            }
            Detector::AwsAccessKey => {
                r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"
            }
            Detector::OpenaiKey => r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,200}",
            Detector::BearerToken => r"(?i)\bbearer [A-Za-z0-9._~+/-]{16,512}={0,2}",
            Detector::Jwt => {
                r"\beyJ[A-Za-z0-9_-]{5,1024}\.eyJ[A-Za-z0-9_-]{5,2048}\.[A-Za-z0-9_-]{10,1024}"
            }
        }
    }

    /// A check on a candidate match beyond the pattern.
    pub fn accepts(self, candidate: &str) -> bool {
        match self {
            Detector::CreditCard => luhn(candidate),
            _ => true,
        }
    }
}

/// The Luhn checksum of the digits in `s` (separators ignored).
pub fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if digits.len() < 13 {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 {
                    d * 2 - 9
                } else {
                    d * 2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn finds(d: Detector, text: &str) -> Vec<String> {
        let re = Regex::new(d.pattern()).unwrap();
        re.find_iter(text)
            .map(|m| m.as_str().to_owned())
            .filter(|m| d.accepts(m))
            .collect()
    }

    #[test]
    fn each_detector_finds_its_kind_and_not_look_alikes() {
        assert_eq!(
            finds(Detector::Email, "mail jane.doe+x@example.co.uk now"),
            ["jane.doe+x@example.co.uk"]
        );
        assert!(finds(Detector::Email, "not@an address").is_empty());
        assert_eq!(
            finds(Detector::CreditCard, "card 4111 1111 1111 1111 ok"),
            ["4111 1111 1111 1111"]
        );
        assert!(
            finds(Detector::CreditCard, "order 4111 1111 1111 1112").is_empty(),
            "Luhn fails"
        );
        assert_eq!(
            finds(Detector::Ipv4, "host 10.0.12.255:80"),
            ["10.0.12.255"]
        );
        assert!(finds(Detector::Ipv4, "version 1.2.3.456").is_empty());
        assert_eq!(
            finds(Detector::AwsAccessKey, "key=AKIAIOSFODNN7EXAMPLE;"),
            ["AKIAIOSFODNN7EXAMPLE"]
        );
        assert_eq!(
            finds(
                Detector::OpenaiKey,
                "use sk-proj-abcdefghijklmnopqrstuv123 please"
            )
            .len(),
            1
        );
        assert!(finds(Detector::OpenaiKey, "task-abcdefghijklmnopqrstuvwxyz").is_empty());
        assert_eq!(
            finds(
                Detector::BearerToken,
                "Authorization: Bearer abcdefghijklmnop1234"
            )
            .len(),
            1
        );
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert_eq!(finds(Detector::Jwt, &format!("token {jwt} end")), [jwt]);
    }

    #[test]
    fn every_detector_is_bounded() {
        for d in Detector::ALL {
            let hir = regex_syntax::parse(d.pattern()).unwrap();
            assert!(
                hir.properties().maximum_len().is_some(),
                "{} unbounded",
                d.name()
            );
        }
    }
}
