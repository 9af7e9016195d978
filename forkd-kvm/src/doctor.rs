//! `forkd doctor`'s checks for the KVM backend: KVM itself, transparent huge pages, the guest
//! kernel and images, and what isolation needs (network namespaces and nftables from
//! `forkd-net`, cgroup controllers from `forkd-cgroup`, the VMM jail). Changes nothing.

use crate::isolation;
use forkd_core::doctor::Check;
use forkd_core::Dirs;
use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Every check, in the order `forkd doctor` prints them.
pub fn checks(dirs: &Dirs) -> Vec<Check> {
    let mut checks = vec![kvm(), kvm_flavour(), huge_pages()];
    checks.extend(guest_artifacts(dirs));
    const ISOLATION_FIX: &str = "run as root with iproute2 and nftables installed; see docs/security.md";
    for s in forkd_net::doctor(&isolation::net_config(&dirs.state)) {
        checks.push(Check::new(s.feature, s.ok, format!("network isolation: {}", s.detail), ISOLATION_FIX));
    }
    for s in forkd_cgroup::doctor(&isolation::cgroup_config()) {
        checks.push(Check::new(s.feature, s.ok, format!("sandbox limits: {}", s.detail), ISOLATION_FIX));
    }
    checks.extend(jail());
    checks
}

fn kvm() -> Check {
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    Check::new(
        "kvm",
        kvm.is_ok(),
        match &kvm {
            Ok(_) => "/dev/kvm is usable".to_string(),
            Err(e) => format!("/dev/kvm: {e}"),
        },
        "enable virtualization (VT-x/AMD-V) or load kvm_intel/kvm_amd, and run as root",
    )
}

fn kvm_flavour() -> Check {
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    Check::info(
        "kvm flavour",
        if pvm {
            "kvm_pvm (nested, emulates guest kernel code): compat CPU profile and the syscall-via-#UD kernel path are used; boots take tens of seconds, BRANCH is the fast path"
        } else {
            "hardware KVM"
        },
    )
}

fn huge_pages() -> Check {
    let thp = read("/sys/kernel/mm/transparent_hugepage/enabled");
    Check::new(
        "transparent huge pages",
        thp.contains("[always]") || thp.contains("[madvise]"),
        format!("enabled: {thp}"),
        "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (BRANCH pauses grow with 4 KiB pages)",
    )
}

fn guest_artifacts(dirs: &Dirs) -> Vec<Check> {
    let kernel = match forkd_guest::kernel::find_built(dirs) {
        Ok(k) => Check::new("guest kernel", true, k.vmlinux.display().to_string(), ""),
        Err(e) => Check::new("guest kernel", false, e.to_string(), "forkd kernel build"),
    };
    let images = match forkd_guest::image::list(dirs) {
        Ok(images) if !images.is_empty() => {
            let names: Vec<_> = images.iter().map(|i| i.manifest.name.clone()).collect();
            Check::new("images", true, names.join(", "), "")
        }
        Ok(_) => Check::new("images", false, "no images", "forkd image build tiny"),
        Err(e) => Check::new("images", false, e.to_string(), "forkd image build tiny"),
    };
    vec![kernel, images]
}

/// What the VMM jail needs: seccomp filters, mount namespaces, and capabilities to drop.
fn jail() -> Vec<Check> {
    const FIX: &str = "see docs/security.md (the jail needs seccomp, mount namespaces and root)";
    let seccomp = read("/proc/sys/kernel/seccomp/actions_avail");
    let mnt = Path::new("/proc/self/ns/mnt").exists();
    let (eff, _) = forkd_jail::current_caps();
    vec![
        Check::new(
            "seccomp",
            seccomp.contains("trap"),
            if seccomp.is_empty() {
                "no seccomp filter support (CONFIG_SECCOMP_FILTER)".into()
            } else {
                format!("filter actions: {seccomp}")
            },
            FIX,
        ),
        Check::new("mount namespace", mnt, if mnt { "available" } else { "no mount namespaces" }, FIX),
        Check::new(
            "capabilities",
            eff & (1 << 21) != 0,
            format!(
                "launcher CapEff {eff:#x}; VMMs drop all but CAP_SYS_RESOURCE and CAP_SYS_NICE{}",
                if isolation::jail_enabled() { "" } else { " (FORKD_JAIL=0: jail disabled)" }
            ),
            FIX,
        ),
    ]
}
