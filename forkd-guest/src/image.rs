//! Root filesystem images: building (`tiny`, `default`), importing tarballs, and the local
//! store under [`Dirs::images`].
//!
//! An image is a directory `<images>/<name>/` holding `rootfs.ext4` and `manifest.json`
//! ([`Manifest`]). Builds happen in a hidden temporary directory next to the images and are
//! renamed into place at the end, so readers never see half-built images.
//!
//! Every image carries the guest agent at `/sbin/forkd-agent` (and `/sbin/init` links to it
//! when the image has no init of its own); boot with `init=/sbin/forkd-agent rw`.
//!
//! The filesystems are made with settings that spare guest kernel work (guest kernel code
//! is emulated and very slow): 4 KiB blocks, inode tables zeroed at build time
//! (`lazy_itable_init=0`, otherwise the guest's ext4lazyinit thread does it after boot), no
//! metadata checksums, and for `tiny` no journal.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::progress::Progress;
use forkd_core::Dirs;

/// File name of the filesystem image inside an image directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// File name of the manifest inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Where the agent lives inside every image.
pub const AGENT_IN_IMAGE: &str = "sbin/forkd-agent";
/// Size of the `tiny` image (sparse on the host).
pub const TINY_SIZE: u64 = 64 << 20;
/// Environment variable naming the static agent binary to put into images.
pub const AGENT_ENV: &str = "FORKD_AGENT";
/// Environment variable overriding the Debian mirror used by `build_default`.
pub const MIRROR_ENV: &str = "FORKD_DEBIAN_MIRROR";
/// Default Debian mirror for `build_default`.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Debian suite of the `default` image.
pub const DEFAULT_SUITE: &str = "bookworm";
/// The command that builds the static agent.
pub const AGENT_BUILD_HINT: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p forkd-agent --target x86_64-unknown-linux-gnu";

/// What an image was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// busybox + agent, a few MiB of content.
    Tiny,
    /// Debian bookworm minbase + python3.
    Default,
    /// Unpacked from a user's tarball.
    Imported,
}

impl ImageKind {
    fn rebuild_hint(self, name: &str) -> String {
        match self {
            ImageKind::Tiny => "rebuild it with `forkd image build tiny`".into(),
            ImageKind::Default => "rebuild it with `forkd image build default`".into(),
            ImageKind::Imported => {
                format!("remove it (`forkd image rm {name}`) and import the tarball again")
            }
        }
    }
}

/// Contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub kind: ImageKind,
    /// Size of `rootfs.ext4` in bytes (apparent size; the file is sparse).
    pub size_bytes: u64,
    /// sha256 of `rootfs.ext4`, lowercase hex.
    pub sha256: String,
    /// Build time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// sha256 of the agent binary inside the image.
    pub agent_sha256: String,
}

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    /// `<images>/<name>`
    pub dir: PathBuf,
    /// `<images>/<name>/rootfs.ext4`
    pub rootfs: PathBuf,
    pub manifest: Manifest,
}

impl ImageKind {
    /// The lowercase name (as in manifests and the API).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Tiny => "tiny",
            ImageKind::Default => "default",
            ImageKind::Imported => "imported",
        }
    }
}

impl Image {
    /// What the API says about this image.
    pub fn info(&self) -> forkd_core::ImageInfo {
        let m = &self.manifest;
        forkd_core::ImageInfo {
            name: m.name.clone(),
            kind: m.kind.as_str().into(),
            size_bytes: m.size_bytes,
            sha256: m.sha256.clone(),
            created_unix: m.created_unix,
        }
    }
}

/// Errors from building, finding or checking images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image name {name:?}: {reason} (use 1-64 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit)")]
    InvalidName { name: String, reason: &'static str },
    #[error("{}", not_found_message(name, available))]
    NotFound { name: String, available: Vec<String> },
    #[error("image rootfs {path} is corrupt: {reason}; {hint}")]
    Corrupt { path: PathBuf, reason: String, hint: String },
    #[error("image manifest {path} is unreadable: {reason}; remove the image directory and build or import it again")]
    BadManifest { path: PathBuf, reason: String },
    #[error("cannot find the static forkd-agent binary (looked at: {}); build it with `{AGENT_BUILD_HINT}` or set {AGENT_ENV}=/path/to/forkd-agent{}", display_paths(searched), notes_suffix(notes))]
    AgentNotFound { searched: Vec<PathBuf>, notes: Vec<String> },
    #[error("{path} is dynamically linked (it has an ELF interpreter), but the agent runs as PID 1 in a guest without shared libraries; build it statically with `{AGENT_BUILD_HINT}`")]
    AgentNotStatic { path: PathBuf },
    #[error("{path} is not a usable agent binary: {reason}")]
    AgentInvalid { path: PathBuf, reason: String },
    #[error("`{tool}` is not installed; install it with `apt-get install -y {package}`")]
    MissingTool { tool: &'static str, package: &'static str },
    #[error("`{command}` failed ({status}){}", output_suffix(output))]
    ToolFailed {
        command: String,
        status: String,
        /// The last lines of its output.
        output: String,
    },
    #[error("{what} needs root (run forkd as root, or via sudo)")]
    NeedsRoot { what: &'static str },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn not_found_message(name: &str, available: &[String]) -> String {
    if available.is_empty() {
        format!("no image named {name:?}: there are no images yet; build one with `forkd image build tiny`")
    } else {
        format!(
            "no image named {name:?} (available: {}); build one with `forkd image build tiny` or `forkd image build default`",
            available.join(", ")
        )
    }
}

fn display_paths(p: &[PathBuf]) -> String {
    p.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

fn notes_suffix(notes: &[String]) -> String {
    if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join("; "))
    }
}

