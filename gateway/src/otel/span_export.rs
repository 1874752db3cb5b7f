//! The span exporter: the SDK's batches of finished spans, encoded by
//! [`protobuf`](super::protobuf) and posted over OTLP/HTTP. It reads the standard
//! variables the OTLP crate reads for traces (endpoint, headers, timeout; `http/protobuf`
//! only, uncompressed) and rejects what it cannot honour instead of ignoring it.

use std::sync::Mutex;
use std::time::Duration;

use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use percent_encoding::percent_decode_str;
use reqwest::blocking::Client;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};

use super::protobuf::{export_request, EncodedResource};
use super::OtelError;

/// Where and how spans are sent, from the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanTarget {
    pub url: reqwest::Url,
    pub headers: HeaderMap,
    pub timeout: Duration,
}

/// The OTLP default export timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl SpanTarget {
    /// The target the process environment names.
    pub fn from_env() -> Result<Self, OtelError> {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
    }

    /// The target the variables `var` returns name: each trace-specific variable wins over
    /// its general `OTEL_EXPORTER_OTLP_*` form.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, OtelError> {
        let pick = |suffix: &str| {
            let specific = format!("OTEL_EXPORTER_OTLP_TRACES_{suffix}");
            let general = format!("OTEL_EXPORTER_OTLP_{suffix}");
            var(&specific)
                .map(|v| (specific, v))
                .or_else(|| var(&general).map(|v| (general, v)))
        };
        // The trace endpoint is used as given; the general one gets the signal's path.
        let url = match (
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            var(super::ENDPOINT),
        ) {
            (Some(url), _) => url,
            (None, Some(base)) => format!("{}/v1/traces", base.trim().trim_end_matches('/')),
            (None, None) => "http://localhost:4318/v1/traces".to_owned(),
        };
        let url = reqwest::Url::parse(url.trim())
            .map_err(|e| OtelError(format!("trace endpoint {url}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(OtelError(format!(
                "trace endpoint {url}: only http:// and https:// are supported"
            )));
        }
        if let Some((name, protocol)) = pick("PROTOCOL") {
            if protocol.trim() != "http/protobuf" {
                return Err(OtelError(format!(
                    "{name}={protocol}: only http/protobuf is supported"
                )));
            }
        }
        if let Some((name, compression)) = pick("COMPRESSION") {
            if compression.trim() != "none" {
                return Err(OtelError(format!(
                    "{name}={compression}: compression is not supported (none only)"
                )));
            }
        }
        let headers = match pick("HEADERS") {
            Some((name, list)) => {
                parse_headers(&list).map_err(|e| OtelError(format!("{name}: {e}")))?
            }
            None => HeaderMap::new(),
        };
        let timeout = match pick("TIMEOUT") {
            Some((name, ms)) => ms
                .trim()
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| OtelError(format!("{name}={ms}: not a number of milliseconds")))?,
            None => DEFAULT_TIMEOUT,
        };
        Ok(Self {
            url,
            headers,
            timeout,
        })
    }
}

/// `key=value,key2=value2`, values percent-encoded (the OTLP exporter specification).
fn parse_headers(list: &str) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for pair in list.split(',').filter(|p| !p.trim().is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let value = percent_decode_str(value.trim())
            .decode_utf8()
            .map_err(|e| format!("{key}: {e}"))?;
        let name = HeaderName::from_bytes(key.trim().as_bytes())
            .map_err(|_| format!("{key:?} is not a header name"))?;
        let value = HeaderValue::from_str(&value)
            .map_err(|_| format!("the value of {key} is not a header value"))?;
        headers.insert(name, value);
    }
    Ok(headers)
}

/// Posts each batch as one `ExportTraceServiceRequest`.
#[derive(Debug)]
pub struct OtlpSpanExporter {
    target: SpanTarget,
    /// None once shut down.
    client: Mutex<Option<Client>>,
    resource: EncodedResource,
}

