//! A time-to-first-chunk probe for benchmarks: sends streaming requests one after
//! another on one keep-alive connection and measures, for each, the time from sending
//! the request to receiving the first body chunk.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Percentiles of a set of durations, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

pub fn summarize(mut samples: Vec<Duration>) -> Summary {
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).copied().map(us).unwrap_or(f64::NAN)
    };
    let mean = samples.iter().copied().map(us).sum::<f64>() / samples.len().max(1) as f64;
    Summary {
        count: samples.len(),
        p50_us: at(0.50),
        p90_us: at(0.90),
        p99_us: at(0.99),
        mean_us: mean,
    }
}

/// Measures `n` requests (after `warmup` unmeasured ones) of `body` to `path` at `addr`.
pub async fn measure(
    addr: SocketAddr,
    path: &str,
    body: &str,
    warmup: usize,
    n: usize,
) -> anyhow::Result<Summary> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let req = http::Request::post(path)
            .header("host", addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))?;
        sender.ready().await?;
        let started = Instant::now();
        let resp = sender.send_request(req).await?;
        anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
        let mut body = resp.into_body();
        let mut first = None;
        while let Some(frame) = body.frame().await {
            if frame?.is_data() && first.is_none() {
                first = Some(started.elapsed());
            }
        }
        if i >= warmup {
            samples.push(first.context("response had no body")?);
        }
    }
    Ok(summarize(samples))
}