fn output_suffix(output: &str) -> String {
    if output.trim().is_empty() {
        String::new()
    } else {
        format!(":\n{}", output.trim_end())
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

// ---------------------------------------------------------------------------------------------
// Names, store lookups
// ---------------------------------------------------------------------------------------------

/// Checks an image name: `[a-z0-9][a-z0-9._-]{0,63}`.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let bad = |reason| Err(ImageError::InvalidName { name: name.to_owned(), reason });
    let b = name.as_bytes();
    if b.is_empty() {
        return bad("it is empty");
    }
    if b.len() > 64 {
        return bad("it is longer than 64 characters");
    }
    if !(b[0].is_ascii_lowercase() || b[0].is_ascii_digit()) {
        return bad("it must start with a lowercase letter or a digit");
    }
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c);
    if !b.iter().all(ok) {
        return bad("it contains a character other than a-z, 0-9, '.', '_', '-'");
    }
    Ok(())
}

fn read_manifest(dir: &Path) -> Result<Manifest, ImageError> {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read(&path).map_err(|e| ImageError::BadManifest { path: path.clone(), reason: e.to_string() })?;
    serde_json::from_slice(&text).map_err(|e| ImageError::BadManifest { path, reason: e.to_string() })
}

fn image_at(dir: PathBuf, name: &str) -> Result<Image, ImageError> {
    let manifest = read_manifest(&dir)?;
    Ok(Image { name: name.to_owned(), rootfs: dir.join(ROOTFS_FILE), dir, manifest })
}

