//! Guest kernel build: a Linux kernel from Debian's `linux-source-6.1` package, configured with
//! `make tinyconfig` plus the repo's `kernel/microvm.config` fragment and patched with
//! `kernel/patches/*.patch`. Backs `forkd kernel build`.
//!
//! The config and patches are compiled into the binary, so a forkd binary always builds the
//! kernel it was written for. A build is keyed by the sha256 of (source package version, config
//! fragment, patches) and kept in `Dirs::kernels()/<key>/`; a finished key is never rebuilt unless
//! asked (`BuildOptions::force`). See `kernel/README.md` for what the config and patches do and
//! for the command line.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::progress::Progress;
use forkd_core::Dirs;

/// Debian package holding the kernel source tarball.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// Where `SOURCE_PACKAGE` installs the tarball.
pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// Top-level directory inside the tarball.
const SOURCE_TREE_DIR: &str = "linux-source-6.1";

/// The config fragment merged on top of `make tinyconfig`.
pub const CONFIG_FRAGMENT: &str = include_str!("../../kernel/microvm.config");

/// The patches, in the order they are applied (`patch -p1`), as (file name, contents).
pub const PATCHES: &[(&str, &str)] = &[
    ("0001-forkd-ud-syscall.patch", include_str!("../../kernel/patches/0001-forkd-ud-syscall.patch")),
    (
        "0002-forkd-no-int3-fwait-in-kernel.patch",
        include_str!("../../kernel/patches/0002-forkd-no-int3-fwait-in-kernel.patch"),
    ),
    ("0003-forkd-fastboot.patch", include_str!("../../kernel/patches/0003-forkd-fastboot.patch")),
    ("0004-forkd-slab-quiesce.patch", include_str!("../../kernel/patches/0004-forkd-slab-quiesce.patch")),
    ("0005-forkd-quiet-hrtimer-hang.patch", include_str!("../../kernel/patches/0005-forkd-quiet-hrtimer-hang.patch")),
];

/// Kernel command line the VMM should pass on every host, without `root=` and the
/// `virtio_mmio.device=` entries (the VMM adds those). See kernel/README.md for each parameter.
/// On kvm_pvm hosts `EMULATED_KERNEL_MODE_CMDLINE` must be appended (without it init dies at its
/// first system call); `cmdline_for_host()` returns the right combination.
pub const RECOMMENDED_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1 8250.nr_uarts=1 tsc=reliable \
     no_timer_check percpu_alloc=page noreplace-smp rodata=off";

/// Added to `RECOMMENDED_CMDLINE` on hosts whose /dev/kvm emulates guest kernel mode
/// (`kvm_pvm`): system calls through the exception path and no kernel-mode INT3/FWAIT (patches
/// 0001, 0002), skipped optional boot work (0003), and the CPU features the kernel-mode emulator
/// cannot run. On such hosts CPUID leaves 1, 7 and 0xd are passed
/// through from the host whatever the VMM sets, so these features can only be hidden here.
///
/// XSAVE stays on: guest user mode runs with the host's XCR0 (AVX-512 included), so the kernel
/// must switch the full extended state between processes. The emulator cannot run XSAVE-family
/// instructions; the VMM completes XSAVE, XSAVEOPT and XRSTOR itself in the standard format
/// (`forkd_vmm::emulate::xsave`). `xsavec,xsaves` keep the kernel off the compacted format
/// (XSAVEC/XSAVES/XRSTORS), which the VMM does not implement.
pub const EMULATED_KERNEL_MODE_CMDLINE: &str = "forkd.ud_syscall=1 forkd.fastboot=1 \
     clearcpuid=popcnt,smap,fsgsbase,rdrand,rdseed,invpcid,erms,fsrm,cx16,xsavec,xsaves";

/// Number of build steps (`CC`, `AS`, `AR`, `LD`, ... lines) `make vmlinux bzImage` printed for
/// this config; the progress total. Recount when the config changes a lot (only the bar's
/// accuracy depends on it).
pub const EXPECTED_BUILD_STEPS: u64 = 1460;

