//! Where each controller lives: cgroup v1 hierarchies (one mount per controller or group of
//! controllers) and/or the v2 unified hierarchy, found in /proc/self/mountinfo. Hosts may mix
//! them (this project's hosts: every controller on v1, v2 mounted with only hugetlb), so the
//! choice is made per controller: v2 when the unified hierarchy offers it, else v1.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The controllers forkd uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Controller {
    Memory,
    Cpu,
    /// v1 only: CPU usage accounting (v2 reports it in `cpu.stat`).
    Cpuacct,
    Pids,
    /// `blkio` on v1, `io` on v2.
    Io,
}

impl Controller {
    pub const ALL: [Controller; 5] =
        [Controller::Memory, Controller::Cpu, Controller::Cpuacct, Controller::Pids, Controller::Io];

    pub fn v1_name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Pids => "pids",
            Controller::Io => "blkio",
        }
    }

    /// `None` for controllers v2 folds into others.
    pub fn v2_name(self) -> Option<&'static str> {
        match self {
            Controller::Memory => Some("memory"),
            Controller::Cpu => Some("cpu"),
            Controller::Cpuacct => None,
            Controller::Pids => Some("pids"),
            Controller::Io => Some("io"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

/// One mounted hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub version: Version,
    pub mount: PathBuf,
    /// Controllers it carries (for v2: those listed in its root `cgroup.controllers`).
    pub controllers: Vec<Controller>,
    /// v1: the `name=` of a named hierarchy, `N:` line key in /proc/self/cgroup.
    pub v1_key: String,
}

/// All hierarchies of this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    pub hierarchies: Vec<Hierarchy>,
}

impl Layout {
    /// Reads /proc/self/mountinfo.
    pub fn detect() -> std::io::Result<Layout> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(Layout::parse(&text, |mount| std::fs::read_to_string(mount.join("cgroup.controllers")).ok()))
    }

    /// Parses mountinfo text; `v2_controllers` reads a v2 mount's `cgroup.controllers`.
    pub fn parse(mountinfo: &str, v2_controllers: impl Fn(&Path) -> Option<String>) -> Layout {
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let left: Vec<&str> = left.split_whitespace().collect();
            let right: Vec<&str> = right.split_whitespace().collect();
            let (Some(mount), Some(fstype)) = (left.get(4), right.first()) else {
                continue;
            };
            let mount = PathBuf::from(unescape(mount));
            if hierarchies.iter().any(|h| h.mount == mount) {
                continue;
            }
            match *fstype {
                "cgroup" => {
                    let opts: Vec<&str> = right.get(2).map(|o| o.split(',').collect()).unwrap_or_default();
                    let controllers: Vec<Controller> =
                        Controller::ALL.into_iter().filter(|c| opts.contains(&c.v1_name())).collect();
                    let mut key: Vec<&str> = opts
                        .iter()
                        .copied()
                        .filter(|o| o.starts_with("name=") || Controller::ALL.iter().any(|c| c.v1_name() == *o))
                        .collect();
                    key.sort_unstable();
                    hierarchies.push(Hierarchy { version: Version::V1, mount, controllers, v1_key: key.join(",") });
                }
                "cgroup2" => {
                    let listed = v2_controllers(&mount).unwrap_or_default();
                    let names: Vec<&str> = listed.split_whitespace().collect();
                    let controllers = Controller::ALL
                        .into_iter()
                        .filter(|c| c.v2_name().is_some_and(|n| names.contains(&n)))
                        .collect();
                    hierarchies.push(Hierarchy { version: Version::V2, mount, controllers, v1_key: String::new() });
                }
                _ => {}
            }
        }
        Layout { hierarchies }
    }

    /// The hierarchy serving `controller`: v2 if it offers it, else the v1 one.
    pub fn for_controller(&self, controller: Controller) -> Option<&Hierarchy> {
        let v2 = self.hierarchies.iter().find(|h| h.version == Version::V2 && h.controllers.contains(&controller));
        v2.or_else(|| self.hierarchies.iter().find(|h| h.version == Version::V1 && h.controllers.contains(&controller)))
    }

    /// The unified (v2) mount, if any.
    pub fn v2(&self) -> Option<&Hierarchy> {
        self.hierarchies.iter().find(|h| h.version == Version::V2)
    }
}

/// mountinfo escapes spaces, tabs, newlines and backslashes as octal.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(Ok(v)) = s.get(i + 1..i + 4).map(|o| u8::from_str_radix(o, 8)) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroup path in `hierarchy`, from /proc/self/cgroup.
pub fn own_path(hierarchy: &Hierarchy, proc_self_cgroup: &str) -> Option<PathBuf> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, keys, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match hierarchy.version {
            Version::V2 => keys.is_empty(),
            Version::V1 => {
                let mut keys: Vec<&str> = keys.split(',').collect();
                keys.sort_unstable();
                !keys.is_empty() && keys.join(",") == hierarchy.v1_key
            }
        };
        matches.then(|| PathBuf::from(path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_hierarchy_prefers_v2_only_for_what_it_offers() {
        let layout = Layout::parse(MOUNTINFO, |_| Some("hugetlb\n".into()));
        let mem = layout.for_controller(Controller::Memory).unwrap();
        assert_eq!((mem.version, mem.mount.as_path()), (Version::V1, Path::new("/sys/fs/cgroup/memory")));
        let cpuacct = layout.for_controller(Controller::Cpuacct).unwrap();
        assert_eq!(cpuacct.mount, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(layout.for_controller(Controller::Io).unwrap().mount, Path::new("/sys/fs/cgroup/blkio"));
        assert_eq!(layout.v2().unwrap().controllers, vec![]);

        let pure_v2 = Layout::parse("41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", |_| {
            Some("cpuset cpu io memory hugetlb pids rdma misc\n".into())
        });
        for c in [Controller::Memory, Controller::Cpu, Controller::Io, Controller::Pids] {
            assert_eq!(pure_v2.for_controller(c).unwrap().version, Version::V2);
        }
        assert!(pure_v2.for_controller(Controller::Cpuacct).is_none());
    }

    #[test]
    fn own_path_matches_hierarchy_keys() {
        let layout = Layout::parse(MOUNTINFO, |_| Some(String::new()));
        let cgroup = "9:name=systemd:/\n4:memory:/process_api/0754\n2:cpuacct,cpu:/a\n0::/\n";
        let mem = layout.for_controller(Controller::Memory).unwrap();
        assert_eq!(own_path(mem, cgroup).unwrap(), Path::new("/process_api/0754"));
        let cpu = layout.for_controller(Controller::Cpu).unwrap();
        assert_eq!(own_path(cpu, cgroup).unwrap(), Path::new("/a"));
        assert_eq!(own_path(layout.v2().unwrap(), cgroup).unwrap(), Path::new("/"));
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
