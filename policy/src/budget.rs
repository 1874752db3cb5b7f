//! Token budgets: limits on input, output or total tokens and on requests, per scope
//! (the pod, its namespace, or each model), over calendar-aligned UTC windows. Pure:
//! the gateway keeps the ledger; this module says which budgets apply, under which key,
//! and when a window starts and ends.

use crate::model::ModelPattern;

/// What a budget is counted per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Pod,
    Namespace,
    /// One count per model (within the budget's model filter).
    Model,
}

/// A calendar-aligned UTC window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Minute,
    Hour,
    Day,
    Month,
}

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// Days since 1970-01-01 to (year, month 1-12) and back (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month as u32)
}

fn days_from_civil(year: i64, month: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Window {
    /// The start of the window holding `now_ms` (UTC milliseconds).
    pub fn start(self, now_ms: i64) -> i64 {
        match self {
            Window::Minute => now_ms - now_ms.rem_euclid(MINUTE_MS),
            Window::Hour => now_ms - now_ms.rem_euclid(HOUR_MS),
            Window::Day => now_ms - now_ms.rem_euclid(DAY_MS),
            Window::Month => {
                let (y, m) = civil_from_days(now_ms.div_euclid(DAY_MS));
                days_from_civil(y, m) * DAY_MS
            }
        }
    }

    /// The end (exclusive) of the window holding `now_ms`: when it resets.
    pub fn end(self, now_ms: i64) -> i64 {
        match self {
            Window::Minute => self.start(now_ms) + MINUTE_MS,
            Window::Hour => self.start(now_ms) + HOUR_MS,
            Window::Day => self.start(now_ms) + DAY_MS,
            Window::Month => {
                let (y, m) = civil_from_days(now_ms.div_euclid(DAY_MS));
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(y, m) * DAY_MS
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
        }
    }
}

/// The limits of a budget; `None` is no limit on that measure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub total_tokens: Option<u64>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub requests: Option<u64>,
}

/// A compiled budget.
#[derive(Debug, Clone)]
pub struct Budget {
    pub name: String,
    pub scope: Scope,
    /// Only requests for these models count; empty: all.
    pub models: Vec<ModelPattern>,
    pub window: Window,
    pub limits: Limits,
    /// The share of each limit a gateway leases at a time from a shared store, percent.
    pub slice_percent: u32,
}

/// The slice share when a budget names none: 5% of each limit.
pub const DEFAULT_SLICE_PERCENT: u32 = 5;

/// Who is asking: the labels a scope key is made of.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub namespace: &'a str,
    pub pod: &'a str,
    pub model: &'a str,
}

impl Budget {
    /// How much of `limit` a gateway leases at a time (at least one unit).
    pub fn slice(&self, limit: u64) -> u64 {
        (limit
            .saturating_mul(u64::from(self.slice_percent))
            .div_ceil(100))
        .max(1)
    }

    pub fn applies(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m.matches(model))
    }

    /// The ledger key of this budget for a request: budgets sharing a key share counts.
    pub fn key(&self, who: &Subject<'_>) -> String {
        let scope = match self.scope {
            Scope::Pod => format!("pod/{}/{}", who.namespace, who.pod),
            Scope::Namespace => format!("namespace/{}", who.namespace),
            Scope::Model => format!("model/{}/{}", who.namespace, who.model),
        };
        self.key_prefix() + &scope
    }

    /// What every ledger key of this budget starts with (then its scope).
    pub fn key_prefix(&self) -> String {
        format!("{}|{}|", self.name, self.window.name())
    }
}

/// A UTC time (milliseconds since the epoch) as `YYYY-MM-DD HH:MM`.
pub fn utc_minute(ms: i64) -> String {
    let days = ms.div_euclid(DAY_MS);
    let rem = ms.rem_euclid(DAY_MS) / MINUTE_MS;
    let (y, m) = civil_from_days(days);
    let d = days - days_from_civil(y, m) + 1;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", rem / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(y: i64, m: u32, d: i64, h: i64, min: i64) -> i64 {
        (days_from_civil(y, m) + d - 1) * DAY_MS + h * HOUR_MS + min * MINUTE_MS
    }

    #[test]
    fn windows_are_calendar_aligned_in_utc() {
        let t = ms(2026, 11, 23, 13, 37) + 12_345;
        assert_eq!(Window::Minute.start(t), ms(2026, 11, 23, 13, 37));
        assert_eq!(Window::Hour.end(t), ms(2026, 11, 23, 14, 0));
        assert_eq!(Window::Day.start(t), ms(2026, 11, 23, 0, 0));
        assert_eq!(Window::Month.start(t), ms(2026, 11, 1, 0, 0));
        assert_eq!(Window::Month.end(t), ms(2026, 12, 1, 0, 0));
        let dec = ms(2026, 12, 31, 23, 59);
        assert_eq!(Window::Month.end(dec), ms(2027, 1, 1, 0, 0));
        let feb_leap = ms(2028, 2, 29, 12, 0);
        assert_eq!(Window::Month.start(feb_leap), ms(2028, 2, 1, 0, 0));
        assert_eq!(Window::Month.end(feb_leap), ms(2028, 3, 1, 0, 0));
        // 1970-01-01 is day 0; 2000-03-01 is day 11017.
        assert_eq!(days_from_civil(1970, 1), 0);
        assert_eq!(days_from_civil(2000, 3), 11_017);
        assert_eq!(civil_from_days(11_017), (2000, 3));
        assert_eq!(
            utc_minute(ms(2026, 11, 23, 13, 37) + 59_999),
            "2026-11-23 13:37"
        );
    }

    #[test]
    fn keys_follow_the_scope() {
        let b = |scope| Budget {
            name: "b".into(),
            scope,
            models: vec![],
            window: Window::Day,
            limits: Limits::default(),
            slice_percent: DEFAULT_SLICE_PERCENT,
        };
        let who = Subject {
            namespace: "ns",
            pod: "p",
            model: "m",
        };
        assert_eq!(b(Scope::Pod).key(&who), "b|day|pod/ns/p");
        assert_eq!(b(Scope::Namespace).key(&who), "b|day|namespace/ns");
        assert_eq!(b(Scope::Model).key(&who), "b|day|model/ns/m");
        let filtered = Budget {
            models: vec![ModelPattern::new("gpt-4*").unwrap()],
            ..b(Scope::Pod)
        };
        assert!(filtered.applies("gpt-4o") && !filtered.applies("llama3"));
        let s = b(Scope::Pod);
        assert_eq!(s.slice(1000), 50);
        assert_eq!(s.slice(30), 2, "rounded up");
        assert_eq!(s.slice(3), 1, "never zero");
    }
}
