//! Thread-per-core serving: one single-threaded tokio runtime per serving thread, each
//! with its own listener on the same address (`SO_REUSEPORT`: the kernel spreads
//! connections) and its own upstream pool. A request never crosses threads, which on
//! this workload costs far less than a work-stealing runtime (see gateway/benches/).
//! What is not serving (the usage recorder and store writer, the policy watcher, budget
//! leases) runs on a background thread of its own, so it never queues behind requests
//! on one serving thread (measured: with the store on, that thread saturated first).

use std::future::Future;
use std::thread;

use tokio::sync::watch;

use crate::app::{Shared, StartError};
use crate::config::Config;
use crate::listener::{bind_listener, Gateway};

fn single_threaded() -> Result<tokio::runtime::Runtime, StartError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)
}

/// The background thread's runtime, running until `stop` is sent.
struct Background {
    handle: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: thread::JoinHandle<()>,
}

fn background() -> Result<Background, StartError> {
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = thread::Builder::new()
        .name("kube-gateway-bg".into())
        .spawn(move || match single_threaded() {
            Ok(rt) => {
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async move {
                    let _ = stop_rx.await;
                });
            }
            Err(e) => {
                let _ = handle_tx.send(Err(e));
            }
        })
        .map_err(StartError::Runtime)?;
    let handle = handle_rx.recv().map_err(|_| {
        StartError::Runtime(std::io::Error::other("the background thread did not start"))
    })??;
    Ok(Background {
        handle,
        stop,
        thread,
    })
}

fn attach_capture(
    c: &crate::config::CaptureSettings,
    listen: std::net::SocketAddr,
) -> Result<(kube_gateway_bpf::Capture, u64), StartError> {
    let std::net::SocketAddr::V4(gateway) = listen else {
        return Err(StartError::Capture(kube_gateway_bpf::CaptureError::Filter(
            "the listener must be IPv4".into(),
        )));
    };
    let gateway_cgroup = match &c.gateway_cgroup {
        Some(p) => p.clone(),
        None => kube_gateway_bpf::cgroup_of(None)?,
    };
    let capture = kube_gateway_bpf::Capture::attach(&kube_gateway_bpf::CaptureConfig {
        workload_cgroup: c.workload_cgroup.clone(),
        gateway_cgroup,
        gateway,
        filter: c.filter.clone(),
    })?;
    let flushed = if c.netflush { netflush(c) } else { 0 };
    Ok((capture, flushed))
}

/// Flushes the workload's connections that predate the capture; how many it destroyed.
/// Never fatal: without kernel support, or on an error, it says so and the gateway
/// serves new connections.
fn netflush(c: &crate::config::CaptureSettings) -> u64 {
    use crate::netflush;
    match netflush::supported() {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!("netflush: this kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY); connections opened before the capture keep bypassing it until they close");
            return 0;
        }
        Err(e) => {
            tracing::warn!(error = %e, "netflush: cannot probe for SOCK_DESTROY; skipped");
            return 0;
        }
    }
    match netflush::flush(&c.workload_cgroup, &c.filter) {
        Ok(f) => {
            tracing::info!(
                matched = f.matched,
                destroyed = f.destroyed,
                "netflush: connections that predate the capture destroyed; their clients reconnect through the gateway"
            );
            f.destroyed as u64
        }
        Err(e) => {
            tracing::warn!(error = %e, "netflush failed");
            0
        }
    }
}

/// A policy file that does not load yet (a ConfigMap not mounted yet, a broken first
/// version): the gateway does not serve without it, and says so on `/readyz`, trying
/// again every second.
/// `false`: `shutdown` came first.
async fn wait_for_policy(
    config: &Config,
    admin: Option<&std::net::TcpListener>,
    mut shutdown: impl Future<Output = ()> + Unpin,
) -> Result<bool, StartError> {
    let Some(path) = &config.policy else {
        return Ok(true);
    };
    let error = match crate::policy::load_file(path) {
        Ok(_) => return Ok(true),
        Err(e) => e,
    };
    tracing::error!(error = %error, "the policy does not load; not serving until it does (checked every second)");
    let reason = std::sync::Arc::new(std::sync::Mutex::new(format!("policy: {error}")));
    let responder = match admin {
        Some(l) => {
            let l = l.try_clone().map_err(StartError::Runtime)?;
            let l = tokio::net::TcpListener::from_std(l).map_err(StartError::Runtime)?;
            #[expect(
                clippy::disallowed_methods,
                reason = "aborted below, once the policy loads or the gateway stops"
            )]
            let responder = tokio::spawn(crate::admin::serve_not_ready(l, reason.clone()));
            Some(responder)
        }
        None => None,
    };
    let loaded = loop {
        tokio::select! {
            () = &mut shutdown => break false,
            () = tokio::time::sleep(config.policy_reload) => {}
        }
        match crate::policy::load_file(path) {
            Ok(_) => break true,
            Err(e) => {
                if let Ok(mut r) = reason.lock() {
                    *r = format!("policy: {e}");
                }
            }
        }
    };
    if let Some(r) = responder {
        r.abort();
    }
    if loaded {
        tracing::info!(path = %path.display(), "the policy loads now; starting");
    }
    Ok(loaded)
}

