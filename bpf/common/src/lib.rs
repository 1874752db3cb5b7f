//! Types shared by kube-gateway's eBPF programs (`bpf/ebpf`) and their loader
//! (`bpf/loader`): the capture configuration and the map records. Plain `repr(C)` data,
//! `no_std`. Addresses are IPv6-sized, IPv4 stored v4-mapped (`::ffff:a.b.c.d`), words
//! in network byte order as the kernel hands them over; ports in host byte order.
#![no_std]

/// Capture filter entries (CIDRs, ports) the programs check; more are refused by the loader.
pub const MAX_CIDRS: usize = 16;
pub const MAX_PORTS: usize = 16;

/// The `SO_MARK` kube-gateway sets on its own upstream sockets: the connect hooks never
/// redirect a socket carrying it (loop safety).
pub const GATEWAY_MARK: u32 = 0x6b67_7701;

/// Config flag: leave loopback (127/8, ::1) and link-local (169.254/16, fe80::/10)
/// destinations alone.
pub const SKIP_LOCAL: u32 = 1;

/// An address: 16 bytes as four network-order words; IPv4 is v4-mapped.
pub type Addr = [u32; 4];

/// A CIDR over [`Addr`]; an IPv4 prefix length is counted from bit 96.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Addr,
    pub prefix: u32,
}

/// What to capture and where to send it. One entry in the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The gateway's listener, v4-mapped: connects are rewritten to it (IPv6 sockets to
    /// its v4-mapped form, which a dual-stack socket reaches).
    pub gateway: Addr,
    pub gateway_port: u16,
    pub _pad: u16,
    pub flags: u32,
    /// Destinations to capture; none: every destination (but the skipped ones).
    pub cidr_count: u32,
    pub cidrs: [Cidr; MAX_CIDRS],
    /// Destination ports to capture; none: every port.
    pub port_count: u32,
    pub ports: [u16; MAX_PORTS],
    /// Ports never captured (the gateway's own).
    pub skip_port_count: u32,
    pub skip_ports: [u16; MAX_PORTS],
}

/// The original destination of a redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: Addr,
    pub port: u16,
    /// Whether the client asked for an IPv6 address (not v4-mapped).
    pub v6: u16,
    pub _pad: u32,
}

/// A redirected connection as both ends see it: the client's address and the gateway's,
/// and the network namespace they share (a source port alone repeats across pods).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns: u64,
    pub client: Addr,
    pub gateway: Addr,
    pub client_port: u16,
    pub gateway_port: u16,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `repr(C)` data without padding holes that carry meaning; any bit
    // pattern is a valid value.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Config {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::OrigDst {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::ConnKey {}
}
