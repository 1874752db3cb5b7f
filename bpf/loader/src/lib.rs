//! Loads kube-gateway's eBPF capture (built from `bpf/ebpf` and embedded here) and
//! attaches it: the getsockopt hook to the gateway's own cgroup once, the connect and
//! sockops hooks to each workload's cgroup. One loaded capture serves many workloads
//! (a node agent's pods): their records are keyed by network-namespace cookie, and every
//! workload's connects go to the same listener address, which each workload's own
//! network namespace has. Dropping the [`Capture`] detaches everything;
//! [`Capture::detach_workload`] one workload.

mod cgroup;
mod filter;

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

use aya::maps::Array;
use aya::programs::cgroup_sock_addr::CgroupSockAddrLink;
use aya::programs::sock_ops::SockOpsLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SockOps};
use aya::Ebpf;
use kube_gateway_bpf_common::Config;

pub use cgroup::{cgroup_of, cgroup_subtree, cgroup_v2_root};
pub use filter::{CaptureFilter, Cidr};
pub use kube_gateway_bpf_common::GATEWAY_MARK;

/// Why the capture could not be set up. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("no cgroup v2 hierarchy is mounted (eBPF capture attaches to cgroup v2): mount one or run on a node that has it")]
    NoCgroupV2,
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is the root cgroup: capture attaches to the workload's own cgroup, never the whole node")]
    RootCgroup { path: PathBuf },
    #[error("cannot load the eBPF programs ({source}): this needs root, or CAP_SYS_ADMIN + CAP_NET_ADMIN (CAP_BPF alone is refused by the verifier), and a kernel with BPF cgroup hooks (5.10+)")]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("cannot load or attach {program} to {cgroup}: {source}; the kernel must allow this hook and you need CAP_SYS_ADMIN + CAP_NET_ADMIN")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("this binary was built without its eBPF programs (AYA_BUILD_SKIP was set): rebuild without it to capture")]
    NotBuilt,
    #[error("capture filter: {0}")]
    Filter(String),
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, String),
}

/// What to capture and where to send it, for every workload a capture serves.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The gateway's own cgroup: its accepted sockets answer `SO_ORIGINAL_DST`.
    pub gateway_cgroup: PathBuf,
    /// The listener address connects go to (in each workload's network namespace;
    /// IPv4, IPv6 connects go to its v4-mapped address).
    pub gateway: SocketAddrV4,
    pub filter: CaptureFilter,
}

/// What to capture and where, for one workload.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// The workload's cgroup (v2 directory): its connects are redirected.
    pub workload_cgroup: PathBuf,
    /// The gateway's own cgroup: its accepted sockets answer `SO_ORIGINAL_DST`.
    pub gateway_cgroup: PathBuf,
    /// The gateway's listener (IPv4; IPv6 connects go to its v4-mapped address).
    pub gateway: SocketAddrV4,
    pub filter: CaptureFilter,
}

/// The hooks attached to one workload's cgroup: dropping them detaches them.
struct WorkloadHooks {
    _connect: Vec<CgroupSockAddrLink>,
    _sockops: SockOpsLink,
}

