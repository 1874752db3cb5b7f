//! Opaque relay: bytes the gateway does not understand go to the original destination
//! unchanged, both ways, with half-close passed on.

use std::io;

use tokio::net::TcpStream;

use crate::config::{Destination, Limits};
use crate::upstream::Dialer;

/// Relays until both directions have ended. Returns bytes sent (to upstream, to client).
pub async fn relay(
    mut client: TcpStream,
    dest: &Destination,
    limits: &Limits,
    dialer: &Dialer,
) -> io::Result<(u64, u64)> {
    let connect = dialer.dial(dest);
    let mut upstream = tokio::time::timeout(limits.connect_timeout, connect)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect to upstream timed out"))??;
    upstream.set_nodelay(true)?;
    // copy_bidirectional shuts down each write side when its read side reaches EOF,
    // which carries a half-close across.
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await
}
