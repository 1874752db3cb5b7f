//! Builds the eBPF programs (`bpf/ebpf`, for the kernel's target, with the nightly
//! toolchain's `rust-src` and `bpf-linker`) so the loader can embed them.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ebpf")
        .canonicalize()
        .context("bpf/ebpf")?;
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("bpf/ebpf path is not UTF-8"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "kube-gateway-bpf-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