/// Sysfs path present when the host's KVM is `kvm_pvm`.
const KVM_PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// True when this host's /dev/kvm emulates guest kernel mode (`kvm_pvm`), i.e. when
/// `EMULATED_KERNEL_MODE_CMDLINE` must be added.
pub fn host_emulates_guest_kernel() -> bool {
    Path::new(KVM_PVM_MODULE).exists()
}

/// The full recommended command line for this host (still without `root=` and devices).
pub fn cmdline_for_host() -> String {
    if host_emulates_guest_kernel() {
        format!("{RECOMMENDED_CMDLINE} {EMULATED_KERNEL_MODE_CMDLINE}")
    } else {
        RECOMMENDED_CMDLINE.to_string()
    }
}

/// Errors from building or finding the guest kernel. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "{package} is not installed and `apt-get install -y {package}` failed: {detail}; \
         install it as root (apt-get update && apt-get install -y {package}) and retry"
    )]
    SourceInstall { package: String, detail: String },

    #[error(
        "cannot read the installed version of {package} (dpkg-query: {detail}); \
         is it installed? apt-get install -y {package}"
    )]
    SourceVersion { package: String, detail: String },

    #[error(
        "no guest kernel built for this forkd version; run `forkd kernel build` (about 4 minutes) \
         or pass --kernel PATH"
    )]
    NotBuilt { key: String, dir: PathBuf },

    #[error(
        "kernel build tools missing: {}; install them as root: apt-get install -y \
         build-essential bc bison flex libelf-dev libssl-dev cpio dwarves xz-utils patch",
        missing.join(", ")
    )]
    MissingTools { missing: Vec<String> },

    #[error(
        "patch {name} does not apply to {package} {version}; the source package changed under \
         forkd's patches (update kernel/patches/). Log: {}",
        log.display()
    )]
    Patch { name: String, package: String, version: String, log: PathBuf },

    #[error(
        "Kconfig did not keep the config forkd requires (dropped or changed: {}; forced on: {}); \
         a dependency is missing from kernel/microvm.config. Resulting config: {}",
        fmt_list(dropped),
        fmt_list(forced_on),
        config.display()
    )]
    ConfigMismatch { dropped: Vec<String>, forced_on: Vec<String>, config: PathBuf },

    #[error("{step} failed ({status}); full build log: {}", log.display())]
    Build { step: String, status: String, log: PathBuf },

    #[error("another `forkd kernel build` holds {}; wait for it to finish", lock.display())]
    Busy { lock: PathBuf },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("kernel build manifest {}: {detail}", path.display())]
    Manifest { path: PathBuf, detail: String },
}

fn fmt_list(v: &[String]) -> String {
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> KernelError {
    let context = context.into();
    move |source| KernelError::Io { context, source }
}

/// Options of `build`.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// `make -j`; default: the number of CPUs.
    pub jobs: Option<usize>,
    /// Rebuild even if this key was built before.
    pub force: bool,
}

/// `build.json` in a kernel build directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildManifest {
    /// The build key (also the directory name).
    pub key: String,
    /// sha256 of config fragment + patches only (finds a build when dpkg cannot be asked).
    pub recipe: String,
    pub source_package: String,
    pub source_version: String,
    pub patches: Vec<String>,
    /// Unix time the build finished.
    pub created_unix: u64,
    /// forkd version that built it.
    pub forkd_version: String,
    /// `RECOMMENDED_CMDLINE` at build time.
    pub cmdline_recommended: String,
    /// `EMULATED_KERNEL_MODE_CMDLINE` at build time.
    pub cmdline_emulated_kernel_mode: String,
    /// File sizes in bytes: vmlinux, bzImage, config, System.map.
    pub sizes: BTreeMap<String, u64>,
}

/// A finished kernel build.
#[derive(Debug, Clone)]
pub struct KernelArtifacts {
    pub dir: PathBuf,
    /// Uncompressed ELF kernel; what the VMM loads (64-bit entry, or the PVH note).
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub config: PathBuf,
    pub system_map: PathBuf,
    pub build_log: PathBuf,
    pub manifest: BuildManifest,
}

