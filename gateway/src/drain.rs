//! Graceful drain: on shutdown every connection is told to finish what it is doing,
//! and the gateway waits (up to a deadline) until the last one has ended.

use tokio::sync::{mpsc, watch};

/// Held by the accept loop.
pub struct Drain {
    signal: watch::Sender<bool>,
    done_tx: mpsc::Sender<()>,
    done_rx: mpsc::Receiver<()>,
}

/// Held by each connection; dropping it tells the drain the connection ended.
#[derive(Clone)]
pub struct DrainWatch {
    signal: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
}

impl Default for Drain {
    fn default() -> Self {
        let (signal, _) = watch::channel(false);
        let (done_tx, done_rx) = mpsc::channel(1);
        Self {
            signal,
            done_tx,
            done_rx,
        }
    }
}

impl Drain {
    pub fn watch(&self) -> DrainWatch {
        DrainWatch {
            signal: self.signal.subscribe(),
            _alive: self.done_tx.clone(),
        }
    }

    /// Signals every connection and waits until all have ended.
    pub async fn drain(self) {
        let Drain {
            signal,
            done_tx,
            mut done_rx,
        } = self;
        let _ = signal.send(true);
        drop(done_tx);
        // Returns `None` once every connection's sender is gone.
        let _ = done_rx.recv().await;
    }
}

impl DrainWatch {
    /// Completes when the gateway starts draining.
    pub async fn signaled(&mut self) {
        let _ = self.signal.wait_for(|draining| *draining).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waits_for_every_connection() {
        let drain = Drain::default();
        let mut w = drain.watch();
        #[expect(clippy::disallowed_methods, reason = "awaited by the test")]
        let conn = tokio::spawn(async move {
            w.signaled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        let started = std::time::Instant::now();
        drain.drain().await;
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(conn.is_finished() || conn.await.is_ok());
    }
}