/// The number of serving threads to use when none is asked for: one per available core.
pub fn default_threads() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// Serves with `threads` serving threads until `shutdown` completes, then drains.
/// Blocks the calling thread, which becomes serving thread 0 (with the admin endpoint
/// and the usage recorder).
pub fn serve<F>(config: Config, threads: usize, shutdown: F) -> Result<(), StartError>
where
    F: Future<Output = ()>,
{
    let threads = threads.max(1);
    let runtime = single_threaded()?;
    runtime.block_on(async move {
        // Bind everything before serving, so a bad address fails at start, not later.
        let first = bind_listener(config.listen, threads > 1)?;
        let addr = first.local_addr().map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let mut listeners = vec![first];
        for _ in 1..threads {
            listeners.push(bind_listener(addr, true)?);
        }
        let admin = config.admin.map(|a| bind_listener(a, false)).transpose()?;
        tokio::pin!(shutdown);
        if !wait_for_policy(&config, admin.as_ref(), &mut shutdown).await? {
            return Ok(()); // stopped before there was anything to serve
        }
        // Listening first: captured connects must find the gateway there.
        let capture = config.capture.as_ref().map(|c| attach_capture(c, addr)).transpose()?;
        let bg = background()?;
        // Started on the background runtime: the tasks it spawns live there.
        #[expect(clippy::disallowed_methods, reason = "awaited right here")]
        let shared = bg
            .handle
            .spawn(Shared::start(config))
            .await
            .map_err(|e| StartError::Runtime(std::io::Error::other(e)))??;
        let writer = shared.take_writer();
        // Held until the end: dropping it detaches the programs.
        let _capture = capture.map(|(capture, flushed)| {
            shared.telemetry().netflushed(flushed);
            capture
        });
        let ledger = shared.ledger();
        let telemetry = shared.telemetry().clone();
        let recorder = shared.take_recorder();
        tracing::info!(listen = %addr, threads, upstream = ?shared.config().upstream, "gateway ready");

        let (stop_tx, stop_rx) = watch::channel(false);
        let mut handles = Vec::new();
        let mut listeners = listeners.into_iter();
        let own = listeners.next();
        for (i, listener) in listeners.enumerate() {
            let (shared, mut stop) = (shared.clone(), stop_rx.clone());
            let handle = thread::Builder::new()
                .name(format!("kube-gateway-{}", i + 1))
                .spawn(move || -> Result<(), StartError> {
                    single_threaded()?.block_on(async move {
                        let worker = u16::try_from(i + 1).unwrap_or(u16::MAX);
                        let gateway = Gateway::from_listeners(shared, listener, None, worker)?;
                        gateway.run(async move { let _ = stop.wait_for(|s| *s).await; }).await;
                        Ok(())
                    })
                })
                .map_err(StartError::Runtime)?;
            handles.push(handle);
        }
        if let Some(listener) = own {
            Gateway::from_listeners(shared, listener, admin, 0)?.run(&mut shutdown).await;
        }
        let _ = stop_tx.send(true);
        for h in handles {
            match h.join() {
                Ok(result) => result?,
                Err(_) => tracing::error!("a serving thread panicked"),
            }
        }
        // Leases are given back on the runtime their store connections belong to.
        #[expect(clippy::disallowed_methods, reason = "awaited right here")]
        let _ = bg.handle.spawn(async move { ledger.release().await }).await;
        if let Some(r) = recorder {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), r).await;
        }
        // Every recorder is gone now: the writer stores (or spools) what is left and ends.
        if let Some(w) = writer {
            if tokio::time::timeout(std::time::Duration::from_secs(30), w).await.is_err() {
                tracing::error!("usage writer did not finish in 30 s; unwritten rows may be lost");
            }
        }
        // The exporter's own thread does the network I/O; off the runtimes.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        let _ = bg.stop.send(());
        if bg.thread.join().is_err() {
            tracing::error!("the background thread panicked");
        }
        Ok(())
    })
}

/// The end of a gateway's shared parts, on the runtime they were started on (node mode):
/// leases given back, every record finished, every row stored or spooled, spans sent.
/// Takes the last handle: the recorder ends only once every sender is gone (a handle
/// kept here would hold it, and the writer behind it, until their timeouts).
pub async fn finish(shared: Shared) {
    let (recorder, writer) = (shared.take_recorder(), shared.take_writer());
    let (ledger, telemetry) = (shared.ledger(), shared.telemetry().clone());
    drop(shared);
    ledger.release().await;
    if let Some(r) = recorder {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), r).await;
    }
    if let Some(w) = writer {
        if tokio::time::timeout(std::time::Duration::from_secs(30), w)
            .await
            .is_err()
        {
            tracing::error!("usage writer did not finish in 30 s; unwritten rows may be lost");
        }
    }
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
}
