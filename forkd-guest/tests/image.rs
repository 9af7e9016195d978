//! Image store tests. Building needs root, mkfs.ext4, debugfs and the static /bin/busybox
//! (busybox-static); these tests fail, loudly, when any of that is missing.
//!
//! The static agent comes from `$FORKD_AGENT`, or is built once by these tests with
//! `RUSTFLAGS=-Ctarget-feature=+crt-static cargo build --release -p forkd-agent --target
//! x86_64-unknown-linux-gnu` into `<target>/agent-static`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use forkd_agent::client::{AgentAddr, ExitStatus};
use forkd_agent::proto::ExecRequest;
use forkd_core::Dirs;
use forkd_guest::image::{self, ImageError, ImageKind};
use forkd_guest::progress::Progress;
use sha2::{Digest, Sha256};

#[derive(Default)]
struct Recorder {
    stages: Mutex<Vec<String>>,
}

impl Progress for Recorder {
    fn stage(&self, message: &str) {
        self.stages.lock().unwrap().push(message.to_owned());
    }
    fn advance(&self, _done: u64, _total: u64) {}
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} || test -x /usr/sbin/{tool} || test -x /sbin/{tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Fails the test with a clear message if the host cannot build images.
fn require_build_prereqs() {
    assert!(root(), "image build tests must run as root (mkfs -d keeps ownership, mknod)");
    for (tool, pkg) in [("mkfs.ext4", "e2fsprogs"), ("debugfs", "e2fsprogs"), ("tar", "tar")] {
        assert!(have(tool), "`{tool}` is missing: apt-get install -y {pkg}");
    }
    assert!(
        image::check_static_elf(Path::new("/bin/busybox")).is_ok(),
        "a static /bin/busybox is required: apt-get install -y busybox-static"
    );
}

/// The static agent binary (see the module docs).
fn static_agent() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("FORKD_AGENT") {
                let p = PathBuf::from(p);
                image::check_static_elf(&p).expect("FORKD_AGENT must be a static binary");
                return p;
            }
            let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target dir").join("agent-static");
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let status = Command::new(env!("CARGO"))
                .args(["build", "--release", "-p", "forkd-agent", "--target", "x86_64-unknown-linux-gnu"])
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .env("CARGO_TARGET_DIR", &target)
                .current_dir(&workspace)
                .status()
                .expect("run cargo to build the static agent");
            assert!(status.success(), "building the static agent failed");
            let p = target.join("x86_64-unknown-linux-gnu/release/forkd-agent");
            image::check_static_elf(&p).expect("the agent build must be static");
            p
        })
        .clone()
}

fn state_dirs(t: &tempfile::TempDir) -> Dirs {
    Dirs { state: t.path().join("state"), cache: t.path().join("cache") }
}

fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(request).arg(image).output().expect("run debugfs");
    assert!(out.status.success(), "debugfs -R {request:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn build_tiny_end_to_end() {
    require_build_prereqs();
    let agent = static_agent();
    let t = tempfile::tempdir().unwrap();
    let dirs = state_dirs(&t);
    let rec = Recorder::default();

    let start = Instant::now();
    let img = image::build_tiny(&dirs, &agent, &rec).expect("build_tiny");
    eprintln!("build_tiny took {:?}", start.elapsed());
    assert!(!rec.stages.lock().unwrap().is_empty());

    // Manifest.
    assert_eq!(img.name, "tiny");
    assert_eq!(img.dir, dirs.images().join("tiny"));
    assert_eq!(img.rootfs, img.dir.join("rootfs.ext4"));
    let m = &img.manifest;
    assert_eq!(m.name, "tiny");
    assert_eq!(m.kind, ImageKind::Tiny);
    assert_eq!(m.size_bytes, image::TINY_SIZE);
    assert_eq!(std::fs::metadata(&img.rootfs).unwrap().len(), image::TINY_SIZE);
    assert_eq!(m.sha256, sha256(&img.rootfs));
    assert_eq!(m.agent_sha256, sha256(&agent));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(m.created_unix <= now && m.created_unix + 600 > now);
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(on_disk["kind"], "tiny");
    assert_eq!(on_disk["size_bytes"], image::TINY_SIZE);
    // Sparse: far less than 64 MiB on disk.
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&img.rootfs).unwrap().blocks() * 512 < 32 << 20);

    // Contents.
    let sbin = debugfs(&img.rootfs, "ls -l /sbin");
    assert!(sbin.contains("forkd-agent"), "{sbin}");
    let stat = debugfs(&img.rootfs, "stat /sbin/forkd-agent");
    assert!(stat.contains("Mode:  0755"), "{stat}");
    let dumped = t.path().join("agent-dump");
    debugfs(&img.rootfs, &format!("dump /sbin/forkd-agent {}", dumped.display()));
    assert_eq!(sha256(&dumped), m.agent_sha256);
    let sh = debugfs(&img.rootfs, "stat /bin/sh");
    assert!(sh.contains("Type: symlink") && sh.contains("\"/bin/busybox\""), "{sh}");
    let init = debugfs(&img.rootfs, "stat /sbin/init");
    assert!(init.contains("\"forkd-agent\""), "{init}");
    let passwd = debugfs(&img.rootfs, "cat /etc/passwd");
    assert!(passwd.starts_with("root:x:0:0:root:/root:/bin/sh"), "{passwd}");
    assert_eq!(debugfs(&img.rootfs, "cat /etc/hostname"), "forkd\n");
    let tmp = debugfs(&img.rootfs, "stat /tmp");
    assert!(tmp.contains("Mode:  01777"), "{tmp}");
    for d in ["/proc", "/sys", "/dev", "/run", "/root", "/mnt"] {
        let s = debugfs(&img.rootfs, &format!("stat {d}"));
        assert!(s.contains("Type: directory"), "{d}: {s}");
    }
    let features = Command::new("dumpe2fs").arg("-h").arg(&img.rootfs).output().unwrap();
    let features = String::from_utf8_lossy(&features.stdout);
    assert!(!features.contains("has_journal"), "tiny must have no journal");
    assert!(features.contains("Block size:               4096"), "{features}");

    // Store operations.
    image::verify(&img).unwrap();
    image::verify_full(&img).unwrap();
    assert_eq!(image::list(&dirs).unwrap(), vec![img.clone()]);
    assert_eq!(image::get(&dirs, "tiny").unwrap(), img);

    // Rebuilding replaces the image and leaves no temporaries behind.
    let again = image::build_tiny(&dirs, &agent, &rec).expect("rebuild");
    image::verify(&again).unwrap();
    let names: Vec<String> = std::fs::read_dir(dirs.images())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["tiny".to_string()]);

    image::remove(&dirs, "tiny").unwrap();
    assert!(matches!(image::get(&dirs, "tiny"), Err(ImageError::NotFound { .. })));
    assert!(std::fs::read_dir(dirs.images()).unwrap().next().is_none());
}

/// Unpacks an image's files into a directory (no loop mount needed).
fn rdump(img: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    debugfs(img, &format!("rdump / {}", dest.display()));
}

