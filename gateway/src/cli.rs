//! The command line: flags, their environment variables, and their conversion into the
//! validated [`Config`]. Parsing is kept apart from reading the environment, so tests
//! build configurations without setting variables.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use kube_gateway_policy::{ModelRewrite, ModelRewriteError};

use crate::config::{BadDestination, Config, Destination, Limits, UpstreamMode};
use crate::logging::LogFormat;

/// Environment variables, one per flag.
pub mod env {
    pub const LISTEN: &str = "LISTEN";
    pub const UPSTREAM: &str = "UPSTREAM";
    /// Set from the `kube-gateway.io/ai-model` annotation by the watcher.
    pub const MODEL: &str = "MODEL";
    pub const ADMIN: &str = "ADMIN";
    pub const BODY_LIMIT: &str = "BODY_LIMIT";
    pub const MAX_EVENT_BYTES: &str = "MAX_EVENT_BYTES";
    pub const HEADER_TIMEOUT_MS: &str = "HEADER_TIMEOUT_MS";
    pub const MAX_HEADER_BYTES: &str = "MAX_HEADER_BYTES";
    pub const BODY_TIMEOUT_MS: &str = "BODY_TIMEOUT_MS";
    pub const MAX_CONNECTIONS: &str = "MAX_CONNECTIONS";
    pub const FAIL_CLOSED: &str = "FAIL_CLOSED";
    pub const LOG_FORMAT: &str = "LOG_FORMAT";
    pub const LOG_BODIES: &str = "LOG_BODIES";
    pub const CONNECT_TIMEOUT_MS: &str = "CONNECT_TIMEOUT_MS";
    pub const RESPONSE_TIMEOUT_MS: &str = "RESPONSE_TIMEOUT_MS";
    pub const THREADS: &str = "THREADS";
    pub const POLICY: &str = "POLICY";
    pub const IDLE_TIMEOUT_MS: &str = "IDLE_TIMEOUT_MS";
    pub const STORE: &str = "STORE";
    pub const SPOOL: &str = "SPOOL";
    /// Set by the watcher from the downward API.
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
    pub const POD_NAME: &str = "POD_NAME";
    pub const CONTAINER_NAME: &str = "CONTAINER_NAME";
    pub const SERVICE_ACCOUNT: &str = "POD_SERVICE_ACCOUNT";
    pub const NODE_NAME: &str = "NODE_NAME";
    pub const HOST_CGROUP_ROOT: &str = "HOST_CGROUP_ROOT";
    pub const CAPTURE_CGROUP: &str = "CAPTURE_CGROUP";
    pub const GATEWAY_CGROUP: &str = "GATEWAY_CGROUP";
    pub const CAPTURE_CIDRS: &str = "CAPTURE_CIDRS";
    pub const CAPTURE_PORTS: &str = "CAPTURE_PORTS";
    pub const CAPTURE_LOCAL: &str = "CAPTURE_LOCAL";
    pub const NETFLUSH: &str = "NETFLUSH";
}

