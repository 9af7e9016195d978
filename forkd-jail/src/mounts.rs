//! A minimal mount namespace: a tmpfs root holding only the paths the VMM needs, bind-mounted
//! at their usual absolute paths, plus `/dev/kvm` (BRANCH children open it again) and `/proc`
//! (BRANCH reads its children's start times). Everything else on the host is gone from view.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{last, JailError};

fn cstr(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Io {
        what: format!("path {} contains NUL", path.display()),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

fn mount(src: Option<&Path>, dst: &Path, fstype: Option<&str>, flags: libc::c_ulong) -> Result<(), JailError> {
    let src_c = src.map(cstr).transpose()?;
    let dst_c = cstr(dst)?;
    let fstype_c = fstype.map(|f| CString::new(f).unwrap_or_default());
    // SAFETY: NUL-terminated strings or nulls, as mount(2) accepts; no data argument.
    let rc = unsafe {
        libc::mount(
            src_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            dst_c.as_ptr(),
            fstype_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(last(format!(
            "mount {} on {}",
            src.map(|s| s.display().to_string()).unwrap_or_default(),
            dst.display()
        )));
    }
    Ok(())
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Io { what, source }
}

/// Where the new root is assembled: an existing directory none of `paths` lives under.
fn staging_dir(paths: &[PathBuf]) -> Result<PathBuf, JailError> {
    ["/mnt", "/media", "/srv", "/opt"]
        .iter()
        .map(PathBuf::from)
        .find(|d| d.is_dir() && !paths.iter().any(|p| p.starts_with(d)))
        .ok_or_else(|| JailError::Io {
            what: "no free staging directory (/mnt, /media, /srv, /opt) for the jail root".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
}

/// Enters a new mount namespace whose root holds only `paths`, `/dev/kvm` and `/proc`.
pub(crate) fn enter(paths: &[PathBuf]) -> Result<(), JailError> {
    let mut binds: Vec<PathBuf> = paths.to_vec();
    binds.push(PathBuf::from("/dev/kvm"));
    binds.push(PathBuf::from("/proc"));
    binds.sort();
    binds.dedup();
    let stage = staging_dir(&binds)?;
    // SAFETY: unshare only changes this thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(last("unshare(CLONE_NEWNS)"));
    }
    // Nothing we do here propagates back to the host.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE)?;
    mount(Some(Path::new("tmpfs")), &stage, Some("tmpfs"), libc::MS_NOSUID | libc::MS_NODEV)?;
    for path in &binds {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(format!("inspecting {}", path.display()))(e)),
        };
        let rel = path.strip_prefix("/").unwrap_or(path);
        let target = stage.join(rel);
        if meta.is_dir() {
            std::fs::create_dir_all(&target).map_err(io(format!("creating {}", target.display())))?;
        } else {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
            }
            std::fs::File::create(&target).map_err(io(format!("creating {}", target.display())))?;
        }
        mount(Some(path), &target, None, libc::MS_BIND | libc::MS_REC)?;
    }
    let stage_c = cstr(&stage)?;
    // SAFETY: chdir to a NUL-terminated path.
    if unsafe { libc::chdir(stage_c.as_ptr()) } != 0 {
        return Err(last(format!("chdir {}", stage.display())));
    }
    // pivot_root(".", "."): the old root ends up on top of the new one; detach it.
    // SAFETY: pivot_root with two NUL-terminated paths.
    if unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } != 0 {
        return Err(last("pivot_root"));
    }
    // SAFETY: umount2 with a NUL-terminated path.
    if unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(last("detaching the old root"));
    }
    // SAFETY: chdir to a NUL-terminated path.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(last("chdir /"));
    }
    // The skeleton itself is read-only; the bind mounts keep their own flags.
    mount(None, Path::new("/"), None, libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY)?;
    Ok(())
}
