//! Protocol sniffing on a new connection: HTTP/1.x goes to the HTTP proxy, anything else
//! (TLS, Redis, HTTP/2, raw TCP, protocols where the server speaks first) is relayed.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

const METHODS: [&[u8]; 8] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
];
/// The longest method token with its space.
const LONGEST: usize = 8;

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Opaque,
}

/// Classifies what the client has sent so far; `None` while it could still be either.
pub fn classify(head: &[u8]) -> Option<Protocol> {
    if METHODS.iter().any(|m| head.starts_with(m)) {
        return Some(Protocol::Http1);
    }
    let could_be = METHODS.iter().any(|m| m.starts_with(head));
    if could_be && head.len() < LONGEST {
        None
    } else {
        Some(Protocol::Opaque)
    }
}

/// Peeks at the client's first bytes without consuming them. A client that sends
/// nothing within `wait` (the server speaks first) is relayed.
pub async fn sniff(stream: &TcpStream, wait: Duration) -> Protocol {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; LONGEST];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return Protocol::Opaque,
        };
        if n == 0 {
            return Protocol::Opaque;
        }
        if let Some(p) = classify(&buf[..n]) {
            return p;
        }
        // A partial method: peek returns at once while data waits, so back off briefly.
        if Instant::now() >= deadline {
            return Protocol::Opaque;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_request_lines_and_other_bytes() {
        assert_eq!(classify(b"POST /api/chat HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET / HT"), Some(Protocol::Http1));
        assert_eq!(classify(b"PO"), None);
        assert_eq!(classify(b"OPTIONS"), None);
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00"),
            Some(Protocol::Opaque),
            "TLS"
        );
        assert_eq!(
            classify(b"*1\r\n$4\r\nPING"),
            Some(Protocol::Opaque),
            "Redis"
        );
        assert_eq!(
            classify(b"PRI * HTTP/2.0"),
            Some(Protocol::Opaque),
            "h2 prior knowledge"
        );
        assert_eq!(classify(b"CONNECT h:1 HTTP/1.1"), Some(Protocol::Opaque));
        assert_eq!(classify(b"POSTX"), Some(Protocol::Opaque));
    }
}