#[derive(Debug, Parser)]
#[command(
    name = "kube-gateway",
    version,
    about = "Transparent LLM guardrail gateway"
)]
pub struct Cli {
    /// Log line format.
    #[arg(long, global = true, env = env::LOG_FORMAT, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Run(Box<RunArgs>),
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print usage by namespace, pod and model from the usage store.
    Usage(UsageArgs),
    /// The node agent (a DaemonSet): serve every pod of this node annotated
    /// kube-gateway.io/ai=true, each with its own identity and policy.
    Node(Box<NodeArgs>),
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The store: sqlite://PATH or postgres://URL.
    #[arg(long, env = env::STORE, default_value = "sqlite://kube-gateway-usage.db")]
    pub store: String,
    /// How far back, in hours.
    #[arg(long, default_value_t = 24)]
    pub hours: u64,
    /// Print JSON instead of a table.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print CSV instead of a table.
    #[arg(long)]
    pub csv: bool,
    /// Also print the state of this policy's budgets (used, limit, reset time).
    #[arg(long, env = env::POLICY)]
    pub policy: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Everything `run` takes; --listen is the address each pod's listener binds inside
    /// the pod's network namespace. --upstream, --cgroup, --model, --policy and
    /// --netflush do not apply (annotations and policy ConfigMaps say that per pod).
    #[command(flatten)]
    pub run: RunArgs,
    /// This node's name (the downward API's spec.nodeName): only its pods are served.
    #[arg(long, env = env::NODE_NAME)]
    pub node_name: String,
    /// The host's cgroup v2 tree, where the kubelet puts pods.
    #[arg(long, env = env::HOST_CGROUP_ROOT, default_value = "/sys/fs/cgroup")]
    pub host_cgroup_root: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file: print what it does, or every error with its path (exit 1).
    Check { file: PathBuf },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address to accept workload connections on.
    #[arg(long, env = env::LISTEN, default_value = "127.0.0.1:18000")]
    pub listen: SocketAddr,
    /// Send every connection to HOST:PORT (explicit mode). Without it, each connection
    /// goes to its original destination (transparent mode: SO_ORIGINAL_DST).
    #[arg(long, env = env::UPSTREAM)]
    pub upstream: Option<String>,
    /// Rewrite the model of every recognized request to NAME.
    #[arg(long, env = env::MODEL, value_name = "NAME")]
    pub model: Option<String>,
    /// Policy file (YAML or JSON): model, prompt and response rules, max tokens.
    /// Watched: a valid change takes effect at once, a broken one is refused.
    #[arg(long, env = env::POLICY)]
    pub policy: Option<PathBuf>,
    /// Address of the admin endpoint (/healthz, /readyz).
    #[arg(long, env = env::ADMIN)]
    pub admin: Option<SocketAddr>,
    /// Largest request body read on a recognized path, in bytes; larger gets 413.
    #[arg(long, env = env::BODY_LIMIT, default_value_t = 8 * 1024 * 1024)]
    pub body_limit: usize,
    /// Largest SSE event or NDJSON line of an answer held to read it, in bytes. A larger
    /// one is forwarded unread (its tokens estimated from the rest), or, under response
    /// rules or a budget, ends the answer with an error event.
    #[arg(long, env = env::MAX_EVENT_BYTES, default_value_t = 4 * 1024 * 1024)]
    pub max_event_bytes: usize,
    /// Time a connection may take to send a request's head, in milliseconds, counted
    /// from when it is awaited: slow headers and idle keep-alive connections end there.
    #[arg(long, env = env::HEADER_TIMEOUT_MS, default_value_t = 30_000)]
    pub header_timeout_ms: u64,
    /// Largest request head (request line and headers), in bytes; larger gets 431.
    #[arg(long, env = env::MAX_HEADER_BYTES, default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Time a recognized request's body may take to arrive, in milliseconds; past it 408
    /// in the caller's format.
    #[arg(long, env = env::BODY_TIMEOUT_MS, default_value_t = 60_000)]
    pub body_timeout_ms: u64,
    /// Client connections open at once (all serving threads); more are closed as they
    /// are accepted, and counted.
    #[arg(long, env = env::MAX_CONNECTIONS, default_value_t = 10_000)]
    pub max_connections: usize,
    /// Answer 400 to malformed JSON on a recognized path instead of forwarding it.
    #[arg(long, env = env::FAIL_CLOSED)]
    pub fail_closed: bool,
    /// Put prompt and completion text in the access log (off: it may hold secrets).
    #[arg(long, env = env::LOG_BODIES)]
    pub log_bodies: bool,
    /// Upstream connect timeout, in milliseconds.
    #[arg(long, env = env::CONNECT_TIMEOUT_MS, default_value_t = 5_000)]
    pub connect_timeout_ms: u64,
    /// Usage store: sqlite://PATH (created with its tables) or postgres://URL; "none" to
    /// keep usage in the access log only.
    #[arg(long, env = env::STORE, default_value = "sqlite://kube-gateway-usage.db")]
    pub store: String,
    /// Spool file for usage batches while the store is unreachable.
    #[arg(long, env = env::SPOOL, default_value = "kube-gateway-usage.spool")]
    pub spool: PathBuf,
    /// Namespace, pod and container of the workload (labels of every usage row).
    #[arg(long, env = env::POD_NAMESPACE, default_value = "")]
    pub pod_namespace: String,
    #[arg(long, env = env::POD_NAME, default_value = "")]
    pub pod_name: String,
    #[arg(long, env = env::CONTAINER_NAME, default_value = "")]
    pub container_name: String,
    #[arg(long, env = env::SERVICE_ACCOUNT, default_value = "")]
    pub service_account: String,
    /// Longest silence between two chunks of an answer, in milliseconds; past it the
    /// answer ends with an error in the caller's format.
    #[arg(long, env = env::IDLE_TIMEOUT_MS, default_value_t = 300_000)]
    pub idle_timeout_ms: u64,
    /// Serving threads, each with its own listener and upstream pool (0: one per core).
    #[arg(long, env = env::THREADS, default_value_t = 0)]
    pub threads: usize,
    /// Time allowed until the upstream's response headers, in milliseconds.
    #[arg(long, env = env::RESPONSE_TIMEOUT_MS, default_value_t = 600_000)]
    pub response_timeout_ms: u64,
    /// Capture the TCP connects of the processes in this cgroup (v2 directory) with
    /// eBPF: they land here, and go on to where they were going. Needs root (or CAP_SYS_ADMIN
    /// and CAP_NET_ADMIN) and an IPv4 --listen; excludes --upstream.
    #[arg(long, env = env::CAPTURE_CGROUP, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// The gateway's own cgroup, where SO_ORIGINAL_DST is answered (default: the one it
    /// runs in; never the node's root cgroup).
    #[arg(long, env = env::GATEWAY_CGROUP, value_name = "PATH")]
    pub gateway_cgroup: Option<PathBuf>,
    /// Destinations to capture (CIDRs, comma-separated or repeated; default: all).
    #[arg(long, env = env::CAPTURE_CIDRS, value_delimiter = ',', value_name = "CIDR")]
    pub capture_cidr: Vec<kube_gateway_bpf::Cidr>,
    /// Destination ports to capture (default: all but the gateway's own).
    #[arg(long, env = env::CAPTURE_PORTS, value_delimiter = ',', value_name = "PORT")]
    pub capture_port: Vec<u16>,
    /// Also capture loopback and link-local destinations.
    #[arg(long, env = env::CAPTURE_LOCAL)]
    pub capture_local: bool,
    /// With --cgroup: once attached, destroy the workload's established connections the
    /// capture matches (netlink SOCK_DESTROY), so keep-alive clients reconnect through
    /// the gateway.
    #[arg(long, env = env::NETFLUSH)]
    pub netflush: bool,
}

