//! The eBPF capture on this kernel: a process in the workload cgroup that connects
//! anywhere the filter matches lands on the gateway's listener, which reads the original
//! destination back with `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6); a
//! process outside the cgroup is not touched; other socket options still work.
//!
//! Needs root (cgroups, BPF). Elsewhere it skips, saying so; under CI=true it must run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kube_gateway_bpf::{
    cgroup_of, cgroup_v2_root, Capture, CaptureConfig, CaptureFilter, LoadConfig,
};

/// One test at a time: each moves this process into a gateway cgroup of its own, and a
/// listener belongs to the cgroup its process was in when it was made.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn privileged() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must run the eBPF tests as root"
        );
        eprintln!("skipping: the eBPF capture test needs root");
    }
    root
}

/// Test cgroups, removed (with this process moved back) on drop.
struct Cgroups {
    base: PathBuf,
    home: PathBuf,
}

impl Cgroups {
    fn new(tag: &str) -> Self {
        let base = cgroup_v2_root()
            .unwrap()
            .join(format!("kgw-test-{}-{tag}", std::process::id()));
        for d in ["workload", "gateway", "other"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        let home = cgroup_of(None).unwrap();
        Self { base, home }
    }
    fn dir(&self, name: &str) -> PathBuf {
        self.base.join(name)
    }
    fn enter(dir: &Path, pid: u32) {
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        for d in ["workload", "gateway", "other", ""] {
            let _ = std::fs::remove_dir(self.base.join(d));
        }
    }
}

/// Runs `bash` connecting to `dest` and sending a line, in `cgroup` when given.
fn client(cgroup: Option<&Path>, dest: &str) -> std::process::Child {
    let (host, port) = dest.rsplit_once(':').unwrap();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let enter = cgroup.map_or(String::new(), |c| {
        format!("echo $$ > {}/cgroup.procs; ", c.display())
    });
    Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{enter}exec 3<>/dev/tcp/{host}/{port} && echo hello >&3 && read -t 5 line <&3"
        ))
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

fn accept_one(l: &TcpListener) -> (std::net::TcpStream, SocketAddr) {
    l.set_nonblocking(false).unwrap();
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello\n");
    let sock = socket2::SockRef::from(&s);
    let orig = sock
        .original_dst_v4()
        .or_else(|_| sock.original_dst_v6())
        .expect("SO_ORIGINAL_DST answered");
    let orig = orig.as_socket().unwrap();
    // An ordinary option on the same socket still gets the kernel's answer.
    assert!(sock.recv_buffer_size().unwrap() > 0);
    s.write_all(b"bye\n").unwrap();
    (s, orig)
}