impl KernelArtifacts {
    fn in_dir(dir: &Path, manifest: BuildManifest) -> Self {
        Self {
            dir: dir.to_path_buf(),
            vmlinux: dir.join("vmlinux"),
            bzimage: dir.join("bzImage"),
            config: dir.join("config"),
            system_map: dir.join("System.map"),
            build_log: dir.join("build.log"),
            manifest,
        }
    }
}

/// sha256 (hex) of the config fragment and the patches, in a fixed order.
pub fn recipe_hash() -> String {
    let mut h = Sha256::new();
    hash_inputs(&mut h);
    hex::encode(h.finalize())
}

fn hash_inputs(h: &mut Sha256) {
    // Length-prefixed fields so that no two different inputs hash alike.
    let mut field = |name: &str, data: &[u8]| {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    };
    field("microvm.config", CONFIG_FRAGMENT.as_bytes());
    for (name, body) in PATCHES {
        field(name, body.as_bytes());
    }
}

/// The build key: sha256 (hex) of the source package version, the config fragment and the
/// patches, in that order.
pub fn build_key(source_version: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"forkd-kernel-v1\0");
    h.update((source_version.len() as u64).to_le_bytes());
    h.update(source_version.as_bytes());
    hash_inputs(&mut h);
    hex::encode(h.finalize())
}

/// Installed version of `SOURCE_PACKAGE` (dpkg-query).
pub fn source_version() -> Result<String, KernelError> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", SOURCE_PACKAGE])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| KernelError::SourceVersion { package: SOURCE_PACKAGE.to_string(), detail: e.to_string() })?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || version.is_empty() {
        return Err(KernelError::SourceVersion {
            package: SOURCE_PACKAGE.to_string(),
            detail: tail(&String::from_utf8_lossy(&out.stderr), 400),
        });
    }
    Ok(version)
}

