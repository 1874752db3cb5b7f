//! `ai-demo`: the demo LLM server and the local demo.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ai-demo",
    about = "kube-gateway's demo LLM server and local demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the demo LLM (OpenAI and Ollama APIs).
    Serve {
        #[arg(long, env = "DEMO_LISTEN", default_value = "127.0.0.1:11434")]
        listen: SocketAddr,
        /// Milliseconds before the first generated token of a stream.
        #[arg(long, env = "DEMO_FIRST_TOKEN_DELAY_MS", default_value_t = 0)]
        first_token_delay_ms: u64,
        /// Milliseconds between generated tokens of a stream.
        #[arg(long, env = "DEMO_TOKEN_DELAY_MS", default_value_t = 0)]
        token_delay_ms: u64,
    },
    /// Run the local demo: the demo LLM and a kube-gateway in front of it.
    Local {
        /// The kube-gateway binary (default: the one next to this program).
        #[arg(long)]
        gateway: Option<std::path::PathBuf>,
        /// The model every request is rewritten to.
        #[arg(long, default_value = "gemma2:2b")]
        model: String,
        /// Milliseconds between generated tokens.
        #[arg(long, default_value_t = 15)]
        token_delay_ms: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The server logs each request's model; the local demo prints its own story.
    let default_level = match cli.command {
        Command::Serve { .. } => "info",
        Command::Local { .. } => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve {
            listen,
            first_token_delay_ms,
            token_delay_ms,
        } => {
            let config = kube_gateway_ai_demo::DemoConfig {
                first_token_delay: Duration::from_millis(first_token_delay_ms),
                token_delay: Duration::from_millis(token_delay_ms),
            };
            let listener = tokio::net::TcpListener::bind(listen).await?;
            tracing::info!(addr = %listener.local_addr()?, "demo LLM server listening");
            let server = kube_gateway_ai_demo::DemoServer::new(config);
            kube_gateway_ai_demo::serve(listener, server).await?;
        }
        Command::Local {
            gateway,
            model,
            token_delay_ms,
        } => {
            kube_gateway_ai_demo::local::run(kube_gateway_ai_demo::local::LocalDemo {
                gateway,
                model,
                token_delay: Duration::from_millis(token_delay_ms),
            })
            .await?;
        }
    }
    Ok(())
}