/// Boots the tiny image's userland the way the guest kernel would, as far as a host can:
/// the agent is PID 1 of a new PID/mount/UTS/network namespace, chrooted into the image's
/// files, and does its PID 1 setup (mounts, hostname, loopback).
#[test]
fn tiny_image_runs_the_agent_as_pid1() {
    require_build_prereqs();
    assert!(have("unshare"), "`unshare` is missing: apt-get install -y util-linux");
    let agent = static_agent();
    let t = tempfile::tempdir().unwrap();
    let dirs = state_dirs(&t);
    let img = image::build_tiny(&dirs, &agent, &image_progress()).expect("build_tiny");
    let rootdir = t.path().join("rootfs");
    rdump(&img.rootfs, &rootdir);
    let sockdir = t.path().join("sock");
    std::fs::create_dir(&sockdir).unwrap();

    let mut ns = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--uts",
            "--net",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind \"$1\" \"$2/mnt\" && exec chroot \"$2\" /sbin/forkd-agent --listen unix:/mnt/agent.sock",
            "sh",
        ])
        .arg(&sockdir)
        .arg(&rootdir)
        .spawn()
        .expect("spawn unshare");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut ns);

    let addr = AgentAddr::Unix(sockdir.join("agent.sock"));
    let pong = addr.wait_ready(Duration::from_secs(20)).expect("agent as PID 1 answers");
    assert_eq!(pong.pid, 1);
    let run = |script: &str| {
        addr.connect(Duration::from_secs(5))
            .unwrap()
            .exec_capture(ExecRequest::new(["sh", "-c", script]), None)
            .unwrap()
    };

    let out = run("cat /proc/mounts; hostname; cat /sys/class/net/lo/flags; echo $PATH");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.outcome.success(), "{text}");
    for (dev, mnt) in [
        ("proc", "/proc"),
        ("sysfs", "/sys"),
        ("devtmpfs", "/dev"),
        ("devpts", "/dev/pts"),
        ("tmpfs", "/dev/shm"),
        ("tmpfs", "/tmp"),
        ("tmpfs", "/run"),
    ] {
        assert!(text.lines().any(|l| l.starts_with(&format!("{dev} {mnt} "))), "{mnt} not mounted:\n{text}");
    }
    assert!(text.contains("\nforkd\n"), "hostname not set:\n{text}");
    let lo_flags = text
        .lines()
        .find(|l| l.starts_with("0x"))
        .and_then(|l| u32::from_str_radix(l.trim_start_matches("0x"), 16).ok())
        .expect("lo flags");
    assert!(lo_flags & 1 == 1, "lo is not up: {lo_flags:#x}");

    // Orphans are reaped by PID 1: no zombies linger.
    let out = run("for i in 1 2 3 4 5; do (sleep 0.1 &) ; done; echo started");
    assert!(out.outcome.success());
    std::thread::sleep(Duration::from_millis(600));
    let out = run("cat /proc/[0-9]*/stat 2>/dev/null | awk '{print $3}' | grep -c Z || true");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "zombies left");

    // Timeouts, files and /dev work inside the guest userland.
    let start = Instant::now();
    let out = addr
        .connect(Duration::from_secs(5))
        .unwrap()
        .exec_capture(ExecRequest::new(["sleep", "30"]).timeout(Duration::from_millis(200)), None)
        .unwrap();
    assert_eq!(out.outcome.status, ExitStatus::TimedOut);
    assert!(start.elapsed() < Duration::from_secs(5));
    addr.connect(Duration::from_secs(5))
        .unwrap()
        .write_file("/tmp/x/hello.txt", 0o600, true, &b"hi from the host"[..])
        .unwrap();
    let out = run("cat /tmp/x/hello.txt; ls -l /tmp/x/hello.txt; echo > /dev/null && echo devnull-ok");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("hi from the host"), "{text}");
    assert!(text.contains("-rw-------"), "{text}");
    assert!(text.contains("devnull-ok"), "{text}");
}

fn image_progress() -> Recorder {
    Recorder::default()
}