fn read_manifest(dir: &Path) -> Result<BuildManifest, KernelError> {
    let path = dir.join("build.json");
    let text = fs::read_to_string(&path).map_err(io_err(format!("reading {}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| KernelError::Manifest { path, detail: e.to_string() })
}

/// A key directory counts as built when its manifest parses and the kernel files exist.
fn load_built(dir: &Path) -> Option<KernelArtifacts> {
    let manifest = read_manifest(dir).ok()?;
    let a = KernelArtifacts::in_dir(dir, manifest);
    (a.vmlinux.is_file() && a.bzimage.is_file()).then_some(a)
}

/// The build for the current key. When dpkg cannot tell the source version (package removed),
/// the newest build with this binary's config and patches is used.
pub fn find_built(dirs: &Dirs) -> Result<KernelArtifacts, KernelError> {
    let kernels = dirs.kernels();
    match source_version() {
        Ok(version) => {
            let key = build_key(&version);
            let dir = kernels.join(&key);
            load_built(&dir).ok_or(KernelError::NotBuilt { key, dir })
        }
        Err(_) => {
            let recipe = recipe_hash();
            let mut best: Option<KernelArtifacts> = None;
            if let Ok(entries) = fs::read_dir(&kernels) {
                for entry in entries.flatten() {
                    if let Some(a) = load_built(&entry.path()) {
                        let newer = best.as_ref().is_none_or(|b| a.manifest.created_unix > b.manifest.created_unix);
                        if a.manifest.recipe == recipe && newer {
                            best = Some(a);
                        }
                    }
                }
            }
            best.ok_or(KernelError::NotBuilt {
                key: format!("(unknown {SOURCE_PACKAGE} version, recipe {recipe})"),
                dir: kernels,
            })
        }
    }
}

/// Build the guest kernel for the installed source (installing it first if missing), or return
/// the existing build of the same key.
pub fn build(dirs: &Dirs, opts: &BuildOptions, progress: &dyn Progress) -> Result<KernelArtifacts, KernelError> {
    progress.stage(&format!("checking {SOURCE_PACKAGE}"));
    let kernels = dirs.kernels();
    // A finished build needs neither the tarball nor the tools.
    if !opts.force {
        if let Ok(version) = source_version() {
            let key = build_key(&version);
            if let Some(a) = load_built(&kernels.join(&key)) {
                progress.stage(&format!("guest kernel {} already built", short(&key)));
                return Ok(a);
            }
        }
    }
    ensure_source(progress)?;
    let version = source_version()?;
    let key = build_key(&version);
    let final_dir = kernels.join(&key);

    check_tools()?;
    fs::create_dir_all(&kernels).map_err(io_err(format!("creating {}", kernels.display())))?;
    let _lock = BuildLock::acquire(&kernels.join(".build.lock"))?;
    // Another build may have finished the same key while we waited for the lock.
    if !opts.force {
        if let Some(a) = load_built(&final_dir) {
            return Ok(a);
        }
    }
    remove_stale_temp_dirs(&kernels);

    let tmp = kernels.join(format!(".tmp-{}-{}", short(&key), std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(format!("removing {}", tmp.display())))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    let log_path = tmp.join("build.log");
    let mut log = BuildLog::create(&log_path)?;

    let result = build_in(&tmp, &version, &key, opts, progress, &mut log);
    // The unpacked tree is ~1.3 GB; never keep it. On failure keep build.log (and config).
    let _ = fs::remove_dir_all(tmp.join(SOURCE_TREE_DIR));
    let out = result?;
    drop(log);

    progress.stage("installing kernel build");
    if final_dir.exists() {
        let old = kernels.join(format!(".old-{}-{}", short(&key), std::process::id()));
        fs::rename(&final_dir, &old).map_err(io_err(format!("moving old build {} aside", final_dir.display())))?;
        let _ = fs::remove_dir_all(&old);
    }
    fs::rename(&log_path, out.join("build.log")).map_err(io_err(format!("moving {}", log_path.display())))?;
    fs::rename(&out, &final_dir).map_err(io_err(format!("moving {} to {}", out.display(), final_dir.display())))?;
    let _ = fs::remove_dir_all(&tmp);
    let manifest = read_manifest(&final_dir)?;
    Ok(KernelArtifacts::in_dir(&final_dir, manifest))
}

/// Unpack, patch, configure, verify, compile; returns the directory holding the artifacts
/// (inside `tmp`).
fn build_in(
    tmp: &Path,
    version: &str,
    key: &str,
    opts: &BuildOptions,
    progress: &dyn Progress,
    log: &mut BuildLog,
) -> Result<PathBuf, KernelError> {
    progress.stage(&format!("unpacking {SOURCE_PACKAGE} {version}"));
    run_logged(
        Command::new("tar").arg("-xf").arg(SOURCE_TARBALL).arg("-C").arg(tmp),
        "unpacking the kernel source",
        log,
        progress,
        None,
    )?;
    let src = tmp.join(SOURCE_TREE_DIR);

    let patch_dir = tmp.join("patches");
    fs::create_dir_all(&patch_dir).map_err(io_err("creating the patch directory"))?;
    for (name, body) in PATCHES {
        progress.stage(&format!("applying {name}"));
        let file = patch_dir.join(name);
        fs::write(&file, body).map_err(io_err(format!("writing {}", file.display())))?;
        let applied = run_logged(
            Command::new("patch").args(["-p1", "--forward", "--batch", "-i"]).arg(&file).current_dir(&src),
            &format!("patch {name}"),
            log,
            progress,
            None,
        );
        if applied.is_err() {
            return Err(KernelError::Patch {
                name: name.to_string(),
                package: SOURCE_PACKAGE.to_string(),
                version: version.to_string(),
                log: log.path.clone(),
            });
        }
    }

    progress.stage("configuring (tinyconfig + microvm.config)");
    let fragment = tmp.join("microvm.config");
    fs::write(&fragment, CONFIG_FRAGMENT).map_err(io_err("writing microvm.config"))?;
    run_logged(make(&src).arg("tinyconfig"), "make tinyconfig", log, progress, None)?;
    run_logged(
        Command::new("sh")
            .arg("scripts/kconfig/merge_config.sh")
            .arg("-m")
            .arg(".config")
            .arg(&fragment)
            .current_dir(&src),
        "merge_config.sh",
        log,
        progress,
        None,
    )?;
    run_logged(make(&src).arg("olddefconfig"), "make olddefconfig", log, progress, None)?;

    progress.stage("verifying .config");
    let dot_config = src.join(".config");
    let final_config = fs::read_to_string(&dot_config).map_err(io_err("reading the generated .config"))?;
    let kept_config = tmp.join("config");
    fs::write(&kept_config, &final_config).map_err(io_err("saving the generated .config"))?;
    let check = verify_config(CONFIG_FRAGMENT, &final_config);
    if !check.is_ok() {
        return Err(KernelError::ConfigMismatch {
            dropped: check.dropped,
            forced_on: check.forced_on,
            config: kept_config,
        });
    }

    let jobs = opts.jobs.or_else(|| std::thread::available_parallelism().ok().map(|n| n.get())).unwrap_or(1).max(1);
    progress.stage(&format!("compiling (make -j{jobs} vmlinux bzImage)"));
    progress.advance(0, EXPECTED_BUILD_STEPS);
    run_logged(
        make(&src).arg(format!("-j{jobs}")).args(["vmlinux", "bzImage"]),
        "make vmlinux bzImage",
        log,
        progress,
        Some(EXPECTED_BUILD_STEPS),
    )?;

    let out = tmp.join("out");
    fs::create_dir_all(&out).map_err(io_err("creating the output directory"))?;
    let files = [
        ("vmlinux", src.join("vmlinux")),
        ("bzImage", src.join("arch/x86/boot/bzImage")),
        ("config", dot_config),
        ("System.map", src.join("System.map")),
    ];
    let mut sizes = BTreeMap::new();
    for (name, from) in &files {
        let to = out.join(name);
        let n = fs::copy(from, &to).map_err(io_err(format!("copying {}", from.display())))?;
        sizes.insert(name.to_string(), n);
    }
    let manifest = BuildManifest {
        key: key.to_string(),
        recipe: recipe_hash(),
        source_package: SOURCE_PACKAGE.to_string(),
        source_version: version.to_string(),
        patches: PATCHES.iter().map(|(n, _)| n.to_string()).collect(),
        created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        forkd_version: env!("CARGO_PKG_VERSION").to_string(),
        cmdline_recommended: RECOMMENDED_CMDLINE.to_string(),
        cmdline_emulated_kernel_mode: EMULATED_KERNEL_MODE_CMDLINE.to_string(),
        sizes,
    };
    let json = serde_json::to_string_pretty(&manifest)
        .map_err(|e| KernelError::Manifest { path: out.join("build.json"), detail: e.to_string() })?;
    fs::write(out.join("build.json"), json + "\n").map_err(io_err("writing build.json"))?;
    Ok(out)
}

fn make(src: &Path) -> Command {
    let mut c = Command::new("make");
    c.current_dir(src)
        .env("LC_ALL", "C")
        .env("KBUILD_BUILD_USER", "forkd")
        .env("KBUILD_BUILD_HOST", "forkd")
        // Never prompt: olddefconfig answers, but keep stdin closed anyway.
        .stdin(Stdio::null());
    c
}

/// Install the source package if its tarball is missing.
fn ensure_source(progress: &dyn Progress) -> Result<(), KernelError> {
    if Path::new(SOURCE_TARBALL).is_file() {
        return Ok(());
    }
    progress.stage(&format!("{SOURCE_TARBALL} missing: installing {SOURCE_PACKAGE} with apt-get"));
    let out = Command::new("apt-get")
        .args(["install", "-y", SOURCE_PACKAGE])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| KernelError::SourceInstall { package: SOURCE_PACKAGE.to_string(), detail: e.to_string() })?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        progress.log_line(line);
    }
    if !out.status.success() || !Path::new(SOURCE_TARBALL).is_file() {
        let detail = if out.status.success() {
            format!("it finished but {SOURCE_TARBALL} is still missing")
        } else {
            format!("{}: {}", out.status, tail(&String::from_utf8_lossy(&out.stderr), 600))
        };
        return Err(KernelError::SourceInstall { package: SOURCE_PACKAGE.to_string(), detail });
    }
    Ok(())
}

/// Tools the build runs, by executable name.
const REQUIRED_TOOLS: &[&str] = &["make", "gcc", "ld", "tar", "xz", "patch", "flex", "bison", "bc", "perl"];

fn check_tools() -> Result<(), KernelError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    let missing: Vec<String> =
        REQUIRED_TOOLS.iter().filter(|t| !dirs.iter().any(|d| d.join(t).is_file())).map(|t| t.to_string()).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelError::MissingTools { missing })
    }
}

