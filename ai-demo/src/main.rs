//! `ai-demo`: the demo LLM server and the local demo.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
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
        /// Count tokens with the demo's own tokenizer instead of tiktoken's cl100k_base
        /// (about twice its counts on English), like llama.cpp's server: streams never
        /// carry usage (even with stream_options.include_usage; Ollama's last line has no
        /// counts), each content event is exactly one token, prompts count a chat template
        /// (9 tokens; 1 for plain completions); whole answers still report usage. POST
        /// /tokenize {"content": "..."} -> {"tokens": [...]} (and llama-cpp-python's
        /// /extras/tokenize, /extras/tokenize/count) tokenize with it.
        #[arg(long, env = "DEMO_OWN_TOKENIZER")]
        own_tokenizer: bool,
    },
    /// Measure time to first chunk of streaming requests (a benchmark probe).
    Ttfc {
        /// Where to send them (the demo LLM, a proxy, or the gateway).
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "/v1/chat/completions")]
        path: String,
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        #[arg(long, default_value_t = 200)]
        warmup: usize,
        /// A label for the output line.
        #[arg(long, default_value = "target")]
        label: String,
        /// The request body (default: a short streaming chat).
        #[arg(long)]
        body: Option<String>,
        /// Read the request body from this file (for bodies too large for an argument).
        #[arg(long, conflicts_with = "body")]
        body_file: Option<std::path::PathBuf>,
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
        Command::Local { .. } | Command::Ttfc { .. } => "warn",
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
            own_tokenizer,
        } => {
            let config = kube_gateway_ai_demo::DemoConfig {
                first_token_delay: Duration::from_millis(first_token_delay_ms),
                token_delay: Duration::from_millis(token_delay_ms),
                tokenizer: if own_tokenizer {
                    kube_gateway_ai_demo::Tokenizer::Own
                } else {
                    kube_gateway_ai_demo::Tokenizer::Tiktoken
                },
            };
            let listener = tokio::net::TcpListener::bind(listen).await?;
            tracing::info!(addr = %listener.local_addr()?, "demo LLM server listening");
            let server = kube_gateway_ai_demo::DemoServer::new(config);
            kube_gateway_ai_demo::serve(listener, server).await?;
        }
        Command::Ttfc {
            addr,
            path,
            requests,
            warmup,
            label,
            body,
            body_file,
        } => {
            let default = r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"Say hello"}],"stream":true,"max_tokens":16}"#;
            let body = match body_file {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?,
                ),
                None => body,
            };
            let body = body.as_deref().unwrap_or(default);
            let s =
                kube_gateway_ai_demo::ttfc::measure(addr, &path, body, warmup, requests).await?;
            use std::io::Write as _;
            writeln!(
                std::io::stdout(),
                "ttfc {label}: n={} p50={:.1}us p90={:.1}us p99={:.1}us mean={:.1}us",
                s.count,
                s.p50_us,
                s.p90_us,
                s.p99_us,
                s.mean_us
            )?;
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
