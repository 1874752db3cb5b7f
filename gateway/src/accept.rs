//! Accepting connections without spinning: an accept error (out of file descriptors,
//! out of memory) backs off before the next try instead of retrying at once, which
//! would hold a core at 100 % exactly when the process is short of resources.

use std::future::Future;
use std::time::Duration;

/// How long to wait after a failed accept.
pub const BACKOFF: Duration = Duration::from_millis(50);

/// The next accepted connection: `accept` is tried until it succeeds, with [`BACKOFF`]
/// after each failure (logged, naming `what` is accepting).
pub async fn next<T, F, Fut>(what: &str, mut accept: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    loop {
        match accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed; backing off");
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_instead_of_spinning() {
        let start = tokio::time::Instant::now();
        let mut tries = 0;
        let got = next("test", || {
            tries += 1;
            let n = tries;
            async move {
                if n <= 10 {
                    Err(std::io::Error::other("EMFILE"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got, 11);
        assert!(start.elapsed() >= BACKOFF * 10, "{:?}", start.elapsed());
    }
}
