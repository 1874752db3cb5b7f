//! The access log: one line a finished request, in the log's format (text or JSON), with
//! every field the usage record has. The line is written here, field by field, into the
//! recorder's batch ([`crate::logging::AccessBatch`]), laid out exactly as the tracing
//! formatter lays out the same event ([`event`], which is also what is logged when the
//! gateway's own logging is not set up): the formatter's generic field visitors cost more
//! than the rest of a small request's record (measured: 1.9 of 25.7 us a request).

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::logging::{self, LogFormat, ACCESS_TARGET};
use crate::record::UsageRecord;

/// Logs `r`'s access line (`bodies`: the request and answer text, with `--log-bodies`).
pub fn log(r: &UsageRecord, bodies: Option<&str>) {
    if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
        return;
    }
    let written = logging::write_access(|format, out| {
        line(format, r, bodies, SystemTime::now(), out);
    });
    if !written {
        event(r, bodies);
    }
}

/// The access line as a tracing event (the layout [`line`] follows).
pub fn event(r: &UsageRecord, bodies: Option<&str>) {
    tracing::info!(
        target: ACCESS_TARGET,
        request_id = %r.request_id,
        namespace = %r.workload.namespace,
        pod = %r.workload.pod,
        service_account = %r.workload.service_account,
        api = r.api_name(),
        endpoint = r.endpoint_name(),
        method = %r.method,
        path = %r.path,
        peer = %r.peer,
        destination = %r.destination,
        requested_model = r.requested_model.as_deref().unwrap_or(""),
        used_model = r.used_model.as_deref().unwrap_or(""),
        status = r.status,
        outcome = r.outcome.as_str(),
        input_tokens = r.input_tokens,
        input_source = r.input_source.as_str(),
        output_tokens = r.output_tokens,
        output_source = r.output_source.as_str(),
        cached_tokens = r.cached_tokens.unwrap_or(0),
        reasoning_tokens = r.reasoning_tokens.unwrap_or(0),
        streamed = r.streamed,
        latency_ms = ms(r.latency),
        first_chunk_ms = r.first_chunk.map(ms).unwrap_or(-1.0),
        bytes_in = r.bytes_in,
        bytes_out = r.bytes_out,
        error = r.error.as_deref().unwrap_or(""),
        rules = r.rules.join(",").as_str(),
        bodies = bodies.unwrap_or(""),
        "request"
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A field's value, as the event records it.
enum Value<'a> {
    /// Written with `Display` (`%` in the event): as it is in text, a string in JSON.
    Shown(&'a dyn std::fmt::Display),
    Str(&'a str),
    U64(u64),
    F64(f64),
    Bool(bool),
}

/// Writes `r`'s access line, ended by a line feed, as of `now`.
pub fn line(
    format: LogFormat,
    r: &UsageRecord,
    bodies: Option<&str>,
    now: SystemTime,
    out: &mut Vec<u8>,
) {
    let rules = r.rules.join(",");
    let fields: [(&str, Value); 28] = [
        ("request_id", Value::Shown(&r.request_id)),
        ("namespace", Value::Shown(&r.workload.namespace)),
        ("pod", Value::Shown(&r.workload.pod)),
        ("service_account", Value::Shown(&r.workload.service_account)),
        ("api", Value::Str(r.api_name())),
        ("endpoint", Value::Str(r.endpoint_name())),
        ("method", Value::Shown(&r.method)),
        ("path", Value::Shown(&r.path)),
        ("peer", Value::Shown(&r.peer)),
        ("destination", Value::Shown(&r.destination)),
        (
            "requested_model",
            Value::Str(r.requested_model.as_deref().unwrap_or("")),
        ),
        (
            "used_model",
            Value::Str(r.used_model.as_deref().unwrap_or("")),
        ),
        ("status", Value::U64(u64::from(r.status))),
        ("outcome", Value::Str(r.outcome.as_str())),
        ("input_tokens", Value::U64(r.input_tokens)),
        ("input_source", Value::Str(r.input_source.as_str())),
        ("output_tokens", Value::U64(r.output_tokens)),
        ("output_source", Value::Str(r.output_source.as_str())),
        ("cached_tokens", Value::U64(r.cached_tokens.unwrap_or(0))),
        (
            "reasoning_tokens",
            Value::U64(r.reasoning_tokens.unwrap_or(0)),
        ),
        ("streamed", Value::Bool(r.streamed)),
        ("latency_ms", Value::F64(ms(r.latency))),
        (
            "first_chunk_ms",
            Value::F64(r.first_chunk.map(ms).unwrap_or(-1.0)),
        ),
        ("bytes_in", Value::U64(r.bytes_in)),
        ("bytes_out", Value::U64(r.bytes_out)),
        ("error", Value::Str(r.error.as_deref().unwrap_or(""))),
        ("rules", Value::Str(&rules)),
        ("bodies", Value::Str(bodies.unwrap_or(""))),
    ];
    let mut scratch = String::new();
    match format {
        LogFormat::Text => {
            timestamp(now, out);
            out.extend_from_slice(b"  INFO access: request");
            for (name, value) in &fields {
                out.push(b' ');
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
                match value {
                    Value::Shown(v) => {
                        scratch.clear();
                        let _ = write!(scratch, "{v}");
                        out.extend_from_slice(scratch.as_bytes());
                    }
                    Value::Str(s) => debug_str(s, out),
                    Value::U64(n) => {
                        out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes())
                    }
                    Value::F64(x) => {
                        let _ = write!(out, "{x:?}");
                    }
                    Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
                }
            }
        }
        LogFormat::Json => {
            out.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(now, out);
            out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
            for (name, value) in &fields {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"\":");
                // Writing into memory cannot fail.
                let _ = match value {
                    Value::Shown(v) => {
                        scratch.clear();
                        let _ = write!(scratch, "{v}");
                        serde_json::to_writer(&mut *out, scratch.as_str())
                    }
                    Value::Str(s) => serde_json::to_writer(&mut *out, s),
                    Value::U64(n) => serde_json::to_writer(&mut *out, n),
                    Value::F64(x) => serde_json::to_writer(&mut *out, x),
                    Value::Bool(b) => serde_json::to_writer(&mut *out, b),
                };
            }
            out.extend_from_slice(b",\"target\":\"access\"}");
        }
    }
    out.push(b'\n');
}

/// A string as `{:?}` writes it: quoted, escaped; plain text without the formatter.
fn debug_str(s: &str, out: &mut Vec<u8>) {
    let plain = s
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// RFC 3339 in UTC to the microsecond, as the tracing formatter writes its time.
fn timestamp(now: SystemTime, out: &mut Vec<u8>) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil(days as i64);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_micros()
    );
}