/// The build log file; every line any step prints goes here.
struct BuildLog {
    path: PathBuf,
    file: fs::File,
}

impl BuildLog {
    fn create(path: &Path) -> Result<Self, KernelError> {
        let file = fs::File::create(path).map_err(io_err(format!("creating {}", path.display())))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    fn line(&mut self, line: &str) {
        // A full disk shows up as a failing step soon enough; don't fail the build on the log.
        let _ = writeln!(self.file, "{line}");
    }
}

/// True for the lines kbuild prints once per build step ("  CC      kernel/fork.o").
fn is_build_step(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("  ") else {
        return false;
    };
    let word: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
    !word.is_empty()
        && word.len() <= 8
        && word.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        && rest[word.len()..].starts_with(' ')
}

/// Run a command, sending stdout and stderr line by line to the log and to
/// `progress.log_line`; with `steps_total`, count build steps into `progress.advance`.
fn run_logged(
    cmd: &mut Command,
    step: &str,
    log: &mut BuildLog,
    progress: &dyn Progress,
    steps_total: Option<u64>,
) -> Result<(), KernelError> {
    log.line(&format!("### {step}: {cmd:?}"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("starting {step}")))?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || pump(out, &tx)));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || pump(err, &tx)));
    }
    drop(tx);
    let mut done = 0u64;
    let mut total = steps_total.unwrap_or(0);
    for line in rx {
        log.line(&line);
        progress.log_line(&line);
        if steps_total.is_some() && is_build_step(&line) {
            done += 1;
            total = total.max(done + 1);
            progress.advance(done, total);
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait().map_err(io_err(format!("waiting for {step}")))?;
    if !status.success() {
        log.line(&format!("### {step} failed: {status}"));
        return Err(KernelError::Build { step: step.to_string(), status: status.to_string(), log: log.path.clone() });
    }
    if steps_total.is_some() {
        progress.advance(total, total);
    }
    Ok(())
}

fn pump(stream: impl std::io::Read, tx: &mpsc::Sender<String>) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                if tx.send(line.trim_end_matches(['\n', '\r']).to_string()).is_err() {
                    break;
                }
            }
        }
    }
}

