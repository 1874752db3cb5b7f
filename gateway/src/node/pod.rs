//! Finding a pod of this node from its UID, as the kubelet lays pods out in the host's
//! cgroup v2 tree: its cgroup (systemd driver:
//! `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid, - as _>.slice`, or
//! `kubepods-pod<uid>.slice` for guaranteed pods; cgroupfs driver:
//! `kubepods/<qos>/pod<uid>`), a process in it (its containers are child cgroups), and
//! that process's network namespace (`/proc/<pid>/ns/net`: the agent sees host PIDs).
//! Also the agent's own cgroup in the same tree, which it cannot name from
//! `/proc/self/cgroup` when its container has a cgroup namespace of its own.

use std::io;
use std::path::{Path, PathBuf};

/// How deep pods sit below the cgroup root (kubepods / qos / pod, plus a margin for
/// nested runtimes).
const MAX_DEPTH: usize = 5;

/// Whether a cgroup directory name is the pod's with this UID.
fn is_pod_dir(name: &str, uid: &str) -> bool {
    let systemd_uid = uid.replace('-', "_");
    name == format!("pod{uid}")
        || (name.starts_with("kubepods") && name.ends_with(&format!("pod{systemd_uid}.slice")))
}

/// Directories below `root`, breadth first, at most `MAX_DEPTH` deep, that `pick` takes.
fn find_dir(root: &Path, pick: &dyn Fn(&Path) -> bool) -> io::Result<Option<PathBuf>> {
    let mut level = vec![root.to_owned()];
    for _ in 0..MAX_DEPTH {
        let mut next = Vec::new();
        for dir in level {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue; // gone meanwhile, or not readable: not ours
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = entry.path();
                if pick(&path) {
                    return Ok(Some(path));
                }
                next.push(path);
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    Ok(None)
}

/// The pod's cgroup under the host's cgroup v2 `root`, if the pod is on this node.
pub fn pod_cgroup(root: &Path, uid: &str) -> io::Result<Option<PathBuf>> {
    find_dir(root, &|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| is_pod_dir(n, uid))
    })
}

/// The PIDs in a cgroup and the cgroups below it.
pub fn processes(cgroup: &Path) -> io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for dir in kube_gateway_bpf::cgroup_subtree(cgroup) {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    Ok(pids)
}

/// The network namespace of a process of the pod.
pub fn pod_netns(cgroup: &Path) -> io::Result<PathBuf> {
    let mut denied = None;
    for pid in processes(cgroup)? {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        match std::fs::metadata(&path) {
            Ok(_) => return Ok(path),
            // Another user's process: opening its namespace is a ptrace-mode access
            // check, which needs CAP_SYS_PTRACE. Said as such, not as "no process".
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => denied = Some(e),
            Err(_) => {} // gone meanwhile
        }
    }
    Err(match denied {
        Some(e) => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the pod's processes in {} are not readable ({e}): the agent needs CAP_SYS_PTRACE",
                cgroup.display()
            ),
        ),
        None => io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no process in {} (the pod is starting or gone)",
                cgroup.display()
            ),
        ),
    })
}

/// This process's cgroup in the host tree at `root`: the one named in
/// `/proc/self/cgroup` when it is there and holds this process (no cgroup namespace of
/// its own), else the one whose `cgroup.procs` lists its PID (the agent sees host PIDs).
pub fn own_cgroup(root: &Path) -> io::Result<PathBuf> {
    let pid = std::process::id();
    let holds_me = |dir: &Path| {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|t| t.lines().any(|l| l.trim() == pid.to_string()))
    };
    let named = std::fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .find_map(|l| {
            l.strip_prefix("0::")
                .map(|p| root.join(p.trim_start_matches('/')))
        });
    if let Some(dir) = named.filter(|d| holds_me(d)) {
        return Ok(dir);
    }
    find_dir(root, &|p| holds_me(p))?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "this process (pid {pid}) is in no cgroup under {}",
                root.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_cgroup_drivers_name_the_pod() {
        let uid = "1b2c3d4e-aaaa-bbbb-cccc-000000000001";
        assert!(is_pod_dir(
            "kubepods-besteffort-pod1b2c3d4e_aaaa_bbbb_cccc_000000000001.slice",
            uid
        ));
        assert!(is_pod_dir(
            "kubepods-pod1b2c3d4e_aaaa_bbbb_cccc_000000000001.slice",
            uid
        ));
        assert!(is_pod_dir("pod1b2c3d4e-aaaa-bbbb-cccc-000000000001", uid));
        assert!(!is_pod_dir("pod1b2c3d4e-aaaa-bbbb-cccc-000000000002", uid));
        assert!(!is_pod_dir("kubepods-besteffort.slice", uid));
    }

    #[test]
    fn a_pod_is_found_in_a_kubelet_like_tree() {
        let root = tempfile::tempdir().unwrap();
        let uid = "0f0e0d0c-1111-2222-3333-444455556666";
        let pod = root
            .path()
            .join("kubepods.slice/kubepods-burstable.slice")
            .join("kubepods-burstable-pod0f0e0d0c_1111_2222_3333_444455556666.slice");
        std::fs::create_dir_all(pod.join("cri-containerd-abc.scope")).unwrap();
        std::fs::write(pod.join("cri-containerd-abc.scope/cgroup.procs"), "4242\n").unwrap();
        assert_eq!(pod_cgroup(root.path(), uid).unwrap(), Some(pod.clone()));
        assert_eq!(processes(&pod).unwrap(), [4242]);
        assert_eq!(pod_cgroup(root.path(), "other").unwrap(), None);
    }
}
