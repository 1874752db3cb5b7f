//! netflush: after the capture is attached, keep-alive connections the workload opened
//! before it still go straight to their servers. This destroys them (netlink sock_diag
//! `SOCK_DESTROY`, in the gateway's network namespace, which is the pod's) so the
//! clients reconnect, and the new connections are captured. Only established TCP
//! sockets of the workload's cgroup whose destination the capture filter matches: the
//! gateway's own connections (another cgroup) are never touched.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use kube_gateway_bpf::CaptureFilter;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{
    nlas::Nla, ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags,
};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

const ENOENT: i32 = 2;
const EOPNOTSUPP: i32 = 95;

/// `INET_DIAG_CGROUP_ID`: the socket's cgroup v2 id (its directory's inode number).
const INET_DIAG_CGROUP_ID: u16 = 21;

/// netflush could not run.
#[derive(Debug, thiserror::Error)]
pub enum NetflushError {
    #[error("workload cgroup {0}: {1}")]
    Cgroup(String, #[source] std::io::Error),
    #[error("netlink sock_diag: {0}")]
    Netlink(#[source] std::io::Error),
    #[error("this kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY is off)")]
    Unsupported,
}

/// What a flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Established sockets of the workload whose destination the filter matches.
    pub matched: usize,
    pub destroyed: usize,
}

fn socket() -> Result<Socket, NetflushError> {
    let mut s = Socket::new(NETLINK_SOCK_DIAG).map_err(NetflushError::Netlink)?;
    s.bind_auto().map_err(NetflushError::Netlink)?;
    s.connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(NetflushError::Netlink)?;
    Ok(s)
}

fn send<T>(s: &Socket, flags: u16, payload: T) -> Result<(), NetflushError>
where
    T: netlink_packet_core::NetlinkSerializable + std::fmt::Debug,
    NetlinkPayload<T>: From<T>,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    s.send(&buf, 0).map_err(NetflushError::Netlink)?;
    Ok(())
}

/// The established TCP sockets of one family in this network namespace.
fn dump(s: &Socket, family: u8) -> Result<Vec<InetResponse>, NetflushError> {
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::ESTABLISHED,
        socket_id: if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        },
    });
    send(s, NLM_F_REQUEST | NLM_F_DUMP, request)?;
    let mut out = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = s
            .recv(&mut &mut buf[..], 0)
            .map_err(NetflushError::Netlink)?;
        let mut offset = 0;
        while offset < n {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..n])
                .map_err(|e| NetflushError::Netlink(std::io::Error::other(e.to_string())))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => out.push(*r),
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => return Err(NetflushError::Netlink(e.to_io())),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// Asks the kernel to destroy one socket; `Ok(false)`: it was already gone.
fn destroy(s: &Socket, family: u8, id: SocketId) -> Result<bool, NetflushError> {
    let request = SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: id,
    }));
    send(s, NLM_F_REQUEST | NLM_F_ACK, request)?;
    let mut buf = vec![0; 8192];
    let n = s
        .recv(&mut &mut buf[..], 0)
        .map_err(NetflushError::Netlink)?;
    let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[..n])
        .map_err(|e| NetflushError::Netlink(std::io::Error::other(e.to_string())))?;
    match msg.payload {
        NetlinkPayload::Error(e) => match e.code.map(|c| -c.get()) {
            None => Ok(true),
            Some(ENOENT) => Ok(false),
            Some(EOPNOTSUPP) => Err(NetflushError::Unsupported),
            Some(_) => Err(NetflushError::Netlink(e.to_io())),
        },
        _ => Ok(true),
    }
}

/// Whether this kernel can destroy sockets: a destroy of a socket that does not exist
/// answers "not found" where it can, "not supported" where it cannot.
pub fn supported() -> Result<bool, NetflushError> {
    let s = socket()?;
    match destroy(&s, AF_INET, SocketId::new_v4()) {
        Ok(_) => Ok(true),
        Err(NetflushError::Unsupported) => Ok(false),
        Err(e) => Err(e),
    }
}

fn cgroup_id(r: &InetResponse) -> Option<u64> {
    r.nlas.iter().find_map(|nla| match nla {
        Nla::Other(other) if netlink_packet_core::Nla::kind(other) == INET_DIAG_CGROUP_ID => {
            let mut v = [0u8; 8];
            netlink_packet_core::Nla::emit_value(other, &mut v);
            Some(u64::from_ne_bytes(v))
        }
        _ => None,
    })
}

/// The ids of a cgroup and of every cgroup below it: a pod's sockets belong to its
/// containers' cgroups, which sit below the pod's (where the hooks are attached).
fn cgroup_ids(top: &Path) -> Result<std::collections::HashSet<u64>, NetflushError> {
    std::fs::metadata(top).map_err(|e| NetflushError::Cgroup(top.display().to_string(), e))?;
    Ok(kube_gateway_bpf::cgroup_subtree(top)
        .iter()
        // A cgroup removed meanwhile has no sockets left to flush.
        .filter_map(|dir| std::fs::metadata(dir).ok())
        .map(|m| m.ino())
        .collect())
}

/// Destroys the established connections of `workload_cgroup` (and the cgroups below
/// it) that `filter` captures.
pub fn flush(workload_cgroup: &Path, filter: &CaptureFilter) -> Result<Flushed, NetflushError> {
    let ids = cgroup_ids(workload_cgroup)?;
    let s = socket()?;
    let mut flushed = Flushed::default();
    for family in [AF_INET, AF_INET6] {
        for r in dump(&s, family)? {
            let sid = &r.header.socket_id;
            let dest = SocketAddr::new(sid.destination_address, sid.destination_port);
            if !cgroup_id(&r).is_some_and(|id| ids.contains(&id)) || !filter.matches(dest) {
                continue;
            }
            flushed.matched += 1;
            if destroy(&s, family, sid.clone())? {
                flushed.destroyed += 1;
            }
        }
    }
    Ok(flushed)
}
