//! kube-gateway's eBPF programs.
//!
//! - `connect4` / `connect6` (the workload's cgroup): a TCP connect whose destination the
//!   capture filter matches is rewritten to the gateway's listener; its original
//!   destination is kept under the socket's cookie.
//! - `kgw_sockops` (the workload's cgroup): once the connection is established, the
//!   record moves to the connection's addresses and network namespace, which the
//!   gateway's accepted socket also knows; it is dropped when the connection closes.
//! - `kgw_getsockopt` (the gateway's cgroup: the hook runs for the socket's cgroup, and an
//!   accepted socket inherits its listener's): answers `SO_ORIGINAL_DST` (SOL_IP) and
//!   `IP6T_SO_ORIGINAL_DST` (SOL_IPV6) from that record; every other option passes.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::bindings::{
    BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    BPF_TCP_CLOSE,
};
use aya_ebpf::helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie};
use aya_ebpf::macros::{cgroup_sock_addr, cgroup_sockopt, map, sock_ops};
use aya_ebpf::maps::{Array, LruHashMap};
use aya_ebpf::programs::{SockAddrContext, SockOpsContext, SockoptContext};
use aya_ebpf::EbpfContext;
use kube_gateway_bpf_common::{
    Addr, Cidr, Config, ConnKey, OrigDst, GATEWAY_MARK, MAX_CIDRS, MAX_PORTS, SKIP_LOCAL,
};

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// Original destinations of connects not yet established, by socket cookie.
#[map]
static BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65_536, 0);
/// Original destinations of established redirected connections.
#[map]
static BY_CONN: LruHashMap<ConnKey, OrigDst> = LruHashMap::with_max_entries(65_536, 0);

const AF_INET: u32 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share the number.
const SO_ORIGINAL_DST: i32 = 80;

fn mapped(ip4: u32) -> Addr {
    [0, 0, 0xffff_u32.to_be(), ip4]
}

fn is_mapped(a: &Addr) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == 0xffff_u32.to_be()
}

fn in_cidr(a: &Addr, c: &Cidr) -> bool {
    // Whole words first, then the partial one: no loop-carried state for the verifier.
    let words = (c.prefix / 32).min(4) as usize;
    let bits = c.prefix % 32;
    let mut i = 0;
    while i < 4 {
        if i >= words {
            break;
        }
        if a[i] != c.addr[i] {
            return false;
        }
        i += 1;
    }
    if bits == 0 || words >= 4 {
        return true;
    }
    let mask = !(u32::MAX >> bits);
    (u32::from_be(a[words]) ^ u32::from_be(c.addr[words])) & mask == 0
}

