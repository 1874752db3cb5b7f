//! The capture filter: which destinations the connect hooks redirect. Validated here,
//! then written into the programs' `CONFIG` map.

use std::net::{IpAddr, SocketAddrV4};
use std::str::FromStr;

use kube_gateway_bpf_common::{Config, MAX_CIDRS, MAX_PORTS, SKIP_LOCAL};

use crate::CaptureError;

/// A destination network, `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix must be 0-{max}"))?
        };
        Ok(Self { addr, prefix })
    }
}

/// Which TCP connects to capture. Empty lists: every destination, every port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureFilter {
    pub cidrs: Vec<Cidr>,
    pub ports: Vec<u16>,
    /// Never captured (the gateway's own ports are added by the gateway).
    pub skip_ports: Vec<u16>,
    /// Also capture loopback and link-local destinations (off by default).
    pub include_local: bool,
}

/// An address as the programs hold it: IPv4 v4-mapped, network-order words.
fn words(ip: IpAddr) -> [u32; 4] {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
}

/// Loopback or link-local (IPv4, IPv4-mapped or IPv6).
fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.is_loopback() || v4.is_link_local(),
            None => v6.is_loopback() || v6.is_unicast_link_local(),
        },
    }
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        let (a, b) = (words(self.addr), words(ip));
        let prefix = u32::from(self.prefix) + if self.addr.is_ipv4() { 96 } else { 0 };
        let (a, b) = (
            a.iter()
                .flat_map(|w| w.to_ne_bytes())
                .fold(0u128, |x, o| x << 8 | u128::from(o)),
            b.iter()
                .flat_map(|w| w.to_ne_bytes())
                .fold(0u128, |x, o| x << 8 | u128::from(o)),
        );
        let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
        (a ^ b) & mask == 0
    }
}

impl CaptureFilter {
    /// Whether a connect to `dest` is captured: the same rule the programs apply.
    pub fn matches(&self, dest: std::net::SocketAddr) -> bool {
        let ip = match dest.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if !self.include_local && is_local(ip) {
            return false;
        }
        if self.skip_ports.contains(&dest.port()) {
            return false;
        }
        if !self.ports.is_empty() && !self.ports.contains(&dest.port()) {
            return false;
        }
        self.cidrs.is_empty() || self.cidrs.iter().any(|c| c.contains(ip))
    }

    /// The programs' configuration for this filter and a gateway listening on `gateway`.
    pub fn config(&self, gateway: SocketAddrV4) -> Result<Config, CaptureError> {
        if self.cidrs.len() > MAX_CIDRS {
            return Err(CaptureError::Filter(format!(
                "at most {MAX_CIDRS} destination CIDRs"
            )));
        }
        if self.ports.len() > MAX_PORTS || self.skip_ports.len() > MAX_PORTS {
            return Err(CaptureError::Filter(format!(
                "at most {MAX_PORTS} ports to capture and {MAX_PORTS} to skip"
            )));
        }
        let mut cfg = Config {
            gateway: words(IpAddr::V4(*gateway.ip())),
            gateway_port: gateway.port(),
            _pad: 0,
            flags: if self.include_local { 0 } else { SKIP_LOCAL },
            cidr_count: self.cidrs.len() as u32,
            cidrs: [kube_gateway_bpf_common::Cidr::default(); MAX_CIDRS],
            port_count: self.ports.len() as u32,
            ports: [0; MAX_PORTS],
            skip_port_count: self.skip_ports.len() as u32,
            skip_ports: [0; MAX_PORTS],
        };
        for (slot, c) in cfg.cidrs.iter_mut().zip(&self.cidrs) {
            *slot = kube_gateway_bpf_common::Cidr {
                addr: words(c.addr),
                prefix: u32::from(c.prefix) + if c.addr.is_ipv4() { 96 } else { 0 },
            };
        }
        cfg.ports[..self.ports.len()].copy_from_slice(&self.ports);
        cfg.skip_ports[..self.skip_ports.len()].copy_from_slice(&self.skip_ports);
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_map_ipv4_into_the_v6_space() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert_eq!(c.prefix, 16);
        assert_eq!("fd00::1".parse::<Cidr>().unwrap().prefix, 128);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
        let f = CaptureFilter {
            cidrs: vec![c],
            ports: vec![11434],
            ..Default::default()
        };
        let cfg = f.config("127.0.0.1:15001".parse().unwrap()).unwrap();
        assert_eq!(cfg.cidrs[0].prefix, 112);
        assert_eq!(cfg.cidrs[0].addr[2], 0xffff_u32.to_be());
        assert_eq!(cfg.cidrs[0].addr[3], u32::from_ne_bytes([10, 1, 0, 0]));
        assert_eq!(cfg.gateway[3], u32::from_ne_bytes([127, 0, 0, 1]));
        assert_eq!((cfg.port_count, cfg.ports[0]), (1, 11434));
        assert_eq!(cfg.flags, SKIP_LOCAL);
        let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert!(f.matches(at("10.1.200.3:11434")));
        assert!(
            f.matches(at("[::ffff:10.1.0.9]:11434")),
            "v4-mapped is IPv4"
        );
        assert!(!f.matches(at("10.2.0.1:11434")), "outside the CIDR");
        assert!(!f.matches(at("10.1.0.1:80")), "another port");
        let all = CaptureFilter::default();
        assert!(all.matches(at("[fd00::1]:1")));
        assert!(!all.matches(at("127.0.0.1:11434")), "loopback is skipped");
        assert!(!all.matches(at("[fe80::1]:11434")), "link-local is skipped");
        let too_many = CaptureFilter {
            ports: vec![1; MAX_PORTS + 1],
            ..Default::default()
        };
        assert!(too_many.config("127.0.0.1:1".parse().unwrap()).is_err());
    }
}