/// Result of comparing the fragment with the final .config.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ConfigCheck {
    /// `CONFIG_X=value` lines of the fragment that the final config lacks or has with another
    /// value (e.g. `CONFIG_SQUASHFS=y` when a menu it depends on is off).
    pub dropped: Vec<String>,
    /// `# CONFIG_X is not set` lines of the fragment that ended up set anyway (by `select` or a
    /// non-optional default).
    pub forced_on: Vec<String>,
}

impl ConfigCheck {
    pub fn is_ok(&self) -> bool {
        self.dropped.is_empty() && self.forced_on.is_empty()
    }
}

/// Parse config text into name -> value (`None` for `# CONFIG_X is not set`).
fn parse_config(text: &str) -> BTreeMap<String, Option<String>> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                if name.starts_with("CONFIG_") && !name.contains(' ') {
                    map.insert(name.to_string(), None);
                }
            }
        } else if line.starts_with("CONFIG_") {
            if let Some((name, value)) = line.split_once('=') {
                map.insert(name.to_string(), Some(value.to_string()));
            }
        }
    }
    map
}

/// Check that every option the fragment sets has that value in the final config, and that every
/// option it switches off is off.
pub fn verify_config(fragment: &str, final_config: &str) -> ConfigCheck {
    let want = parse_config(fragment);
    let have = parse_config(final_config);
    let mut check = ConfigCheck::default();
    for (name, value) in &want {
        let got = have.get(name).cloned().flatten();
        match value {
            Some(v) => {
                if got.as_deref() != Some(v.as_str()) {
                    check.dropped.push(format!("{name}={v}"));
                }
            }
            None => {
                if got.is_some_and(|g| g != "n") {
                    check.forced_on.push(name.clone());
                }
            }
        }
    }
    check
}

