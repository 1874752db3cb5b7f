//! The original destination of a redirected connection: `SO_ORIGINAL_DST` (IPv4) or
//! `IP6T_SO_ORIGINAL_DST` (IPv6), answered by iptables `REDIRECT` and by kube-gateway's
//! eBPF `cgroup/getsockopt` hook alike.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Where the client meant to connect before it was redirected here.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr()?;
    let v4_first = match local {
        SocketAddr::V4(_) => true,
        // A dual-stack listener sees IPv4 clients as v4-mapped addresses.
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    // The eBPF capture hands IPv6 clients to the IPv4 listener (v4-mapped): an IPv6
    // destination is then only answered at the IPv6 level, and the other way round.
    let addr = if v4_first {
        sock.original_dst_v4()
            .or_else(|e| sock.original_dst_v6().map_err(|_| e))?
    } else {
        sock.original_dst_v6()
            .or_else(|e| sock.original_dst_v4().map_err(|_| e))?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}
