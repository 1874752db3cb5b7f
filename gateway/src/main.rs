//! The `kube-gateway` binary: parses the command line, sets up logging, runs.

use anyhow::Context as _;
use clap::Parser;
use kube_gateway::cli::{Cli, Command, PolicyCommand, UsageArgs};
use kube_gateway::Config;

// Many small, short-lived allocations per request: mimalloc handles them with less
// contention and fragmentation than the system allocator (measured in benches/).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let to = match cli.command {
        Command::Run(_) | Command::Node(_) => kube_gateway::logging::LogTo::Stdout,
        _ => kube_gateway::logging::LogTo::Stderr,
    };
    let _log = kube_gateway::logging::init(cli.log_format, to);
    match cli.command {
        Command::Run(args) => {
            let threads = match args.threads {
                0 => kube_gateway::runtime::default_threads(),
                n => n,
            };
            let config = Config::try_from(*args).context("invalid configuration")?;
            kube_gateway::runtime::serve(config, threads, shutdown_signal())?;
        }
        Command::Usage(args) => usage(args)?,
        Command::Node(args) => {
            let config =
                kube_gateway::node::NodeConfig::try_from(*args).context("invalid configuration")?;
            kube_gateway::node::serve(config, shutdown_signal())?;
        }
        Command::Policy(PolicyCommand::Check { file }) => {
            use std::io::Write as _;
            match kube_gateway::policy::load_file(&file) {
                Ok(policy) => write!(std::io::stdout(), "{}", policy.summary())?,
                Err(e) => {
                    writeln!(std::io::stderr(), "{e}")?;
                    std::process::exit(1);
                }
            }
        }
    }
    Ok(())
}

/// `kube-gateway usage`: totals from the store for the last hours.
fn usage(args: UsageArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let policy = args
        .policy
        .as_deref()
        .map(kube_gateway::policy::load_file)
        .transpose()?;
    let out = kube_gateway::report::usage(&args, policy.as_ref())?;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

/// Ctrl-C or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}
