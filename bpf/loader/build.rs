//! Builds the eBPF programs (`bpf/ebpf`, for the kernel's target, with the nightly
//! toolchain's `rust-src` and `bpf-linker`) so the loader can embed them. When either is
//! missing (a fresh clone), the build stops with one line saying what to run, not with
//! the nightly cargo's failure deep inside aya-build.
use std::{path::PathBuf, process::Command};

use anyhow::{anyhow, Context as _};

/// The toolchain aya-build compiles the programs with (its default, named here so that
/// the check below asks the same one).
const NIGHTLY: &str = "nightly";
/// In the nightly's sysroot, the file of rust-src's that `-Z build-std` reads first.
const RUST_SRC: &str = "lib/rustlib/src/rust/library/Cargo.lock";

fn main() -> anyhow::Result<()> {
    if skipped() {
        // Builds that never load the programs (the fuzz targets) still compile the
        // loader: an empty object stands in, and `Capture::load` refuses it by name.
        let out = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join("kube-gateway-bpf"), []).context("OUT_DIR")?;
    } else {
        let missing = missing_tools();
        if !missing.is_empty() {
            fail(&format!(
                "the eBPF programs need {}: run `bash bpf/toolchain.sh` first",
                missing.join(" and ")
            ));
            return Ok(());
        }
    }
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
        aya_build::Toolchain::Custom(NIGHTLY),
    )
}

/// `AYA_BUILD_SKIP=1` (or `true`): aya-build builds nothing, so nothing is needed, and
/// the binary cannot capture.
fn skipped() -> bool {
    std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// What of the eBPF toolchain is not installed. Two short commands; a failed build script
/// runs again on the next build, so this sees the toolchain once it is installed.
fn missing_tools() -> Vec<&'static str> {
    let mut missing = Vec::new();
    // The way aya-build runs the nightly. Without rustup it uses the current toolchain,
    // whose rust-src rustup cannot be asked about: the build then says for itself.
    match Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--print", "sysroot"])
        .output()
    {
        Ok(out) if out.status.success() => {
            let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if !sysroot.join(RUST_SRC).is_file() {
                missing.push("the nightly toolchain's rust-src");
            }
        }
        Ok(_) => missing.push("the nightly toolchain with rust-src"),
        Err(_) => {}
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|out| out.status.success()) {
        missing.push("bpf-linker");
    }
    missing
}

/// Fails the build with `message` as cargo's error: cargo prints it on one line and stops
/// (an error returned from `main` would come with a backtrace when RUST_BACKTRACE is set,
/// and cargo would print the script's whole output around it).
fn fail(message: &str) {
    println!("cargo::error={message}");
}