/// The calendar date `days` after 1970-01-01 (proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Endpoint;
    use crate::record::{Identity, Outcome, TokenSource};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    /// What the tracing formatter writes for the event, configured as
    /// [`crate::logging::init`] configures it off a terminal.
    fn by_tracing(format: LogFormat, r: &UsageRecord, bodies: Option<&str>) -> String {
        let buf = Buf::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_ansi(false);
        match format {
            LogFormat::Text => {
                tracing::subscriber::with_default(builder.finish(), || event(r, bodies))
            }
            LogFormat::Json => tracing::subscriber::with_default(
                builder
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .finish(),
                || event(r, bodies),
            ),
        }
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    fn by_hand(format: LogFormat, r: &UsageRecord, bodies: Option<&str>) -> String {
        let mut out = Vec::new();
        line(format, r, bodies, SystemTime::now(), &mut out);
        String::from_utf8(out).unwrap()
    }

    /// The line without its time (the two were written at different instants).
    fn untimed(format: LogFormat, line: &str) -> String {
        match format {
            LogFormat::Text => line.split_once(' ').unwrap().1.to_owned(),
            LogFormat::Json => {
                let at = line.find("\"level\"").unwrap();
                line[at..].to_owned()
            }
        }
    }

    fn record(odd: &str) -> UsageRecord {
        UsageRecord {
            request_id: "kgw-0123456789abcdef-42".into(),
            workload: Arc::new(Identity {
                namespace: "team-a".into(),
                pod: "chat-7d9f".into(),
                service_account: "sa".into(),
                ..Default::default()
            }),
            started_at: SystemTime::now(),
            peer: "10.0.0.7:41000".parse().unwrap(),
            destination: "10.0.0.9:11434".into(),
            endpoint: Some(Endpoint::ChatCompletions),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            requested_model: Some(format!("llama3{odd}")),
            used_model: None,
            response_model: None,
            status: 200,
            outcome: Outcome::Redacted,
            input_tokens: 21,
            input_source: TokenSource::Provider,
            output_tokens: u64::MAX,
            output_source: TokenSource::Calibrated,
            cached_tokens: Some(3),
            reasoning_tokens: None,
            finish_reason: Some("stop".into()),
            streamed: true,
            latency: Duration::from_nanos(1_822_027),
            first_chunk: None,
            bytes_in: 180,
            bytes_out: 394,
            error: Some(format!("upstream said {odd}")),
            rules: vec!["emails".into(), "cards".into()],
        }
    }

    #[test]
    fn the_line_is_the_tracing_formatters_in_both_formats() {
        let odd = [
            "",
            "say \"hi\"",
            "\"quoted\" \\ back",
            "line\nend\ttab",
            "é 😀 \u{1b}[31m \u{7f} \u{85} \u{200b}",
            "'single'",
        ];
        for format in [LogFormat::Text, LogFormat::Json] {
            for o in odd {
                for bodies in [None, Some("prompt: \"hi\"\n")] {
                    let mut r = record(o);
                    assert_eq!(
                        untimed(format, &by_hand(format, &r, bodies)),
                        untimed(format, &by_tracing(format, &r, bodies)),
                        "{format:?} {o:?}"
                    );
                    r.first_chunk = Some(Duration::from_micros(333));
                    r.latency = Duration::from_secs(12_345);
                    r.endpoint = None;
                    r.rules.clear();
                    assert_eq!(
                        untimed(format, &by_hand(format, &r, bodies)),
                        untimed(format, &by_tracing(format, &r, bodies)),
                        "{format:?} {o:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_time_is_rfc_3339_to_the_microsecond() {
        let at = |secs: u64, micros: u64| {
            let mut out = Vec::new();
            timestamp(
                UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros),
                &mut out,
            );
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 1), "2000-02-29T00:00:00.000001Z");
        assert_eq!(at(1_796_632_793, 741_605), "2026-12-07T08:39:53.741605Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
    }
}