/// The flags do not make a valid configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Upstream(#[from] BadDestination),
    #[error("kube-gateway node: {0} does not apply (each pod's connections go to their original destination, its policy comes from its annotations and ConfigMaps)")]
    NotForNode(&'static str),
    #[error("kube-gateway node: --node-name (NODE_NAME) is required")]
    NoNodeName,
    #[error("kube-gateway node: --listen must be an IPv4 address (each pod's IPv6 connects reach it v4-mapped)")]
    NodeListen,
    #[error("--model: {0}")]
    Model(#[from] ModelRewriteError),
    #[error("--body-limit must be at least 1 byte")]
    BodyLimit,
    #[error("--max-event-bytes must be at least 1")]
    EventLimit,
    #[error("--max-connections, --header-timeout-ms and --body-timeout-ms must be at least 1")]
    ZeroLimit,
    #[error(transparent)]
    Store(#[from] crate::store::BadStoreUrl),
    #[error("--cgroup captures connections for transparent mode: drop --upstream")]
    CaptureWithUpstream,
    #[error("--cgroup needs an IPv4 --listen address (IPv6 connects reach it v4-mapped)")]
    CaptureListen,
    #[error("--netflush needs --cgroup (it flushes what the capture would have taken)")]
    NetflushWithoutCapture,
}

impl TryFrom<RunArgs> for Config {
    type Error = ConfigError;

    fn try_from(a: RunArgs) -> Result<Self, ConfigError> {
        if a.body_limit == 0 {
            return Err(ConfigError::BodyLimit);
        }
        if a.max_event_bytes == 0 {
            return Err(ConfigError::EventLimit);
        }
        if a.max_connections == 0 || a.header_timeout_ms == 0 || a.body_timeout_ms == 0 {
            return Err(ConfigError::ZeroLimit);
        }
        let upstream = match a.upstream.as_deref() {
            Some(u) => UpstreamMode::Fixed(Destination::parse(u)?),
            None => UpstreamMode::OriginalDst,
        };
        if a.netflush && a.cgroup.is_none() {
            return Err(ConfigError::NetflushWithoutCapture);
        }
        let capture = match a.cgroup {
            Some(_) if matches!(upstream, UpstreamMode::Fixed(_)) => {
                return Err(ConfigError::CaptureWithUpstream)
            }
            Some(_) if !a.listen.is_ipv4() => return Err(ConfigError::CaptureListen),
            Some(workload_cgroup) => Some(crate::config::CaptureSettings {
                workload_cgroup,
                gateway_cgroup: a.gateway_cgroup,
                filter: kube_gateway_bpf::CaptureFilter {
                    cidrs: a.capture_cidr,
                    ports: a.capture_port,
                    // The gateway's own ports are never captured.
                    skip_ports: [Some(a.listen.port()), a.admin.map(|x| x.port())]
                        .into_iter()
                        .flatten()
                        .collect(),
                    include_local: a.capture_local,
                },
                netflush: a.netflush,
            }),
            None => None,
        };
        let rewrite = match a.model.as_deref().filter(|m| !m.is_empty()) {
            Some(m) => ModelRewrite::everything_to(m)?,
            None => ModelRewrite::default(),
        };
        let limits = Limits {
            body_bytes: a.body_limit,
            event_bytes: a.max_event_bytes,
            header_timeout: std::time::Duration::from_millis(a.header_timeout_ms),
            header_bytes: a.max_header_bytes,
            body_timeout: std::time::Duration::from_millis(a.body_timeout_ms),
            max_connections: a.max_connections,
            connect_timeout: std::time::Duration::from_millis(a.connect_timeout_ms),
            upstream_mark: capture.as_ref().map(|_| kube_gateway_bpf::GATEWAY_MARK),
            response_timeout: std::time::Duration::from_millis(a.response_timeout_ms),
            idle_timeout: std::time::Duration::from_millis(a.idle_timeout_ms),
            ..Limits::default()
        };
        Ok(Config {
            listen: a.listen,
            upstream,
            rewrite,
            admin: a.admin,
            limits,
            fail_closed: a.fail_closed,
            log_bodies: a.log_bodies,
            policy: a.policy,
            policy_reload: std::time::Duration::from_secs(1),
            store: match a.store.as_str() {
                "none" | "" => None,
                url => Some(crate::config::StoreConfig {
                    url: url.parse()?,
                    spool: a.spool,
                }),
            },
            identity: crate::record::Identity {
                namespace: a.pod_namespace,
                pod: a.pod_name,
                container: a.container_name,
                service_account: a.service_account,
            },
            capture,
        })
    }
}

impl TryFrom<NodeArgs> for crate::node::NodeConfig {
    type Error = ConfigError;

    fn try_from(a: NodeArgs) -> Result<Self, ConfigError> {
        let NodeArgs {
            run,
            node_name,
            host_cgroup_root,
        } = a;
        for (given, flag) in [
            (run.upstream.is_some(), "--upstream"),
            (run.cgroup.is_some(), "--cgroup"),
            (run.model.is_some(), "--model"),
            (run.policy.is_some(), "--policy"),
            (run.netflush, "--netflush (annotate the pod instead)"),
        ] {
            if given {
                return Err(ConfigError::NotForNode(flag));
            }
        }
        if node_name.is_empty() {
            return Err(ConfigError::NoNodeName);
        }
        if !run.listen.is_ipv4() {
            return Err(ConfigError::NodeListen);
        }
        let filter = kube_gateway_bpf::CaptureFilter {
            cidrs: run.capture_cidr.clone(),
            ports: run.capture_port.clone(),
            skip_ports: [Some(run.listen.port()), run.admin.map(|x| x.port())]
                .into_iter()
                .flatten()
                .collect(),
            include_local: run.capture_local,
        };
        let gateway_cgroup = run.gateway_cgroup.clone();
        let mut base = Config::try_from(run)?;
        // The pods' traffic is captured: the agent's upstream sockets carry the mark.
        base.limits.upstream_mark = Some(kube_gateway_bpf::GATEWAY_MARK);
        Ok(crate::node::NodeConfig {
            base,
            node_name,
            cgroup_root: host_cgroup_root,
            gateway_cgroup,
            filter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let cli = Cli::try_parse_from(args).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        Config::try_from(*run)
    }

    #[test]
    fn defaults_are_transparent_mode_on_loopback() {
        let c = parse(&["kube-gateway", "run"]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:18000");
        assert!(matches!(c.upstream, UpstreamMode::OriginalDst));
        assert!(c.rewrite.is_empty());
        assert_eq!(c.limits.body_bytes, 8 * 1024 * 1024);
    }

    #[test]
    fn explicit_mode_with_model() {
        let c = parse(&[
            "kube-gateway",
            "run",
            "--upstream",
            "ollama:11434",
            "--model",
            "qwen2.5:0.5b",
        ])
        .unwrap();
        assert!(matches!(c.upstream, UpstreamMode::Fixed(ref d) if d.as_str() == "ollama:11434"));
        assert_eq!(c.rewrite.apply("llama3"), Some("qwen2.5:0.5b"));
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(matches!(
            parse(&["kube-gateway", "run", "--upstream", "nope"]),
            Err(ConfigError::Upstream(_))
        ));
        assert!(matches!(
            parse(&["kube-gateway", "run", "--body-limit", "0"]),
            Err(ConfigError::BodyLimit)
        ));
    }
}