/// A valid small ext4 image registered in the store under `name` by hand.
fn fake_image(dirs: &Dirs, name: &str, kind: &str) -> PathBuf {
    let dir = dirs.images().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let rootfs = dir.join("rootfs.ext4");
    let st = Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096"]).arg(&rootfs).arg("8M").status().unwrap();
    assert!(st.success());
    let manifest = serde_json::json!({
        "name": name, "kind": kind, "size_bytes": 8u64 << 20,
        "sha256": sha256(&rootfs), "created_unix": 1, "agent_sha256": "00",
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    rootfs
}

#[test]
fn corrupt_images_are_detected() {
    assert!(have("mkfs.ext4"), "`mkfs.ext4` is missing: apt-get install -y e2fsprogs");
    let t = tempfile::tempdir().unwrap();
    let dirs = state_dirs(&t);

    let rootfs = fake_image(&dirs, "good", "imported");
    let img = image::get(&dirs, "good").unwrap();
    image::verify(&img).unwrap();
    image::verify_full(&img).unwrap();

    // Flip a byte far from the superblock: only the full check notices.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&rootfs).unwrap();
        f.write_all_at(b"X", 5 << 20).unwrap();
    }
    image::verify(&img).unwrap();
    let e = image::verify_full(&img).unwrap_err();
    assert!(e.to_string().contains("sha256"), "{e}");

    // Truncated.
    let rootfs = fake_image(&dirs, "short", "tiny");
    std::fs::OpenOptions::new().write(true).open(&rootfs).unwrap().set_len(4 << 20).unwrap();
    let e = image::verify(&image::get(&dirs, "short").unwrap()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ImageError::Corrupt { .. }));
    assert!(msg.contains(&rootfs.display().to_string()), "{msg}");
    assert!(msg.contains("truncated"), "{msg}");
    assert!(msg.contains("forkd image build tiny"), "{msg}");

    // Garbage of the right size.
    let rootfs = fake_image(&dirs, "garbage", "default");
    std::fs::write(&rootfs, vec![0xa5u8; 8 << 20]).unwrap();
    let e = image::verify(&image::get(&dirs, "garbage").unwrap()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&rootfs.display().to_string()), "{msg}");
    assert!(msg.contains("ext4 superblock magic"), "{msg}");

    // Manifest agrees with a truncated file that still has a superblock.
    let rootfs = fake_image(&dirs, "lying", "imported");
    std::fs::OpenOptions::new().write(true).open(&rootfs).unwrap().set_len(2 << 20).unwrap();
    let manifest = dirs.images().join("lying/manifest.json");
    let text =
        std::fs::read_to_string(&manifest).unwrap().replace(&(8u64 << 20).to_string(), &(2u64 << 20).to_string());
    std::fs::write(&manifest, text).unwrap();
    let e = image::verify(&image::get(&dirs, "lying").unwrap()).unwrap_err();
    assert!(e.to_string().contains("spans"), "{e}");

    // Missing rootfs.
    let rootfs = fake_image(&dirs, "gone", "tiny");
    std::fs::remove_file(&rootfs).unwrap();
    let e = image::verify(&image::get(&dirs, "gone").unwrap()).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");

    // Unreadable manifest: get reports it, list skips it.
    fake_image(&dirs, "badjson", "tiny");
    std::fs::write(dirs.images().join("badjson/manifest.json"), b"{not json").unwrap();
    let e = image::get(&dirs, "badjson").unwrap_err();
    assert!(matches!(e, ImageError::BadManifest { .. }), "{e}");
    assert!(e.to_string().contains("manifest.json"), "{e}");
    let names: Vec<String> = image::list(&dirs).unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["garbage", "gone", "good", "lying", "short"]);
}

#[test]
fn unknown_names_and_invalid_names() {
    let t = tempfile::tempdir().unwrap();
    let dirs = state_dirs(&t);
    let e = image::get(&dirs, "default").unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ImageError::NotFound { .. }));
    assert!(msg.contains("no images yet"), "{msg}");
    assert!(msg.contains("forkd image build tiny"), "{msg}");
    assert!(image::list(&dirs).unwrap().is_empty());

    assert!(have("mkfs.ext4"), "`mkfs.ext4` is missing: apt-get install -y e2fsprogs");
    fake_image(&dirs, "alpha", "imported");
    fake_image(&dirs, "beta", "imported");
    let msg = image::get(&dirs, "gamma").unwrap_err().to_string();
    assert!(msg.contains("available: alpha, beta"), "{msg}");
    assert!(msg.contains("forkd image build tiny"), "{msg}");

    for bad in ["../etc", "UPPER", "", "a/b", ".hidden"] {
        assert!(matches!(image::get(&dirs, bad), Err(ImageError::InvalidName { .. })), "{bad:?}");
        assert!(matches!(image::remove(&dirs, bad), Err(ImageError::InvalidName { .. })));
    }
    let e = image::import_tar_with(
        &dirs,
        "Bad Name",
        Path::new("/nonexistent.tar"),
        &image::ImportOptions::new("/bin/busybox"),
        &Recorder::default(),
    )
    .unwrap_err();
    assert!(matches!(e, ImageError::InvalidName { .. }), "{e}");
    assert!(matches!(image::remove(&dirs, "gamma"), Err(ImageError::NotFound { .. })));
}

