//! The gateway's validated configuration: built once from the command line at the edge,
//! so the core never re-checks raw strings.

use std::net::SocketAddr;
use std::time::Duration;

use http::uri::Authority;
use kube_gateway_policy::ModelRewrite;

/// Where an upstream request goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination(Authority);

/// An upstream given on the command line is not `HOST:PORT`.
#[derive(Debug, thiserror::Error)]
#[error("upstream {0:?} is not HOST:PORT")]
pub struct BadDestination(pub String);

impl Destination {
    pub fn parse(s: &str) -> Result<Self, BadDestination> {
        let authority: Authority = s.parse().map_err(|_| BadDestination(s.to_owned()))?;
        if authority.port_u16().is_none() || authority.as_str().contains('@') {
            return Err(BadDestination(s.to_owned()));
        }
        Ok(Self(authority))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl From<SocketAddr> for Destination {
    fn from(addr: SocketAddr) -> Self {
        // A socket address always formats as a valid authority.
        match Authority::try_from(addr.to_string()) {
            Ok(a) => Self(a),
            Err(_) => Self(Authority::from_static("0.0.0.0:0")),
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the gateway finds each connection's upstream.
#[derive(Debug, Clone)]
pub enum UpstreamMode {
    /// Transparent: the connection's original destination (`SO_ORIGINAL_DST`).
    OriginalDst,
    /// Explicit: every connection goes to this upstream.
    Fixed(Destination),
}

/// Bounds and time limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body read on a recognized path.
    pub body_bytes: usize,
    /// Largest response body kept aside to read its usage (it is forwarded regardless).
    pub response_bytes: usize,
    /// Largest stream event (SSE) or line (NDJSON) held to read it.
    pub event_bytes: usize,
    /// Until a request's head has arrived, from the moment the connection waits for it:
    /// slow headers (slowloris) and idle keep-alive connections both end there.
    pub header_timeout: Duration,
    /// Largest request head (request line and headers).
    pub header_bytes: usize,
    /// Until a recognized request's whole body has arrived.
    pub body_timeout: Duration,
    /// Client connections open at once; more are closed at accept.
    pub max_connections: usize,
    pub connect_timeout: Duration,
    /// Until the upstream's response headers arrive.
    pub response_timeout: Duration,
    /// How long to wait for a client's first bytes before relaying opaquely.
    pub sniff_timeout: Duration,
    /// The longest silence allowed between two chunks of an answer; past it the answer
    /// ends with an error (a stalled upstream never hangs the client).
    pub idle_timeout: Duration,
    /// `SO_MARK` on upstream sockets, so the eBPF capture never redirects them.
    pub upstream_mark: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes: 8 * 1024 * 1024,
            response_bytes: 16 * 1024 * 1024,
            event_bytes: 4 * 1024 * 1024,
            header_timeout: Duration::from_secs(30),
            header_bytes: 64 * 1024,
            body_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(600),
            sniff_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(300),
            upstream_mark: None,
        }
    }
}

/// Everything `kube-gateway run` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: UpstreamMode,
    pub rewrite: ModelRewrite,
    pub admin: Option<SocketAddr>,
    pub limits: Limits,
    /// Answer 400 to unparseable bodies on recognized paths instead of forwarding them.
    pub fail_closed: bool,
    /// Put prompt and completion text in the access log.
    pub log_bodies: bool,
    /// The policy file, watched for changes.
    pub policy: Option<std::path::PathBuf>,
    /// How often the policy file is checked for changes.
    pub policy_reload: Duration,
    /// The usage store and its spool; `None`: usage goes to the access log only.
    pub store: Option<StoreConfig>,
    /// Who this gateway serves (labels of every usage row).
    pub identity: crate::record::Identity,
    /// eBPF capture of a workload cgroup's connections (transparent mode).
    pub capture: Option<CaptureSettings>,
}

/// What `--cgroup` captures.
#[derive(Debug, Clone)]
pub struct CaptureSettings {
    pub workload_cgroup: std::path::PathBuf,
    /// The gateway's own cgroup; `None`: the one it runs in.
    pub gateway_cgroup: Option<std::path::PathBuf>,
    pub filter: kube_gateway_bpf::CaptureFilter,
    /// After attaching, destroy the workload's connections that predate the capture.
    pub netflush: bool,
}

/// Where usage rows go.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub url: crate::store::StoreUrl,
    /// Holds batches while the store is unreachable.
    pub spool: std::path::PathBuf,
}

impl Config {
    /// A configuration for explicit use against `upstream`, with defaults elsewhere.
    pub fn explicit(listen: SocketAddr, upstream: Destination) -> Self {
        Self {
            listen,
            upstream: UpstreamMode::Fixed(upstream),
            rewrite: ModelRewrite::default(),
            admin: None,
            limits: Limits::default(),
            fail_closed: false,
            log_bodies: false,
            policy: None,
            policy_reload: Duration::from_secs(1),
            store: None,
            identity: crate::record::Identity::default(),
            capture: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_need_host_and_port() {
        assert_eq!(
            Destination::parse("ollama:11434").unwrap().as_str(),
            "ollama:11434"
        );
        assert_eq!(Destination::parse("[::1]:80").unwrap().as_str(), "[::1]:80");
        assert!(Destination::parse("ollama").is_err());
        assert!(Destination::parse("user@h:1").is_err());
        assert!(Destination::parse("http://h:1").is_err());
        let v6: SocketAddr = "[fd00::1]:8080".parse().unwrap();
        assert_eq!(Destination::from(v6).as_str(), "[fd00::1]:8080");
    }
}