/// All images in the store, sorted by name. Directories with unreadable manifests are
/// skipped (with a warning); `get` reports them properly.
pub fn list(dirs: &Dirs) -> Result<Vec<Image>, ImageError> {
    let root = dirs.images();
    let rd = match fs::read_dir(&root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("listing {}", root.display()))(e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(io_err(format!("listing {}", root.display())))?;
        let Ok(name) = ent.file_name().into_string() else {
            continue;
        };
        if validate_name(&name).is_err() || !ent.path().is_dir() {
            continue; // build/removal temporaries start with '.'
        }
        match image_at(ent.path(), &name) {
            Ok(img) => out.push(img),
            Err(e) => tracing::warn!("skipping image {name}: {e}"),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The image called `name`.
pub fn get(dirs: &Dirs, name: &str) -> Result<Image, ImageError> {
    validate_name(name)?;
    let dir = dirs.images().join(name);
    if !dir.join(MANIFEST_FILE).exists() && !dir.is_dir() {
        let available = list(dirs)?.into_iter().map(|i| i.name).collect();
        return Err(ImageError::NotFound { name: name.to_owned(), available });
    }
    image_at(dir, name)
}

/// Deletes the image called `name`.
pub fn remove(dirs: &Dirs, name: &str) -> Result<(), ImageError> {
    let img = get(dirs, name)?;
    // Rename first so the image disappears atomically, then delete at leisure.
    let trash = dirs.images().join(format!(".remove-{name}-{}", unique_suffix()));
    fs::rename(&img.dir, &trash).map_err(io_err(format!("removing {}", img.dir.display())))?;
    remove_tree(&trash).map_err(io_err(format!("deleting {}", trash.display())))
}

/// Cheap integrity check: the rootfs exists, has the size the manifest records, and holds an
/// ext4 superblock that fits in the file. Catches truncated, replaced and garbage files.
pub fn verify(image: &Image) -> Result<(), ImageError> {
    let corrupt = |reason: String| ImageError::Corrupt {
        path: image.rootfs.clone(),
        reason,
        hint: image.manifest.kind.rebuild_hint(&image.name),
    };
    let mut f = match File::open(&image.rootfs) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(corrupt("the file is missing".into())),
        Err(e) => return Err(io_err(format!("opening {}", image.rootfs.display()))(e)),
    };
    let len = f.metadata().map_err(io_err(format!("inspecting {}", image.rootfs.display())))?.len();
    if len != image.manifest.size_bytes {
        return Err(corrupt(format!(
            "it is {len} bytes but the manifest says {} (truncated or replaced?)",
            image.manifest.size_bytes
        )));
    }
    let mut sb = [0u8; 1024];
    let read = f.seek(SeekFrom::Start(1024)).and_then(|_| f.read_exact(&mut sb));
    if read.is_err() {
        return Err(corrupt(format!("it is only {len} bytes, too small to hold an ext4 superblock")));
    }
    // struct ext4_super_block: s_blocks_count_lo @4, s_log_block_size @24, s_magic @56,
    // s_blocks_count_hi @0x150 (64bit feature).
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if sb[56..58] != [0x53, 0xef] {
        return Err(corrupt("no ext4 superblock magic at offset 1080 (not an ext2/3/4 filesystem)".into()));
    }
    let log_block = u32_at(24);
    if log_block > 6 {
        return Err(corrupt(format!("superblock block size field is invalid ({log_block})")));
    }
    let block_size = 1024u64 << log_block;
    let blocks = u64::from(u32_at(4)) | (u64::from(u32_at(0x150)) << 32);
    let fs_bytes = blocks.saturating_mul(block_size);
    if fs_bytes > len {
        return Err(corrupt(format!("the filesystem spans {fs_bytes} bytes but the file has only {len}")));
    }
    Ok(())
}

/// [`verify`] plus a full sha256 comparison with the manifest (reads the whole file).
pub fn verify_full(image: &Image) -> Result<(), ImageError> {
    verify(image)?;
    let actual = sha256_file(&image.rootfs, None)?;
    if actual != image.manifest.sha256 {
        return Err(ImageError::Corrupt {
            path: image.rootfs.clone(),
            reason: format!("sha256 is {actual} but the manifest says {}", image.manifest.sha256),
            hint: image.manifest.kind.rebuild_hint(&image.name),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Agent binary
// ---------------------------------------------------------------------------------------------

/// Finds the static agent binary: `$FORKD_AGENT`, then `forkd-agent` next to the current
/// executable, then `$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/forkd-agent`, then
/// `<workspace>/target/x86_64-unknown-linux-gnu/release/forkd-agent`. Dynamically linked
/// candidates (e.g. a host debug build) are skipped; an explicit `$FORKD_AGENT` must be
/// static.
pub fn locate_agent() -> Result<PathBuf, ImageError> {
    let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
    let mut candidates = Vec::new();
    if let Some(d) = exe_dir {
        candidates.push(d.join("forkd-agent"));
    }
    let triple_path = Path::new("x86_64-unknown-linux-gnu/release/forkd-agent");
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join(triple_path));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target").join(triple_path));
    locate_agent_in(std::env::var_os(AGENT_ENV), &candidates)
}

fn locate_agent_in(explicit: Option<OsString>, candidates: &[PathBuf]) -> Result<PathBuf, ImageError> {
    if let Some(p) = explicit.filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.exists() {
            return Err(ImageError::AgentNotFound {
                searched: vec![p],
                notes: vec![format!("{AGENT_ENV} is set but that file does not exist")],
            });
        }
        check_static_elf(&p)?;
        return Ok(p);
    }
    let mut notes = Vec::new();
    for c in candidates {
        if !c.is_file() {
            continue;
        }
        match check_static_elf(c) {
            Ok(()) => return Ok(clean_path(c)),
            Err(e) => notes.push(format!("skipped {}: {}", c.display(), short_reason(&e))),
        }
    }
    Err(ImageError::AgentNotFound { searched: candidates.to_vec(), notes })
}

fn short_reason(e: &ImageError) -> String {
    match e {
        ImageError::AgentNotStatic { .. } => "dynamically linked".into(),
        ImageError::AgentInvalid { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// Resolves `..` lexically (for nicer messages) when the path can be canonicalized.
fn clean_path(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Checks that `path` is an x86-64 ELF executable without a PT_INTERP program header
/// (static or static-pie), i.e. the kernel can run it with nothing else in the image.
pub fn check_static_elf(path: &Path) -> Result<(), ImageError> {
    let invalid = |reason: String| ImageError::AgentInvalid { path: path.to_path_buf(), reason };
    let mut f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut eh = [0u8; 64];
    let mut got = 0;
    while got < eh.len() {
        match f.read(&mut eh[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        }
    }
    if got < 4 || &eh[..4] != b"\x7fELF" {
        return Err(invalid("not an ELF file".into()));
    }
    if got < eh.len() {
        return Err(invalid("too short to be an ELF executable".into()));
    }
    if eh[4] != 2 || eh[5] != 1 {
        return Err(invalid("not a 64-bit little-endian ELF file".into()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([eh[o], eh[o + 1]]);
    let e_type = u16_at(16);
    if e_type != 2 && e_type != 3 {
        return Err(invalid("not an executable (ELF type is not EXEC or DYN)".into()));
    }
    if u16_at(18) != 62 {
        return Err(invalid("not an x86-64 binary".into()));
    }
    let phoff = u64::from_le_bytes(eh[32..40].try_into().unwrap_or([0; 8]));
    let phentsize = u64::from(u16_at(54));
    let phnum = u64::from(u16_at(56));
    if phentsize < 56 || phnum == 0 || phnum > 4096 {
        return Err(invalid("malformed program header table".into()));
    }
    let mut ph = vec![0u8; (phentsize * phnum) as usize];
    f.seek(SeekFrom::Start(phoff))
        .and_then(|_| f.read_exact(&mut ph))
        .map_err(|_| invalid("program header table lies outside the file".into()))?;
    const PT_INTERP: u32 = 3;
    let has_interp =
        ph.chunks_exact(phentsize as usize).any(|h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]) == PT_INTERP);
    if has_interp {
        return Err(ImageError::AgentNotStatic { path: path.to_path_buf() });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Builds
// ---------------------------------------------------------------------------------------------

/// Builds (or rebuilds) the `tiny` image: busybox-static, the agent and a minimal /etc in a
/// 64 MiB journal-less ext4.
pub fn build_tiny(dirs: &Dirs, agent: &Path, progress: &dyn Progress) -> Result<Image, ImageError> {
    progress.stage("checking tools and the agent binary");
    check_static_elf(agent)?;
    require_tool("mkfs.ext4", "e2fsprogs")?;
    let busybox = ensure_busybox(progress)?;

    let build = Build::start(dirs, "tiny")?;
    let root = &build.staging;
    progress.stage("assembling the root filesystem (busybox, agent, /etc)");
    for (dir, mode) in BASE_DIRS {
        mkdir_mode(&root.join(dir), *mode)?;
    }
    copy_file(&busybox, &root.join("bin/busybox"), 0o755)?;
    let applets = run_capture(Command::new(&busybox).arg("--list-full"), "busybox --list-full")?;
    let mut linked = 0;
    for applet in applets.lines().map(str::trim) {
        // Our agent is init; linuxrc is for initrds.
        if applet.is_empty() || matches!(applet, "bin/busybox" | "linuxrc" | "sbin/init") {
            continue;
        }
        if applet.starts_with('/') || applet.split('/').any(|c| c == "..") {
            continue;
        }
        let link = root.join(applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
        }
        symlink("/bin/busybox", &link)?;
        linked += 1;
    }
    progress.log_line(&format!("linked {linked} busybox applets"));
    let agent_sha = install_agent(root, agent)?;
    write_etc(root)?;
    make_dev_nodes(root);

    progress.stage("creating the ext4 filesystem (64 MiB, no journal)");
    let rootfs = build.dir.join(ROOTFS_FILE);
    mkfs(root, &rootfs, TINY_SIZE, None, false, progress)?;
    build.finish(ImageKind::Tiny, agent_sha, progress)
}

/// Builds (or rebuilds) the `default` image: Debian bookworm minbase + python3 via
/// debootstrap. Needs root and network access to the Debian mirror; takes minutes.
pub fn build_default(dirs: &Dirs, agent: &Path, progress: &dyn Progress) -> Result<Image, ImageError> {
    progress.stage("checking tools and the agent binary");
    check_static_elf(agent)?;
    if !is_root() {
        return Err(ImageError::NeedsRoot { what: "building the default image (debootstrap)" });
    }
    require_tool("mkfs.ext4", "e2fsprogs")?;
    if which("debootstrap").is_none() {
        apt_install("debootstrap", progress)?;
    }
    let mirror = std::env::var(MIRROR_ENV).unwrap_or_else(|_| DEFAULT_MIRROR.to_owned());

    let build = Build::start(dirs, "default")?;
    let root = &build.staging;
    progress.stage(&format!("debootstrap {DEFAULT_SUITE} (minbase + python3) from {mirror}; this takes a few minutes"));
    let debootstrap = require_tool("debootstrap", "debootstrap")?;
    let mut cmd = Command::new(debootstrap);
    cmd.args(["--variant=minbase", "--include=python3", DEFAULT_SUITE]).arg(root).arg(&mirror);
    // debootstrap's "I: ..." lines that start a new phase (first match wins).
    let phases = [
        ("I: Retrieving InRelease", "debootstrap: downloading package lists"),
        ("I: Retrieving Release", "debootstrap: downloading package lists"),
        ("I: Retrieving Packages", "debootstrap: downloading package lists"),
        ("I: Retrieving ", "debootstrap: downloading packages"),
        ("I: Extracting ", "debootstrap: extracting packages"),
        ("I: Installing core packages", "debootstrap: installing core packages"),
        ("I: Unpacking the base system", "debootstrap: unpacking the base system"),
        ("I: Configuring the base system", "debootstrap: configuring the base system"),
    ];
    let current = Mutex::new("");
    run_streaming(&mut cmd, "debootstrap", progress, |line| {
        if let Some((_, stage)) = phases.iter().find(|(p, _)| line.starts_with(p)) {
            let mut cur = current.lock().unwrap_or_else(|e| e.into_inner());
            if *cur != *stage {
                *cur = stage;
                progress.stage(stage);
            }
        }
    })?;
    // debootstrap unmounts what it mounted, but never delete through a leftover mount.
    unmount_under(root);

    progress.stage("installing the agent and trimming caches");
    let agent_sha = install_agent(root, agent)?;
    write_hostname_files(root)?;
    trim_debian(root)?;

    let (used, files) = disk_usage(root).map_err(io_err("measuring the root filesystem"))?;
    let size = image_size_for(used, DEFAULT_FREE_BYTES);
    progress.stage(&format!("creating the ext4 filesystem ({} MiB for {} MiB of files)", size >> 20, used >> 20));
    let rootfs = build.dir.join(ROOTFS_FILE);
    mkfs(root, &rootfs, size, Some(inodes_for(size, files)), true, progress)?;
    build.finish(ImageKind::Default, agent_sha, progress)
}

/// Free space added on top of the content for `default` and imported images.
pub const DEFAULT_FREE_BYTES: u64 = 512 << 20;

/// Options for [`import_tar_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// The static agent binary to install.
    pub agent: PathBuf,
    /// Free space to leave in the filesystem (the file is sparse, so this is cheap).
    pub free_bytes: u64,
}

impl ImportOptions {
    /// Defaults with this agent.
    pub fn new(agent: impl Into<PathBuf>) -> Self {
        Self { agent: agent.into(), free_bytes: DEFAULT_FREE_BYTES }
    }
}

/// Imports a root filesystem tarball (any compression `tar` detects) as image `name`,
/// adding the agent found by [`locate_agent`].
pub fn import_tar(dirs: &Dirs, name: &str, tar: &Path, progress: &dyn Progress) -> Result<Image, ImageError> {
    validate_name(name)?;
    let agent = locate_agent()?;
    import_tar_with(dirs, name, tar, &ImportOptions::new(agent), progress)
}

/// [`import_tar`] with explicit options.
pub fn import_tar_with(
    dirs: &Dirs,
    name: &str,
    tar: &Path,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<Image, ImageError> {
    let agent = opts.agent.as_path();
    validate_name(name)?;
    check_static_elf(agent)?;
    if !tar.is_file() {
        return Err(ImageError::Io {
            context: format!("reading the tarball {}", tar.display()),
            source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
        });
    }
    require_tool("tar", "tar")?;
    require_tool("mkfs.ext4", "e2fsprogs")?;
    let tar = fs::canonicalize(tar).map_err(io_err(format!("resolving {}", tar.display())))?;

    let build = Build::start(dirs, name)?;
    let root = &build.staging;
    progress.stage(&format!("unpacking {}", tar.display()));
    let mut cmd = Command::new(require_tool("tar", "tar")?);
    cmd.args(["-x", "-p", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-f"]).arg(&tar).arg("-C").arg(root);
    run_streaming(&mut cmd, "tar", progress, |_| {})?;

    progress.stage("installing the agent");
    for (dir, mode) in MOUNT_POINTS {
        let p = resolve_in_root(root, dir).map_err(io_err(format!("resolving /{dir} in the image")))?;
        if p.symlink_metadata().is_err() {
            mkdir_mode(&p, *mode)?;
        }
    }
    let agent_sha = install_agent(root, agent)?;
    if resolve_in_root(root, "bin/sh").map(|p| p.exists()).unwrap_or(false) {
        progress.log_line("image has /bin/sh");
    } else {
        progress.log_line("warning: the image has no /bin/sh; only absolute program paths will run");
    }

    let (used, files) = disk_usage(root).map_err(io_err("measuring the root filesystem"))?;
    let size = image_size_for(used, opts.free_bytes);
    progress.stage(&format!("creating the ext4 filesystem ({} MiB for {} MiB of files)", size >> 20, used >> 20));
    let rootfs = build.dir.join(ROOTFS_FILE);
    mkfs(root, &rootfs, size, Some(inodes_for(size, files)), true, progress)?;
    build.finish(ImageKind::Imported, agent_sha, progress)
}

/// Directories of the tiny image and their modes.
const BASE_DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("etc", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("tmp", 0o1777),
    ("run", 0o755),
    ("root", 0o700),
    ("mnt", 0o755),
    ("home", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
];

/// Mount points the agent uses; created in imported images if missing.
const MOUNT_POINTS: &[(&str, u32)] =
    &[("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("tmp", 0o1777), ("run", 0o755), ("root", 0o700)];

/// A build in progress: `<images>/.build-<name>-<pid>-<n>/{root/,rootfs.ext4}`. Deleted on
/// drop unless `finish` moved it into place.
struct Build {
    images: PathBuf,
    name: String,
    dir: PathBuf,
    staging: PathBuf,
    done: bool,
}

impl Build {
    fn start(dirs: &Dirs, name: &str) -> Result<Build, ImageError> {
        let images = dirs.images();
        fs::create_dir_all(&images).map_err(io_err(format!("creating {}", images.display())))?;
        clean_stale(&images);
        let dir = images.join(format!(".build-{name}-{}", unique_suffix()));
        let staging = dir.join("root");
        fs::create_dir(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        mkdir_mode(&staging, 0o755)?;
        Ok(Build { images, name: name.to_owned(), dir, staging, done: false })
    }

    /// Drops the staging tree, writes the manifest, syncs and renames into place.
    fn finish(mut self, kind: ImageKind, agent_sha256: String, progress: &dyn Progress) -> Result<Image, ImageError> {
        unmount_under(&self.staging);
        remove_tree(&self.staging).map_err(io_err(format!("deleting {}", self.staging.display())))?;
        let rootfs = self.dir.join(ROOTFS_FILE);
        progress.stage("computing the image checksum");
        let sha256 = sha256_file(&rootfs, Some(progress))?;
        let size_bytes = fs::metadata(&rootfs).map_err(io_err(format!("inspecting {}", rootfs.display())))?.len();
        let manifest = Manifest {
            name: self.name.clone(),
            kind,
            size_bytes,
            sha256,
            created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            agent_sha256,
        };
        progress.stage("saving the image");
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| ImageError::Io { context: "serializing the manifest".into(), source: io::Error::other(e) })?;
        let mpath = self.dir.join(MANIFEST_FILE);
        let mut f = File::create(&mpath).map_err(io_err(format!("writing {}", mpath.display())))?;
        f.write_all(&json)
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .map_err(io_err(format!("writing {}", mpath.display())))?;
        File::open(&rootfs).and_then(|f| f.sync_all()).map_err(io_err(format!("syncing {}", rootfs.display())))?;
        sync_dir(&self.dir)?;

        let dest = self.images.join(&self.name);
        install_dir(&self.dir, &dest)?;
        self.done = true;
        sync_dir(&self.images)?;
        Ok(Image { name: self.name.clone(), rootfs: dest.join(ROOTFS_FILE), dir: dest, manifest })
    }
}

impl Drop for Build {
    fn drop(&mut self) {
        if !self.done {
            unmount_under(&self.dir);
            if let Err(e) = remove_tree(&self.dir) {
                tracing::warn!("could not clean up {}: {e}", self.dir.display());
            }
        }
    }
}

/// Moves the finished `src` to `dest`, atomically replacing an existing image.
fn install_dir(src: &Path, dest: &Path) -> Result<(), ImageError> {
    match fs::rename(src, dest) {
        Ok(()) => return Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {}
        Err(e) => return Err(io_err(format!("moving the image to {}", dest.display()))(e)),
    }
    // `dest` exists: swap the two atomically, then delete the old one (now at `src`).
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok();
    let (Some(a), Some(b)) = (c(src), c(dest)) else {
        return Err(ImageError::Io {
            context: "image paths contain NUL bytes".into(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        });
    };
    // SAFETY: both paths are valid NUL-terminated strings.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc != 0 {
        // No RENAME_EXCHANGE on this filesystem: move the old one aside first.
        let old = dest.with_file_name(format!(
            ".remove-{}-{}",
            dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            unique_suffix()
        ));
        fs::rename(dest, &old).map_err(io_err(format!("moving the old {} aside", dest.display())))?;
        fs::rename(src, dest).map_err(io_err(format!("moving the image to {}", dest.display())))?;
        let _ = remove_tree(&old);
        return Ok(());
    }
    if let Err(e) = remove_tree(src) {
        tracing::warn!("could not delete the previous image at {}: {e}", src.display());
    }
    Ok(())
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Deletes leftovers of builds and removals whose process is gone.
fn clean_stale(images: &Path) {
    let Ok(rd) = fs::read_dir(images) else { return };
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        let rest = name.strip_prefix(".build-").or_else(|| name.strip_prefix(".remove-"));
        let Some(rest) = rest else { continue };
        // ...-<pid>-<n>
        let mut parts = rest.rsplit('-');
        let _n = parts.next();
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let p = ent.path();
            unmount_under(&p);
            let _ = remove_tree(&p);
        }
    }
}

/// Detaches any mount at or below `dir` (deepest first), e.g. a /proc that a failed
/// debootstrap left in its target.
fn unmount_under(dir: &Path) {
    let Ok(dir) = fs::canonicalize(dir) else {
        return;
    };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn unescape_mountinfo(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    // The kernel writes space, tab, newline and backslash as 3-digit octal escapes.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = b[i + 1..i + 4].iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Deletes a tree without ever crossing into another filesystem (a leftover mount point
/// makes it fail instead of deleting the host's files).
fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return fs::remove_file(path);
    }
    remove_tree_dev(path, meta.dev())?;
    fs::remove_dir(path)
}

fn remove_tree_dev(dir: &Path, dev: u64) -> io::Result<()> {
    for ent in fs::read_dir(dir)? {
        let ent = ent?;
        let p = ent.path();
        let m = fs::symlink_metadata(&p)?;
        if m.is_dir() {
            if m.dev() != dev {
                return Err(io::Error::other(format!("{} is a mount point; unmount it first", p.display())));
            }
            remove_tree_dev(&p, dev)?;
            fs::remove_dir(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io_err(format!("syncing {}", dir.display())))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

fn require_tool(tool: &'static str, package: &'static str) -> Result<PathBuf, ImageError> {
    which(tool).ok_or(ImageError::MissingTool { tool, package })
}

/// The host's static busybox, installing `busybox-static` if needed.
fn ensure_busybox(progress: &dyn Progress) -> Result<PathBuf, ImageError> {
    let p = PathBuf::from("/bin/busybox");
    let usable = |p: &Path| p.is_file() && check_static_elf(p).is_ok();
    if usable(&p) {
        return Ok(p);
    }
    let why = if p.exists() { "/bin/busybox is not statically linked" } else { "/bin/busybox is missing" };
    progress.stage(&format!("{why}: installing busybox-static with apt-get"));
    apt_install("busybox-static", progress)?;
    if usable(&p) {
        Ok(p)
    } else {
        Err(ImageError::AgentInvalid {
            path: p,
            reason: "still not a static busybox after installing busybox-static".into(),
        })
    }
}

/// `apt-get install -y PACKAGE`, running `apt-get update` first if the package is unknown.
fn apt_install(package: &'static str, progress: &dyn Progress) -> Result<(), ImageError> {
    if !is_root() {
        return Err(ImageError::MissingTool { tool: package, package });
    }
    progress.stage(&format!("installing {package} with apt-get"));
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "--no-install-recommends", package]).env("DEBIAN_FRONTEND", "noninteractive");
        run_streaming(&mut cmd, "apt-get install", progress, |_| {})
    };
    if install().is_ok() {
        return Ok(());
    }
    progress.stage("apt-get update");
    let mut update = Command::new("apt-get");
    update.arg("update").env("DEBIAN_FRONTEND", "noninteractive");
    run_streaming(&mut update, "apt-get update", progress, |_| {})?;
    install()
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command and returns its stdout.
fn run_capture(cmd: &mut Command, what: &str) -> Result<String, ImageError> {
    let out = cmd.stdin(Stdio::null()).output().map_err(io_err(format!("running {what}")))?;
    if !out.status.success() {
        return Err(ImageError::ToolFailed {
            command: describe(cmd),
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command, passing every stdout/stderr line to `progress.log_line` and `on_line`;
/// on failure the error carries the last lines.
fn run_streaming(
    cmd: &mut Command,
    what: &str,
    progress: &dyn Progress,
    on_line: impl Fn(&str) + Sync,
) -> Result<(), ImageError> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            ImageError::Io { context: format!("running {what}: the program is not installed"), source: e }
        } else {
            io_err(format!("running {what}"))(e)
        }
    })?;
    const TAIL: usize = 40;
    let tail = Mutex::new(VecDeque::with_capacity(TAIL));
    let pump = |r: &mut dyn Read| {
        for line in BufReader::new(r).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches('\r');
            progress.log_line(line);
            on_line(line);
            let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() == TAIL {
                t.pop_front();
            }
            t.push_back(line.to_owned());
        }
    };
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    std::thread::scope(|s| {
        if let Some(mut e) = stderr {
            s.spawn(move || pump(&mut e));
        }
        if let Some(mut o) = stdout {
            pump(&mut o);
        }
    });
    let status = child.wait().map_err(io_err(format!("waiting for {what}")))?;
    if !status.success() {
        let t = tail.into_inner().unwrap_or_else(|e| e.into_inner());
        return Err(ImageError::ToolFailed {
            command: describe(cmd),
            status: status.to_string(),
            output: Vec::from(t).join("\n"),
        });
    }
    Ok(())
}

fn mkdir_mode(p: &Path, mode: u32) -> Result<(), ImageError> {
    fs::create_dir_all(p).map_err(io_err(format!("creating {}", p.display())))?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("setting the mode of {}", p.display())))
}

fn symlink(target: &str, link: &Path) -> Result<(), ImageError> {
    std::os::unix::fs::symlink(target, link).map_err(io_err(format!("creating the symlink {}", link.display())))
}

/// Copies `src` to `dst` with `mode`, returning the sha256 of the content.
fn copy_file(src: &Path, dst: &Path, mode: u32) -> Result<String, ImageError> {
    if dst.symlink_metadata().is_ok() {
        fs::remove_file(dst).map_err(io_err(format!("replacing {}", dst.display())))?;
    }
    let mut r = File::open(src).map_err(io_err(format!("opening {}", src.display())))?;
    let mut w = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dst)
        .map_err(io_err(format!("creating {}", dst.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(format!("reading {}", src.display()))(e)),
        };
        hasher.update(&buf[..n]);
        w.write_all(&buf[..n]).map_err(io_err(format!("writing {}", dst.display())))?;
    }
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("setting the mode of {}", dst.display())))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Resolves `rel` (relative to the image root) on the host, following symlinks in its
/// parent directories *inside* `root` (an absolute link like `/sbin -> /usr/sbin` must not
/// escape to the host's /usr/sbin). The last component is not followed.
fn resolve_in_root(root: &Path, rel: &str) -> io::Result<PathBuf> {
    let mut todo: Vec<OsString> = Path::new(rel)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .rev()
        .collect();
    let mut cur = PathBuf::new();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            cur.pop();
            continue;
        }
        let cand = cur.join(&part);
        let host = root.join(&cand);
        let is_link = host.symlink_metadata().map(|m| m.file_type().is_symlink()).unwrap_or(false);
        if is_link && !todo.is_empty() {
            links += 1;
            if links > 40 {
                return Err(io::Error::other(format!("too many symlinks resolving /{rel}")));
            }
            let target = fs::read_link(&host)?;
            if target.is_absolute() {
                cur = PathBuf::new();
            }
            for c in target.components().rev() {
                match c {
                    Component::Normal(s) => todo.push(s.to_os_string()),
                    Component::ParentDir => todo.push("..".into()),
                    _ => {}
                }
            }
        } else {
            cur = cand;
        }
    }
    Ok(root.join(cur))
}

/// Copies the agent to /sbin/forkd-agent and points /sbin/init at it if the image has no
/// init. Returns the agent's sha256.
fn install_agent(root: &Path, agent: &Path) -> Result<String, ImageError> {
    let dst = resolve_in_root(root, AGENT_IN_IMAGE).map_err(io_err("resolving /sbin in the image"))?;
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
    }
    let sha = copy_file(agent, &dst, 0o755)?;
    let init = resolve_in_root(root, "sbin/init").map_err(io_err("resolving /sbin/init in the image"))?;
    if init.symlink_metadata().is_err() {
        symlink("forkd-agent", &init)?;
    }
    Ok(sha)
}

fn write_file(path: &Path, content: &str, mode: u32) -> Result<(), ImageError> {
    fs::write(path, content).map_err(io_err(format!("writing {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("setting the mode of {}", path.display())))
}

fn write_hostname_files(root: &Path) -> Result<(), ImageError> {
    let etc = root.join("etc");
    write_file(&etc.join("hostname"), "forkd\n", 0o644)?;
    write_file(
        &etc.join("hosts"),
        "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tforkd\n",
        0o644,
    )?;
    // Replace rather than write through: debootstrap may have left a symlink here.
    let resolv = etc.join("resolv.conf");
    if resolv.symlink_metadata().is_ok() {
        fs::remove_file(&resolv).map_err(io_err(format!("replacing {}", resolv.display())))?;
    }
    write_file(&resolv, "# forkd: no DNS configured for this sandbox yet; the host writes nameservers here.\n", 0o644)
}

fn write_etc(root: &Path) -> Result<(), ImageError> {
    let etc = root.join("etc");
    write_file(
        &etc.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    write_file(&etc.join("group"), "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n", 0o644)?;
    write_file(
        &etc.join("os-release"),
        "NAME=\"forkd tiny\"\nID=forkd-tiny\nPRETTY_NAME=\"forkd tiny (busybox)\"\n",
        0o644,
    )?;
    write_hostname_files(root)
}

/// /dev/console and /dev/null, for the moment between the kernel starting init and the
/// agent mounting devtmpfs over /dev. Needs root; skipped silently otherwise.
fn make_dev_nodes(root: &Path) {
    for (name, major, minor, mode) in [("console", 5, 1, 0o600), ("null", 1, 3, 0o666)] {
        let p = root.join("dev").join(name);
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: valid NUL-terminated path; mknod has no memory-safety preconditions.
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, libc::makedev(major, minor)) };
        if rc == 0 {
            // mknod applies the umask.
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(mode));
        }
    }
}

/// Removes package caches and docs from a debootstrapped tree.
fn trim_debian(root: &Path) -> Result<(), ImageError> {
    let empty_dir = |rel: &str, keep: &[&str]| -> Result<(), ImageError> {
        let d = root.join(rel);
        let Ok(rd) = fs::read_dir(&d) else {
            return Ok(());
        };
        for ent in rd.flatten() {
            let name = ent.file_name();
            if keep.iter().any(|k| name == *k) {
                continue;
            }
            remove_tree(&ent.path()).map_err(io_err(format!("trimming {}", ent.path().display())))?;
        }
        Ok(())
    };
    empty_dir("var/cache/apt/archives", &["partial", "lock"])?;
    empty_dir("var/lib/apt/lists", &["partial", "lock"])?;
    empty_dir("usr/share/doc", &[])?;
    empty_dir("usr/share/man", &[])?;
    empty_dir("usr/share/info", &[])?;
    empty_dir("var/log", &[])?;
    for f in ["var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin"] {
        let _ = fs::remove_file(root.join(f));
    }
    Ok(())
}

/// Bytes the tree occupies in 4 KiB blocks, and its number of inodes.
fn disk_usage(root: &Path) -> io::Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut files = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        bytes += 4096;
        files += 1;
        for ent in fs::read_dir(&d)? {
            let ent = ent?;
            let m = fs::symlink_metadata(ent.path())?;
            if m.is_dir() {
                stack.push(ent.path());
            } else {
                files += 1;
                // Hard links count once per link here: an overestimate, which is fine.
                bytes += m.len().div_ceil(4096) * 4096;
            }
        }
    }
    Ok((bytes, files))
}

/// Content plus 25% plus `free` bytes, rounded up to 16 MiB. Sparse on the host.
fn image_size_for(used: u64, free: u64) -> u64 {
    let want = used + used / 4 + free;
    want.div_ceil(16 << 20) * (16 << 20)
}

/// Enough inodes for the content twice over, and never fewer than mke2fs's default ratio.
fn inodes_for(size: u64, files: u64) -> u64 {
    (size / 16384).max(files * 2 + 16384)
}

/// Runs mkfs.ext4 over `staging` into a sparse `image` of `size` bytes.
fn mkfs(
    staging: &Path,
    image: &Path,
    size: u64,
    inodes: Option<u64>,
    journal: bool,
    progress: &dyn Progress,
) -> Result<(), ImageError> {
    let f = File::create(image).map_err(io_err(format!("creating {}", image.display())))?;
    f.set_len(size).map_err(io_err(format!("sizing {}", image.display())))?;
    drop(f);
    let features = if journal { "^metadata_csum" } else { "^has_journal,^metadata_csum" };
    let mkfs = require_tool("mkfs.ext4", "e2fsprogs")?;
    let mut cmd = Command::new(mkfs);
    cmd.args(["-q", "-F", "-b", "4096", "-m", "0", "-L", "forkd-root", "-O", features])
        .args(["-E", "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0"])
        .arg("-d")
        .arg(staging);
    if let Some(n) = inodes {
        cmd.arg("-N").arg(n.to_string());
    }
    cmd.arg(image).arg(format!("{}k", size / 1024));
    run_streaming(&mut cmd, "mkfs.ext4", progress, |_| {})
}

fn sha256_file(path: &Path, progress: Option<&dyn Progress>) -> Result<String, ImageError> {
    let mut f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        hasher.update(&buf[..n]);
        done += n as u64;
        if let Some(p) = progress {
            p.advance(done, total);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["tiny", "default", "a", "0", "my-img_1.2", &"a".repeat(64)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "Tiny", "-x", ".x", "_x", "a/b", "a b", "..", "ü", &"a".repeat(65)] {
            let e = validate_name(bad).unwrap_err();
            assert!(matches!(e, ImageError::InvalidName { .. }), "{bad:?}");
            assert!(e.to_string().contains("a-z, 0-9"), "{e}");
        }
    }

    #[test]
    fn resolve_in_root_stays_inside() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir_all(root.join("usr/sbin")).unwrap();
        std::os::unix::fs::symlink("/usr/sbin", root.join("sbin")).unwrap();
        std::os::unix::fs::symlink("../../etc", root.join("usr/sbin/up")).unwrap();
        assert_eq!(resolve_in_root(root, "sbin/forkd-agent").unwrap(), root.join("usr/sbin/forkd-agent"));
        // `..` cannot climb above the root.
        assert_eq!(resolve_in_root(root, "sbin/up/../../../x").unwrap(), root.join("x"));
        // The last component is not followed.
        assert_eq!(resolve_in_root(root, "sbin").unwrap(), root.join("sbin"));
    }

    #[test]
    fn sizes() {
        assert_eq!(image_size_for(0, DEFAULT_FREE_BYTES), 512 << 20);
        assert_eq!(image_size_for(400 << 20, DEFAULT_FREE_BYTES), 1024 << 20);
        assert_eq!(image_size_for(1, 0), 16 << 20);
        assert!(inodes_for(1 << 30, 10) >= (1 << 30) / 16384);
        assert_eq!(inodes_for(1 << 30, 100_000), 216_384);
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn locate_agent_rules() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("nope");
        // Explicit but missing.
        let e = locate_agent_in(Some(missing.clone().into()), &[]).unwrap_err();
        assert!(e.to_string().contains("FORKD_AGENT is set"), "{e}");
        // Explicit and dynamic.
        let dynamic = PathBuf::from("/usr/bin/ls");
        let e = locate_agent_in(Some(dynamic.clone().into()), &[]).unwrap_err();
        assert!(matches!(e, ImageError::AgentNotStatic { .. }), "{e}");
        assert!(e.to_string().contains("cargo build --release -p forkd-agent"), "{e}");
        // Not an ELF.
        let text = t.path().join("text");
        fs::write(&text, b"#!/bin/sh\necho hi\n").unwrap();
        let e = locate_agent_in(Some(text.clone().into()), &[]).unwrap_err();
        assert!(e.to_string().contains("not an ELF"), "{e}");
        // Search skips dynamic candidates and reports them.
        let e = locate_agent_in(None, &[missing.clone(), dynamic.clone()]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("skipped /usr/bin/ls: dynamically linked"), "{msg}");
        assert!(msg.contains("FORKD_AGENT"), "{msg}");
        // A static candidate is found.
        let busybox = PathBuf::from("/bin/busybox");
        assert!(
            check_static_elf(&busybox).is_ok(),
            "this test needs the static /bin/busybox (apt-get install busybox-static)"
        );
        let found = locate_agent_in(None, &[missing, dynamic, busybox]).unwrap();
        assert!(found.ends_with("busybox"));
    }
}
