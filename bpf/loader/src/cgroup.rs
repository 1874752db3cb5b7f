//! Finding cgroup v2 directories: where the hierarchy is mounted (not hard-coded: it is
//! `/sys/fs/cgroup` on most nodes, `/sys/fs/cgroup/unified` on hybrid ones) and which
//! cgroup a process is in.

use std::path::{Path, PathBuf};

use crate::CaptureError;

/// The cgroup v2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup_v2_root() -> Result<PathBuf, CaptureError> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| CaptureError::Cgroup {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    info.lines()
        .find_map(|line| {
            // "... mount-point options - fstype source super-options"
            let (pre, post) = line.split_once(" - ")?;
            let mount = pre.split(' ').nth(4)?;
            (post.split(' ').next()? == "cgroup2").then(|| PathBuf::from(mount))
        })
        .ok_or(CaptureError::NoCgroupV2)
}

/// A cgroup directory and every cgroup below it (a pod's and its containers'). A
/// directory removed while it is walked is left out.
pub fn cgroup_subtree(top: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![top.to_owned()];
    while let Some(dir) = dirs.pop() {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        found.push(dir);
    }
    found
}

/// The cgroup v2 directory of a process (`None`: this process).
pub fn cgroup_of(pid: Option<u32>) -> Result<PathBuf, CaptureError> {
    let file = match pid {
        Some(p) => format!("/proc/{p}/cgroup"),
        None => "/proc/self/cgroup".to_owned(),
    };
    let text = std::fs::read_to_string(&file).map_err(|source| CaptureError::Cgroup {
        path: file.clone().into(),
        source,
    })?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CaptureError::NoCgroupV2)?;
    Ok(cgroup_v2_root()?.join(rel.trim_start_matches('/')))
}
