//! `forkd doctor`: checks the host and says what to fix.

use forkd_guest::dirs::Dirs;
use std::path::Path;

/// One check's verdict.
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// What to do when not ok.
    pub fix: Option<String>,
}

fn check(name: &'static str, ok: bool, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    let fix = fix.into();
    Check { name, ok, detail: detail.into(), fix: (!ok && !fix.is_empty()).then_some(fix) }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

pub fn run_checks(dirs: &Dirs) -> Vec<Check> {
    let mut checks = Vec::new();
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    checks.push(check(
        "kvm",
        kvm.is_ok(),
        match &kvm {
            Ok(_) => "/dev/kvm is usable".to_string(),
            Err(e) => format!("/dev/kvm: {e}"),
        },
        "enable virtualization (VT-x/AMD-V) or load kvm_intel/kvm_amd, and run as root",
    ));
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    checks.push(Check {
        name: "kvm flavour",
        ok: true,
        detail: if pvm {
            "kvm_pvm (nested, emulates guest kernel code): compat CPU profile and the syscall-via-#UD kernel path are used; boots take tens of seconds, BRANCH is the fast path".into()
        } else {
            "hardware KVM".into()
        },
        fix: None,
    });
    let thp = read("/sys/kernel/mm/transparent_hugepage/enabled");
    let thp_ok = thp.contains("[always]") || thp.contains("[madvise]");
    checks.push(check(
        "transparent huge pages",
        thp_ok,
        format!("enabled: {thp}"),
        "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (BRANCH pauses grow with 4 KiB pages)",
    ));
    let cg2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let cg1_mem = Path::new("/sys/fs/cgroup/memory").exists();
    checks.push(check(
        "cgroups",
        cg2 || cg1_mem,
        if cg1_mem {
            "v1 controllers mounted (memory, cpu, pids...)"
        } else if cg2 {
            "unified v2 hierarchy"
        } else {
            "not found"
        },
        "mount cgroup v2 at /sys/fs/cgroup",
    ));
    checks.push(check(
        "network namespaces",
        Path::new("/proc/self/ns/net").exists(),
        "available",
        "enable CONFIG_NET_NS",
    ));
    checks.push(check("tun/tap", Path::new("/dev/net/tun").exists(), "/dev/net/tun", "modprobe tun"));
    match forkd_guest::kernel::find_built(dirs) {
        Ok(k) => checks.push(check("guest kernel", true, format!("{}", k.vmlinux.display()), "")),
        Err(e) => checks.push(check("guest kernel", false, e.to_string(), "forkd kernel build")),
    }
    match forkd_guest::image::list(dirs) {
        Ok(images) if !images.is_empty() => {
            let names: Vec<_> = images.iter().map(|i| i.manifest.name.clone()).collect();
            checks.push(check("images", true, names.join(", "), ""));
        }
        Ok(_) => checks.push(check("images", false, "no images", "forkd image build tiny")),
        Err(e) => checks.push(check("images", false, e.to_string(), "forkd image build tiny")),
    }
    // Isolation: per-sandbox network, cgroup limits, the VMM jail (docs/security.md).
    for f in forkd_vmm::backend::isolation::doctor(&dirs.state) {
        checks.push(check(f.name, f.ok, f.detail, "see docs/security.md (root, iproute2, nftables, cgroups)"));
    }
    checks
}