#[test]
fn connects_in_the_cgroup_land_on_the_gateway_with_their_original_destination() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let cg = Cgroups::new("one");
    // This process is the gateway: its listener, created in its cgroup, answers.
    Cgroups::enter(&cg.dir("gateway"), std::process::id());
    let gateway = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let SocketAddr::V4(gw_addr) = gateway.local_addr().unwrap() else {
        unreachable!()
    };
    let other_port = other.local_addr().unwrap().port();
    let capture = Capture::attach(&CaptureConfig {
        workload_cgroup: cg.dir("workload"),
        gateway_cgroup: cg.dir("gateway"),
        gateway: gw_addr,
        filter: CaptureFilter {
            // Loopback too, so "not redirected" can be seen without unroutable waits.
            include_local: true,
            ..Default::default()
        },
    })
    .expect("capture attached");

    // IPv4, an address nobody serves: only the redirect makes this connect work.
    let mut c = client(Some(&cg.dir("workload")), "10.213.7.9:11434");
    let (_s, orig) = accept_one(&gateway);
    assert_eq!(orig, "10.213.7.9:11434".parse().unwrap());
    assert!(c.wait().unwrap().success());

    // IPv6 (bash opens an AF_INET6 socket), to a ULA nobody serves.
    let mut c = client(Some(&cg.dir("workload")), "[fd00:7::9]:8080");
    let (_s, orig) = accept_one(&gateway);
    assert_eq!(orig, "[fd00:7::9]:8080".parse().unwrap());
    assert!(c.wait().unwrap().success());

    // Outside the cgroup: the connect goes where it was meant to.
    let mut c = client(None, &format!("127.0.0.1:{other_port}"));
    other.set_nonblocking(false).unwrap();
    let (mut s, _) = other.accept().unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();
    s.write_all(b"bye\n").unwrap();
    assert!(c.wait().unwrap().success());
    // The same destination from inside the cgroup is captured.
    let mut c = client(
        Some(&cg.dir("workload")),
        &format!("127.0.0.1:{other_port}"),
    );
    let (_s, orig) = accept_one(&gateway);
    assert_eq!(orig.port(), other_port);
    assert!(c.wait().unwrap().success());

    drop(capture);
    // Detached: nothing is redirected any more.
    let mut c = client(
        Some(&cg.dir("workload")),
        &format!("127.0.0.1:{other_port}"),
    );
    let (mut s, _) = other.accept().unwrap();
    s.read_exact(&mut buf).unwrap();
    s.write_all(b"bye\n").unwrap();
    assert!(c.wait().unwrap().success());
}

#[test]
fn the_node_root_cgroup_is_refused() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let root = cgroup_v2_root().unwrap();
    let err = Capture::attach(&CaptureConfig {
        workload_cgroup: root.clone(),
        gateway_cgroup: root,
        gateway: "127.0.0.1:15001".parse().unwrap(),
        filter: CaptureFilter::default(),
    })
    .unwrap_err();
    assert!(err.to_string().contains("root cgroup"), "{err}");
}

/// The programs attached to a cgroup, as bpftool lists them (its own, not inherited).
fn programs_on(cgroup: &Path) -> usize {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool (Debian package bpftool)");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.trim_start()
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .count()
}

#[test]
fn one_capture_serves_several_workloads_and_detaches_each_alone() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    // A node agent's shape: one loaded capture, pods attached and detached one by one.
    let cg = Cgroups::new("multi");
    Cgroups::enter(&cg.dir("gateway"), std::process::id());
    let gateway = TcpListener::bind("127.0.0.1:0").unwrap();
    let SocketAddr::V4(gw_addr) = gateway.local_addr().unwrap() else {
        unreachable!()
    };
    let mut capture = Capture::load(&LoadConfig {
        gateway_cgroup: cg.dir("gateway"),
        gateway: gw_addr,
        filter: CaptureFilter::default(),
    })
    .expect("capture loaded");
    let (a, b) = (cg.dir("workload"), cg.dir("other"));
    capture.attach_workload(&a).unwrap();
    capture.attach_workload(&b).unwrap();
    // Attaching again is a no-op: never two sets of hooks on one cgroup.
    capture.attach_workload(&b).unwrap();
    assert_eq!(programs_on(&b), 3, "connect4, connect6, sockops once");
    for dir in [&a, &b] {
        let mut c = client(Some(dir), "10.213.7.10:11434");
        let (_s, orig) = accept_one(&gateway);
        assert_eq!(orig, "10.213.7.10:11434".parse().unwrap());
        assert!(c.wait().unwrap().success());
    }
    assert!(capture.detach_workload(&a));
    assert!(!capture.detach_workload(&a), "already detached");
    assert_eq!(programs_on(&a), 0);
    assert_eq!(programs_on(&b), 3);
    // b is still captured.
    let mut c = client(Some(&b), "10.213.7.11:11434");
    let (_s, orig) = accept_one(&gateway);
    assert_eq!(orig, "10.213.7.11:11434".parse().unwrap());
    assert!(c.wait().unwrap().success());
    drop(capture);
    assert_eq!(programs_on(&b), 0, "nothing left behind");
}