impl OtlpSpanExporter {
    pub fn new(target: SpanTarget) -> Result<Self, OtelError> {
        let timeout = target.timeout;
        // The blocking client starts its own runtime, which must not be built (or later
        // dropped) inside the gateway's: so it is built on a thread of its own.
        let client = std::thread::spawn(move || Client::builder().timeout(timeout).build())
            .join()
            .map_err(|_| OtelError("the HTTP client's thread panicked".to_owned()))?
            .map_err(|e| OtelError(format!("HTTP client: {e}")))?;
        Ok(Self {
            target,
            client: Mutex::new(Some(client)),
            resource: EncodedResource::default(),
        })
    }

    fn client(&self) -> Result<Client, OTelSdkError> {
        match self.client.lock() {
            Ok(guard) => guard.clone().ok_or(OTelSdkError::AlreadyShutdown),
            Err(_) => Err(OTelSdkError::InternalFailure(
                "span exporter lock poisoned".to_owned(),
            )),
        }
    }
}

impl SpanExporter for OtlpSpanExporter {
    // Called on the batch processor's own thread, one batch at a time: blocking here
    // holds up nothing but the next batch.
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let client = self.client()?;
        let mut body = Vec::with_capacity(batch.len() * 512);
        export_request(&mut body, &self.resource, &batch);
        let response = client
            .post(self.target.url.clone())
            .headers(self.target.headers.clone())
            .header(CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .send()
            .map_err(|e| OTelSdkError::InternalFailure(format!("span export: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().unwrap_or_default();
            return Err(OTelSdkError::InternalFailure(format!(
                "span export to {}: {status} {}",
                self.target.url,
                text.chars().take(200).collect::<String>()
            )));
        }
        Ok(())
    }

    fn shutdown_with_timeout(&mut self, _timeout: Duration) -> OTelSdkResult {
        let mut guard = self
            .client
            .lock()
            .map_err(|_| OTelSdkError::InternalFailure("span exporter lock poisoned".to_owned()))?;
        // The client's runtime is dropped off the caller's (possibly async) thread.
        let client = guard.take().ok_or(OTelSdkError::AlreadyShutdown)?;
        std::thread::spawn(move || drop(client));
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = EncodedResource::new(resource);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn target(vars: &[(&str, &str)]) -> Result<SpanTarget, OtelError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        SpanTarget::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn the_general_endpoint_gets_the_traces_path_and_the_specific_one_is_used_as_given() {
        let general = target(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]);
        assert_eq!(
            general.unwrap().url.as_str(),
            "http://collector:4318/v1/traces"
        );
        let specific = target(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://wrong:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://collector/custom",
            ),
        ]);
        assert_eq!(specific.unwrap().url.as_str(), "https://collector/custom");
        let e = target(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]).unwrap_err();
        assert!(e.to_string().contains("collector:4318"), "{e}");
    }

    #[test]
    fn headers_and_timeout_come_from_the_specific_variable_first() {
        let t = target(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-general=1"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "api-key=a%20b%3Dc, x-tenant = t1",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ])
        .unwrap();
        assert_eq!(t.headers.get("api-key").unwrap(), "a b=c");
        assert_eq!(t.headers.get("x-tenant").unwrap(), "t1");
        assert!(t.headers.get("x-general").is_none());
        assert_eq!(t.timeout, Duration::from_millis(2500));
        assert_eq!(
            target(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c")])
                .unwrap()
                .timeout,
            DEFAULT_TIMEOUT
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_an_error_naming_the_variable() {
        for (var, value, says) in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "only http/protobuf"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
                "gzip",
                "not supported",
            ),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "no-equals-sign",
                "not key=value",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "10s", "milliseconds"),
        ] {
            let e = target(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"), (var, value)])
                .unwrap_err()
                .to_string();
            assert!(e.contains(var) && e.contains(says), "{var}={value}: {e}");
        }
        let ok = target(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
        ]);
        assert!(ok.is_ok());
    }
}