/// An exclusive `flock` on a file, released on drop.
struct BuildLock {
    _file: fs::File,
}

impl BuildLock {
    fn acquire(path: &Path) -> Result<Self, KernelError> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(KernelError::Busy { lock: path.to_path_buf() });
        }
        Ok(Self { _file: file })
    }
}

/// Remove `.tmp-*` / `.old-*` leftovers of builds that were killed (we hold the lock, so none is
/// running).
fn remove_stale_temp_dirs(kernels: &Path) {
    if let Ok(entries) = fs::read_dir(kernels) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".tmp-") || name.starts_with(".old-") {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_sha256_hex_and_stable() {
        let a = build_key("6.1.192-2");
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(a, build_key("6.1.192-2"));
    }

    #[test]
    fn key_depends_on_source_version() {
        assert_ne!(build_key("6.1.192-2"), build_key("6.1.192-3"));
        assert_ne!(build_key(""), build_key("6.1.192-2"));
    }

    #[test]
    fn key_matches_documented_construction() {
        // sha256("forkd-kernel-v1\0" + len-prefixed version + len-prefixed named inputs).
        let mut h = Sha256::new();
        h.update(b"forkd-kernel-v1\0");
        h.update(3u64.to_le_bytes());
        h.update(b"1.0");
        let mut field = |name: &str, data: &[u8]| {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((data.len() as u64).to_le_bytes());
            h.update(data);
        };
        field("microvm.config", CONFIG_FRAGMENT.as_bytes());
        for (n, b) in PATCHES {
            field(n, b.as_bytes());
        }
        assert_eq!(build_key("1.0"), hex::encode(h.finalize()));
    }

    #[test]
    fn recipe_differs_from_key() {
        assert_ne!(recipe_hash(), build_key(""));
        assert_eq!(recipe_hash().len(), 64);
    }

    #[test]
    fn patches_are_ordered_and_embedded() {
        assert!(!PATCHES.is_empty());
        let names: Vec<&str> = PATCHES.iter().map(|(n, _)| *n).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        for (name, body) in PATCHES {
            assert!(name.ends_with(".patch"));
            assert!(body.contains("\n--- a/"), "{name} has no diff");
            assert!(body.contains("\n+++ b/"), "{name} has no diff");
        }
    }

    #[test]
    fn fragment_requires_the_essentials() {
        let cfg = parse_config(CONFIG_FRAGMENT);
        for name in [
            "CONFIG_64BIT",
            "CONFIG_SMP",
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_VIRTIO_NET",
            "CONFIG_VSOCKETS",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_HW_RANDOM_VIRTIO",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_EXT4_FS",
            "CONFIG_OVERLAY_FS",
            "CONFIG_SQUASHFS",
            "CONFIG_DEVTMPFS",
            "CONFIG_KVM_GUEST",
            "CONFIG_UNIX98_PTYS",
            "CONFIG_BINFMT_ELF",
            "CONFIG_BINFMT_SCRIPT",
        ] {
            assert_eq!(cfg.get(name), Some(&Some("y".to_string())), "{name}");
        }
        for name in ["CONFIG_MODULES", "CONFIG_PCI", "CONFIG_ACPI", "CONFIG_LEGACY_PTYS"] {
            assert_eq!(cfg.get(name), Some(&None), "{name} must be switched off");
        }
    }

    #[test]
    fn verify_config_accepts_a_matching_config() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_N=8\n# CONFIG_B is not set\n";
        let config = "CONFIG_A=y\nCONFIG_N=8\n# CONFIG_B is not set\nCONFIG_OTHER=y\n";
        assert!(verify_config(fragment, config).is_ok());
        // An option that is off by being absent is fine too.
        assert!(verify_config(fragment, "CONFIG_A=y\nCONFIG_N=8\n").is_ok());
    }

    #[test]
    fn verify_config_lists_dropped_and_forced_options() {
        let fragment = "CONFIG_A=y\nCONFIG_SQUASHFS=y\nCONFIG_N=8\n# CONFIG_B is not set\n";
        let config = "CONFIG_A=y\n# CONFIG_SQUASHFS is not set\nCONFIG_N=64\nCONFIG_B=y\n";
        let check = verify_config(fragment, config);
        assert!(!check.is_ok());
        assert_eq!(check.dropped, vec!["CONFIG_N=8", "CONFIG_SQUASHFS=y"]);
        assert_eq!(check.forced_on, vec!["CONFIG_B"]);
        let err = KernelError::ConfigMismatch {
            dropped: check.dropped,
            forced_on: check.forced_on,
            config: PathBuf::from("/tmp/config"),
        };
        let msg = err.to_string();
        assert!(msg.contains("CONFIG_SQUASHFS=y"), "{msg}");
        assert!(msg.contains("CONFIG_B"), "{msg}");
    }

    #[test]
    fn verify_config_handles_module_values() {
        let check = verify_config("CONFIG_A=y\n", "CONFIG_A=m\n");
        assert_eq!(check.dropped, vec!["CONFIG_A=y"]);
    }

    #[test]
    fn not_built_message_says_what_to_do() {
        let err = KernelError::NotBuilt { key: "k".into(), dir: PathBuf::from("/x") };
        assert_eq!(
            err.to_string(),
            "no guest kernel built for this forkd version; run `forkd kernel build` \
             (about 4 minutes) or pass --kernel PATH"
        );
    }

    #[test]
    fn build_step_lines_are_recognised() {
        assert!(is_build_step("  CC      kernel/fork.o"));
        assert!(is_build_step("  LD      vmlinux.o"));
        assert!(is_build_step("  AR      built-in.a"));
        assert!(is_build_step("  OBJCOPY arch/x86/boot/setup.bin"));
        assert!(!is_build_step("Kernel: arch/x86/boot/bzImage is ready  (#1)"));
        assert!(!is_build_step("make[1]: Entering directory"));
        assert!(!is_build_step("  "));
    }

    #[test]
    fn cmdlines_have_no_root_or_devices() {
        for c in [RECOMMENDED_CMDLINE, EMULATED_KERNEL_MODE_CMDLINE] {
            assert!(!c.contains("root="));
            assert!(!c.contains("virtio_mmio.device"));
            assert!(!c.contains("  "));
        }
        assert!(EMULATED_KERNEL_MODE_CMDLINE.contains("forkd.ud_syscall=1"));
    }

    #[test]
    fn find_built_reports_not_built_in_an_empty_cache() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = Dirs { state: tmp.path().join("state"), cache: tmp.path().join("cache") };
        match find_built(&dirs) {
            Err(KernelError::NotBuilt { .. }) => {}
            other => panic!("expected NotBuilt, got {other:?}"),
        }
    }

    #[test]
    fn finished_build_dir_is_found_and_reused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("k");
        fs::create_dir_all(&dir).expect("mkdir");
        let manifest = BuildManifest {
            key: "k".into(),
            recipe: recipe_hash(),
            source_package: SOURCE_PACKAGE.into(),
            source_version: "v".into(),
            patches: vec![],
            created_unix: 1,
            forkd_version: "0".into(),
            cmdline_recommended: RECOMMENDED_CMDLINE.into(),
            cmdline_emulated_kernel_mode: EMULATED_KERNEL_MODE_CMDLINE.into(),
            sizes: BTreeMap::new(),
        };
        fs::write(dir.join("build.json"), serde_json::to_string(&manifest).expect("json")).expect("write");
        assert!(load_built(&dir).is_none(), "no kernel files yet");
        fs::write(dir.join("vmlinux"), b"x").expect("write");
        fs::write(dir.join("bzImage"), b"x").expect("write");
        let a = load_built(&dir).expect("built");
        assert_eq!(a.manifest, manifest);
        assert_eq!(a.vmlinux, dir.join("vmlinux"));
    }
}
