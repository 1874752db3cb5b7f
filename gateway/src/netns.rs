//! Working inside a pod's network namespace. A socket belongs to the namespace it was
//! created in, whatever thread uses it later: so a thread of this module's enters the
//! pod's namespace once (`setns`) and creates sockets there on request, and the agent's
//! runtime serves them from its own threads. The pod's listener and the upstream
//! connections made for the pod are thus the pod's own (its address, its
//! NetworkPolicies), while the agent never lives in the pod.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use nix::sched::{setns, CloneFlags};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// Jobs waiting for the namespace's thread; a pod makes few sockets at a time.
const QUEUE: usize = 64;

/// A thread inside one network namespace, making sockets there.
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    jobs: mpsc::SyncSender<Job>,
}

impl NetNs {
    /// Enters the network namespace at `path` (`/proc/<pid>/ns/net`) on a thread of its
    /// own. The thread ends when the last handle is dropped.
    pub fn enter(path: &Path) -> io::Result<Self> {
        // Opened here, so a missing or inaccessible namespace is this call's error.
        let ns = std::fs::File::open(path)?;
        let (jobs, queue) = mpsc::sync_channel::<Job>(QUEUE);
        let (ready_tx, ready) = mpsc::channel::<io::Result<()>>();
        std::thread::Builder::new()
            .name("kgw-netns".into())
            .spawn(move || {
                let entered = setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    while let Ok(job) = queue.recv() {
                        job();
                    }
                }
            })?;
        ready
            .recv()
            .map_err(|_| io::Error::other("the namespace thread ended at once"))??;
        Ok(Self {
            path: path.to_owned(),
            jobs,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the namespace's thread (sockets it creates are the namespace's).
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .try_send(job)
            .map_err(|_| io::Error::other("the namespace's thread is busy or gone"))?;
        rx.await
            .map_err(|_| io::Error::other("the namespace's thread ended"))?
    }

    /// A listening socket bound to `addr` inside the namespace (non-blocking).
    pub async fn listen(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        self.run(move || {
            let socket = tcp_socket(addr)?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
        .await
    }

    /// A TCP socket for a connection to `addr`, made inside the namespace
    /// (non-blocking, not connected).
    pub async fn socket_for(&self, addr: SocketAddr) -> io::Result<socket2::Socket> {
        self.run(move || tcp_socket(addr)).await
    }
}

/// A non-blocking TCP socket of `addr`'s family, in the calling thread's namespace.
fn tcp_socket(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}
