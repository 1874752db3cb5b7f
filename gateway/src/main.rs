//! The `kube-gateway` binary: parses the command line, sets up logging, runs.

use anyhow::Context as _;
use clap::Parser;
use kube_gateway::cli::{Cli, Command};
use kube_gateway::{Config, Gateway};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _log = kube_gateway::telemetry::init(cli.log_format);
    match cli.command {
        Command::Run(args) => {
            let config = Config::try_from(args).context("invalid configuration")?;
            let gateway = Gateway::bind(config).await?;
            gateway.run(shutdown_signal()).await;
        }
    }
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