#[test]
fn import_tar_keeps_the_agent_inside_the_image() {
    require_build_prereqs();
    let agent = static_agent();
    let t = tempfile::tempdir().unwrap();
    let dirs = state_dirs(&t);

    // A merged-/usr layout whose /sbin is an *absolute* symlink: following it on the host
    // would write into the host's /usr/sbin.
    let src = t.path().join("src");
    for d in ["usr/bin", "usr/sbin", "etc", "data"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    std::os::unix::fs::symlink("/usr/sbin", src.join("sbin")).unwrap();
    std::os::unix::fs::symlink("usr/bin", src.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", src.join("usr/bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", src.join("usr/bin/sh")).unwrap();
    std::fs::write(src.join("data/hello.txt"), b"imported!\n").unwrap();
    let tarball = t.path().join("rootfs.tar.gz");
    let st = Command::new("tar").arg("-czf").arg(&tarball).arg("-C").arg(&src).arg(".").status().unwrap();
    assert!(st.success());

    let opts = image::ImportOptions { agent: agent.clone(), free_bytes: 16 << 20 };
    let img = image::import_tar_with(&dirs, "my-image", &tarball, &opts, &Recorder::default()).expect("import");
    assert!(img.manifest.size_bytes <= 64 << 20);
    assert_eq!(img.manifest.kind, ImageKind::Imported);
    assert_eq!(img.manifest.name, "my-image");
    image::verify_full(&img).unwrap();
    assert!(!Path::new("/usr/sbin/forkd-agent").exists(), "the agent escaped into the host's /usr/sbin");
    let usr_sbin = debugfs(&img.rootfs, "ls -l /usr/sbin");
    assert!(usr_sbin.contains("forkd-agent"), "{usr_sbin}");
    assert!(usr_sbin.contains("init"), "{usr_sbin}");
    assert_eq!(debugfs(&img.rootfs, "cat /data/hello.txt"), "imported!\n");
    for d in ["/proc", "/sys", "/dev", "/tmp", "/run", "/root"] {
        let s = debugfs(&img.rootfs, &format!("stat {d}"));
        assert!(s.contains("Type: directory"), "{d}: {s}");
    }
    assert_eq!(image::get(&dirs, "my-image").unwrap(), img);

    // A missing tarball is a clear error, and leaves nothing behind.
    let e =
        image::import_tar_with(&dirs, "other", &t.path().join("missing.tar"), &opts, &Recorder::default()).unwrap_err();
    assert!(e.to_string().contains("missing.tar"), "{e}");
    // A corrupt tarball fails with tar's own message.
    let junk = t.path().join("junk.tar");
    std::fs::write(&junk, vec![7u8; 10_000]).unwrap();
    let e = image::import_tar_with(&dirs, "other", &junk, &opts, &Recorder::default()).unwrap_err();
    assert!(matches!(e, ImageError::ToolFailed { .. }), "{e}");
    let names: Vec<String> = std::fs::read_dir(dirs.images())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["my-image".to_string()]);
}

#[test]
#[ignore = "downloads Debian packages with debootstrap and takes minutes; run with --ignored"]
fn build_default_image() {
    require_build_prereqs();
    let agent = static_agent();
    let t = tempfile::tempdir().unwrap();
    let dirs = state_dirs(&t);
    let start = Instant::now();
    let img = image::build_default(&dirs, &agent, &Recorder::default()).expect("build_default");
    eprintln!("build_default took {:?}; image {} MiB", start.elapsed(), img.manifest.size_bytes >> 20);
    image::verify_full(&img).unwrap();
    assert_eq!(img.manifest.kind, ImageKind::Default);
    let bin = debugfs(&img.rootfs, "ls -l /usr/bin");
    assert!(bin.contains("python3"), "python3 missing");
    let sbin = debugfs(&img.rootfs, "ls -l /usr/sbin");
    assert!(sbin.contains("forkd-agent"), "{sbin}");
}
