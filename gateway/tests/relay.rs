//! Bytes that are not HTTP/1.x cross the gateway unchanged, both ways, with half-close.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Test tasks end with the test's runtime.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads everything until EOF, then answers with it reversed and closes: it can only
/// answer if the client's half-close reached it.
async fn reverse_after_eof() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                got.reverse();
                s.write_all(&got).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test]
async fn tls_like_bytes_relay_identically_with_half_close() {
    let upstream = reverse_after_eof().await;
    let gw = gateway(config(upstream)).await;
    // A TLS ClientHello prefix followed by every byte value.
    let mut payload = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
    payload.extend((0..=255u8).cycle().take(200_000));
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .expect("answer after half-close")
        .unwrap();
    payload.reverse();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "bytes differ");
}

#[tokio::test]
async fn server_first_protocols_are_relayed_after_the_sniff_wait() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"220 smtp.example ESMTP ready\r\n")
            .await
            .unwrap();
        let mut cmd = [0u8; 6];
        s.read_exact(&mut cmd).await.unwrap();
        assert_eq!(&cmd, b"QUIT\r\n");
        s.write_all(b"221 bye\r\n").await.unwrap();
    });
    let gw = gateway(config(upstream)).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut banner = [0u8; 30];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"220 smtp.example ESMTP ready\r\n");
    s.write_all(b"QUIT\r\n").await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"221 bye\r\n");
}

#[tokio::test]
async fn redis_protocol_is_not_mistaken_for_http() {
    let upstream = reverse_after_eof().await;
    let gw = gateway(config(upstream)).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"*1\r\n$4\r\nPING\r\n").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"\n\rGNIP\n\r4$\n\r1*");
}