/// The loaded capture and the workloads it is attached to. Dropping it detaches every
/// program.
pub struct Capture {
    ebpf: Ebpf,
    root: PathBuf,
    workloads: HashMap<PathBuf, WorkloadHooks>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("workloads", &self.workloads.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn open_cgroup(path: &Path, root: &Path) -> Result<std::fs::File, CaptureError> {
    let canonical = path.canonicalize().map_err(|source| CaptureError::Cgroup {
        path: path.to_owned(),
        source,
    })?;
    if canonical == root {
        return Err(CaptureError::RootCgroup {
            path: path.to_owned(),
        });
    }
    std::fs::File::open(&canonical).map_err(|source| CaptureError::Cgroup {
        path: path.to_owned(),
        source,
    })
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, CaptureError> {
    ebpf.program_mut(name)
        .ok_or_else(|| CaptureError::Map(name, "program missing".into()))
}

fn attach_err(
    program: &'static str,
    cgroup: &Path,
) -> impl Fn(aya::programs::ProgramError) -> CaptureError {
    let cgroup = cgroup.to_owned();
    move |e| CaptureError::Attach {
        program,
        cgroup: cgroup.clone(),
        source: Box::new(e),
    }
}

// aya attaches through BPF links where the kernel has them, and cgroup links already
// stack with other programs; their create call refuses the multi flag.
const MODE: CgroupAttachMode = CgroupAttachMode::Single;

impl Capture {
    /// Loads the programs, writes the configuration, attaches the getsockopt hook to
    /// the gateway's cgroup. No workload is captured yet.
    pub fn load(cfg: &LoadConfig) -> Result<Self, CaptureError> {
        let root = cgroup_v2_root()?;
        let gateway = open_cgroup(&cfg.gateway_cgroup, &root)?;
        let config: Config = cfg.filter.config(cfg.gateway)?;
        let object = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kube-gateway-bpf"));
        if object.is_empty() {
            return Err(CaptureError::NotBuilt);
        }
        let mut ebpf = Ebpf::load(object).map_err(|e| CaptureError::Load {
            source: Box::new(e),
        })?;
        {
            let map = ebpf
                .map_mut("CONFIG")
                .ok_or_else(|| CaptureError::Map("CONFIG", "missing".into()))?;
            let mut array: Array<_, Config> =
                Array::try_from(map).map_err(|e| CaptureError::Map("CONFIG", e.to_string()))?;
            array
                .set(0, config, 0)
                .map_err(|e| CaptureError::Map("CONFIG", e.to_string()))?;
        }
        for name in ["connect4", "connect6"] {
            let err = attach_err(name, &cfg.gateway_cgroup);
            let p: &mut CgroupSockAddr = program(&mut ebpf, name)?.try_into().map_err(&err)?;
            p.load().map_err(&err)?;
        }
        let err = attach_err("kgw_sockops", &cfg.gateway_cgroup);
        let p: &mut SockOps = program(&mut ebpf, "kgw_sockops")?
            .try_into()
            .map_err(&err)?;
        p.load().map_err(&err)?;
        let err = attach_err("kgw_getsockopt", &cfg.gateway_cgroup);
        let p: &mut CgroupSockopt = program(&mut ebpf, "kgw_getsockopt")?
            .try_into()
            .map_err(&err)?;
        p.load().map_err(&err)?;
        p.attach(&gateway, MODE).map_err(&err)?;
        tracing::info!(
            gateway_cgroup = %cfg.gateway_cgroup.display(),
            listener = %cfg.gateway,
            "eBPF capture loaded"
        );
        Ok(Self {
            ebpf,
            root,
            workloads: HashMap::new(),
        })
    }

    /// Loads the programs and attaches them to one workload (`kube-gateway run
    /// --cgroup`).
    pub fn attach(cfg: &CaptureConfig) -> Result<Self, CaptureError> {
        let mut capture = Self::load(&LoadConfig {
            gateway_cgroup: cfg.gateway_cgroup.clone(),
            gateway: cfg.gateway,
            filter: cfg.filter.clone(),
        })?;
        capture.attach_workload(&cfg.workload_cgroup)?;
        Ok(capture)
    }

    /// Captures the connects of a workload's cgroup. Attaching a cgroup already
    /// attached changes nothing (never two sets of hooks on one cgroup).
    pub fn attach_workload(&mut self, cgroup: &Path) -> Result<(), CaptureError> {
        if self.workloads.contains_key(cgroup) {
            return Ok(());
        }
        let fd = open_cgroup(cgroup, &self.root)?;
        let mut connect = Vec::with_capacity(2);
        for name in ["connect4", "connect6"] {
            let err = attach_err(name, cgroup);
            let p: &mut CgroupSockAddr = program(&mut self.ebpf, name)?.try_into().map_err(&err)?;
            let id = p.attach(&fd, MODE).map_err(&err)?;
            connect.push(p.take_link(id).map_err(&err)?);
        }
        let err = attach_err("kgw_sockops", cgroup);
        let p: &mut SockOps = program(&mut self.ebpf, "kgw_sockops")?
            .try_into()
            .map_err(&err)?;
        let id = p.attach(&fd, MODE).map_err(&err)?;
        let sockops = p.take_link(id).map_err(&err)?;
        self.workloads.insert(
            cgroup.to_owned(),
            WorkloadHooks {
                _connect: connect,
                _sockops: sockops,
            },
        );
        tracing::info!(workload = %cgroup.display(), "eBPF capture attached");
        Ok(())
    }

    /// Stops capturing a workload's cgroup; `false` when it was not attached.
    pub fn detach_workload(&mut self, cgroup: &Path) -> bool {
        let found = self.workloads.remove(cgroup).is_some();
        if found {
            tracing::info!(workload = %cgroup.display(), "eBPF capture detached");
        }
        found
    }

    /// The cgroups captured now.
    pub fn workloads(&self) -> impl Iterator<Item = &Path> {
        self.workloads.keys().map(PathBuf::as_path)
    }
}