fn port_listed(list: &[u16; MAX_PORTS], count: u32, port: u16) -> bool {
    let mut i = 0;
    while i < MAX_PORTS {
        if i as u32 >= count {
            return false;
        }
        if list[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

fn cidr_listed(cfg: &Config, a: &Addr) -> bool {
    let mut i = 0;
    while i < MAX_CIDRS {
        if i as u32 >= cfg.cidr_count {
            return false;
        }
        if in_cidr(a, &cfg.cidrs[i]) {
            return true;
        }
        i += 1;
    }
    false
}

/// Loopback or link-local.
fn is_local(a: &Addr) -> bool {
    if is_mapped(a) {
        let v4 = u32::from_be(a[3]);
        v4 >> 24 == 127 || v4 >> 16 == 0xa9fe
    } else {
        let loopback = a[0] == 0 && a[1] == 0 && a[2] == 0 && u32::from_be(a[3]) == 1;
        loopback || u32::from_be(a[0]) >> 22 == 0x3fa
    }
}

fn captured(cfg: &Config, a: &Addr, port: u16) -> bool {
    if port == cfg.gateway_port && *a == cfg.gateway {
        return false;
    }
    if cfg.flags & SKIP_LOCAL != 0 && is_local(a) {
        return false;
    }
    if port_listed(&cfg.skip_ports, cfg.skip_port_count, port) {
        return false;
    }
    if cfg.port_count > 0 && !port_listed(&cfg.ports, cfg.port_count, port) {
        return false;
    }
    cfg.cidr_count == 0 || cidr_listed(cfg, a)
}

/// Rewrites a matching TCP connect to the gateway; the original destination is kept.
/// One copy per family (`V6`): the verifier refuses context stores through a pointer
/// whose offset depends on a branch.
#[inline(always)]
unsafe fn redirect<const V6: bool>(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    if (*sa).type_ != SOCK_STREAM || (*sa).protocol != IPPROTO_TCP {
        return;
    }
    let sk = (*sa).__bindgen_anon_1.sk;
    if sk.is_null() || (*sk).mark == GATEWAY_MARK {
        return;
    }
    let Some(cfg) = CONFIG.get(0) else { return };
    let (addr, asked_v6) = if V6 {
        let a = (*sa).user_ip6;
        (a, !is_mapped(&a))
    } else {
        (mapped((*sa).user_ip4), false)
    };
    let port = u16::from_be((*sa).user_port as u16);
    if !captured(cfg, &addr, port) {
        return;
    }
    let orig = OrigDst {
        addr,
        port,
        v6: asked_v6 as u16,
        _pad: 0,
    };
    let cookie = bpf_get_socket_cookie(ctx.as_ptr());
    // Unrecorded, the gateway could not forward it: better not to redirect at all.
    if BY_COOKIE.insert(cookie, orig, 0).is_err() {
        return;
    }
    if V6 {
        // The gateway's v4-mapped address: a dual-stack socket reaches its IPv4 listener.
        let ip6 = core::ptr::addr_of_mut!((*sa).user_ip6) as *mut u32;
        write_volatile(ip6, cfg.gateway[0]);
        write_volatile(ip6.add(1), cfg.gateway[1]);
        write_volatile(ip6.add(2), cfg.gateway[2]);
        write_volatile(ip6.add(3), cfg.gateway[3]);
    } else {
        write_volatile(core::ptr::addr_of_mut!((*sa).user_ip4), cfg.gateway[3]);
    }
    write_volatile(
        core::ptr::addr_of_mut!((*sa).user_port),
        u32::from(cfg.gateway_port.to_be()),
    );
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    unsafe { redirect::<false>(&ctx) };
    1
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    unsafe { redirect::<true>(&ctx) };
    1
}

/// Reads a context or socket field where it is: every field is read, then the values
/// chosen (a read whose offset depends on a branch is refused by the verifier).
macro_rules! field {
    ($base:expr, $f:ident) => {
        read_volatile(core::ptr::addr_of!((*$base).$f))
    };
}

/// The key of an established client connection, from the client's side.
unsafe fn client_key(ctx: &SockOpsContext) -> ConnKey {
    let ops = ctx.ops;
    let (family, l4, r4) = (
        field!(ops, family),
        field!(ops, local_ip4),
        field!(ops, remote_ip4),
    );
    let (l6, r6) = (field!(ops, local_ip6), field!(ops, remote_ip6));
    let (client, gateway) = if family == AF_INET {
        (mapped(l4), mapped(r4))
    } else {
        (l6, r6)
    };
    ConnKey {
        netns: bpf_get_netns_cookie(ctx.as_ptr()),
        client,
        gateway,
        client_port: field!(ops, local_port) as u16,
        // sock_ops keeps the remote port in network order in the upper half.
        gateway_port: u32::from_be(field!(ops, remote_port)) as u16,
        _pad: 0,
    }
}

#[sock_ops]
pub fn kgw_sockops(ctx: SockOpsContext) -> u32 {
    unsafe {
        match ctx.op() {
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
                let cookie = bpf_get_socket_cookie(ctx.as_ptr());
                let Some(orig) = BY_COOKIE.get(cookie) else {
                    return 0;
                };
                let orig = *orig;
                let _ = BY_COOKIE.remove(cookie);
                let _ = BY_CONN.insert(client_key(&ctx), orig, 0);
                // To hear of the close and drop an entry the gateway never read.
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
            BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
                let _ = BY_CONN.remove(client_key(&ctx));
            }
            _ => {}
        }
    }
    0
}

unsafe fn answer(ctx: &SockoptContext) {
    let so = ctx.sockopt;
    let level = (*so).level;
    if (*so).optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return;
    }
    let sk = (*so).__bindgen_anon_1.sk;
    if sk.is_null() {
        return;
    }
    // The gateway's accepted socket: its peer is the client.
    let (family, d4, s4) = (field!(sk, family), field!(sk, dst_ip4), field!(sk, src_ip4));
    let (d6, s6) = (field!(sk, dst_ip6), field!(sk, src_ip6));
    let (client, gateway) = if family == AF_INET {
        (mapped(d4), mapped(s4))
    } else {
        (d6, s6)
    };
    let key = ConnKey {
        netns: bpf_get_netns_cookie(ctx.as_ptr()),
        client,
        gateway,
        client_port: u16::from_be(field!(sk, dst_port)),
        gateway_port: field!(sk, src_port) as u16,
        _pad: 0,
    };
    let Some(orig) = BY_CONN.get(key) else {
        return;
    };
    let orig = *orig;
    let optval = (*so).__bindgen_anon_2.optval as *mut u8;
    let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
    let len: i32 = if level == SOL_IP {
        // An IPv6 destination does not fit a sockaddr_in: the caller asks at SOL_IPV6.
        if orig.v6 != 0 || optval.add(16) > end {
            return;
        }
        write_volatile(optval as *mut u16, AF_INET as u16);
        write_volatile(optval.add(2) as *mut u16, orig.port.to_be());
        write_volatile(optval.add(4) as *mut u32, orig.addr[3]);
        write_volatile(optval.add(8) as *mut u32, 0);
        write_volatile(optval.add(12) as *mut u32, 0);
        16
    } else {
        if optval.add(28) > end {
            return;
        }
        write_volatile(optval as *mut u16, AF_INET6);
        write_volatile(optval.add(2) as *mut u16, orig.port.to_be());
        write_volatile(optval.add(4) as *mut u32, 0);
        write_volatile(optval.add(8) as *mut u32, orig.addr[0]);
        write_volatile(optval.add(12) as *mut u32, orig.addr[1]);
        write_volatile(optval.add(16) as *mut u32, orig.addr[2]);
        write_volatile(optval.add(20) as *mut u32, orig.addr[3]);
        write_volatile(optval.add(24) as *mut u32, 0);
        28
    };
    // Field by field: merged into one 8-byte store, the verifier refuses the access.
    write_volatile(core::ptr::addr_of_mut!((*so).optlen), len);
    write_volatile(core::ptr::addr_of_mut!((*so).retval), 0);
    let _ = BY_CONN.remove(key);
}

#[cgroup_sockopt(getsockopt)]
pub fn kgw_getsockopt(ctx: SockoptContext) -> i32 {
    unsafe { answer(&ctx) };
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The programs call no GPL-only helper, so they carry the project's license.
#[link_section = "license"]
#[used]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
