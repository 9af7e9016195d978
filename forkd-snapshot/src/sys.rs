//! Thin safe wrappers over the descriptor-relative (`*at`) system calls the crate uses.
//!
//! The snapshot writer may run in a jailed process that sees no paths at all, only the two
//! directory descriptors it was handed, so everything here works relative to a directory fd.
//! Every wrapper retries `EINTR` and returns `io::Error`; callers add context.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A NUL-terminated copy of `name`.
pub(crate) fn c(name: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(name.as_ref().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

/// Runs a libc call until it does not fail with `EINTR`.
fn retry<T: Copy + PartialOrd + Default>(mut f: impl FnMut() -> T) -> io::Result<T> {
    loop {
        let ret = f();
        if ret >= T::default() {
            return Ok(ret);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)`.
pub(crate) fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and outlives the call; openat retains nothing.
    let fd = retry(|| unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just returned by openat and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a directory below `dir` (no symlink as the last component).
pub(crate) fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)
}

/// Opens a directory by path.
pub(crate) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let p = c(path)?;
    // SAFETY: `p` is NUL-terminated and outlives the call.
    let fd = retry(|| unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by open and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A second, independent open file description of the directory `dir` (flock(2) locks belong
/// to open file descriptions, so a fresh one is needed to contend with other holders).
pub(crate) fn reopen_dir(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    open_dir_at(dir, c".")
}

/// `mkdirat`; an existing directory is fine when `exist_ok`.
pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t, exist_ok: bool) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    match retry(|| unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }) {
        Err(e) if exist_ok && e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r.map(drop),
    }
}

/// `unlinkat(dir, name, flags)`.
pub(crate) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    retry(|| unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `renameat` within one directory.
pub(crate) fn renameat(dir: BorrowedFd<'_>, from: &CStr, to: &CStr) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated and outlive the call.
    retry(|| unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) }).map(drop)
}

/// `renameat2(..., RENAME_NOREPLACE)` within one directory: fails with `EEXIST` instead of
/// replacing `to`. Filesystems without renameat2 support get a check-then-rename (callers
/// hold the root lock, so nobody else creates `to` in between).
pub(crate) fn rename_noreplace(dir: BorrowedFd<'_>, from: &CStr, to: &CStr) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated and outlive the call.
    let r = retry(|| unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            dir.as_raw_fd(),
            from.as_ptr(),
            dir.as_raw_fd(),
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    });
    match r {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
            if fstatat(dir, to)?.is_some() {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            renameat(dir, from, to)
        }
        r => r.map(drop),
    }
}

/// `linkat(AT_FDCWD, from, dir, name, 0)`.
pub(crate) fn link_into(from: &Path, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let from = c(from)?;
    // SAFETY: both names are NUL-terminated and outlive the call.
    retry(|| unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `None` if it does not exist.
pub(crate) fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<libc::stat>> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated; `st` is writable memory of the right type.
    match retry(|| unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
    {
        // SAFETY: fstatat succeeded, so it filled `st`.
        Ok(_) => Ok(Some(unsafe { st.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `fstat(fd)`.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is writable memory of the right type.
    retry(|| unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// Whether a stat describes a directory / a regular file.
pub(crate) fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}
pub(crate) fn is_file(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

/// `fsync(fd)`.
pub(crate) fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    retry(|| unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
}

/// `ftruncate(fd, len)`.
pub(crate) fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on a valid descriptor.
    retry(|| unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: `Ok(false)` if another open file description holds it.
pub(crate) fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: plain syscall on a valid descriptor.
    match retry(|| unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Blocking `flock(fd, LOCK_EX)` or `LOCK_SH`.
pub(crate) fn lock(fd: BorrowedFd<'_>, exclusive: bool) -> io::Result<()> {
    let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    // SAFETY: plain syscall on a valid descriptor.
    retry(|| unsafe { libc::flock(fd.as_raw_fd(), op) }).map(drop)
}

/// Free bytes on the filesystem of `fd`: what root may use when we are root, else what
/// unprivileged users may use.
pub(crate) fn available_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` is writable memory of the right type.
    retry(|| unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // SAFETY: geteuid has no preconditions.
    let blocks = if unsafe { libc::geteuid() } == 0 { st.f_bfree } else { st.f_bavail };
    Ok((blocks as u64).saturating_mul(st.f_frsize))
}

/// `pwrite` of the whole buffer at `offset`, retrying short writes.
pub(crate) fn pwrite_all(fd: RawFd, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
        let n = retry(|| unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), off) })?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwrite wrote nothing"));
        }
        buf = &buf[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

/// `pread` filling the whole buffer at `offset`; reading past the end is an error.
pub(crate) fn pread_exact(fd: RawFd, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = retry(|| unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off) })?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file is shorter than expected"));
        }
        buf = &mut buf[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

/// The data extents of a file (`SEEK_DATA`/`SEEK_HOLE`), as sorted `[start, end)` byte
/// ranges. A filesystem without hole reporting yields one extent over the whole file.
pub(crate) fn data_extents(fd: RawFd, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: plain syscall on a valid descriptor.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break, // no data after pos
                Some(libc::EINVAL) if out.is_empty() => return Ok(vec![(0, size)]),
                _ => return Err(e),
            }
        }
        let data = data as u64;
        // SAFETY: plain syscall on a valid descriptor.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = (hole as u64).min(size);
        if hole <= data {
            break;
        }
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

/// One directory entry: its name and `d_type`.
pub(crate) struct DirEntry {
    pub name: CString,
    pub d_type: u8,
}

impl DirEntry {
    /// The name as UTF-8, if it is.
    pub fn name_str(&self) -> Option<&str> {
        self.name.to_str().ok()
    }
}

/// The entries of directory `dir` (without `.` and `..`).
pub(crate) fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<DirEntry>> {
    // fdopendir takes ownership of its descriptor, so give it a fresh one.
    let fd = reopen_dir(dir)?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: `raw` is an open directory descriptor whose ownership passes to the DIR stream.
    let stream = unsafe { libc::fdopendir(raw) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so we still own `raw`.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut out = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; clearing it distinguishes end-of-stream from errors.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is a valid DIR stream until closedir below.
        let ent = unsafe { libc::readdir64(stream) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error().unwrap_or(0) == 0 { Ok(()) } else { Err(e) };
        }
        // SAFETY: readdir returned a valid entry, valid until the next readdir call; d_name is
        // NUL-terminated. We copy what we need right away.
        let (name, d_type) = unsafe { (CStr::from_ptr((*ent).d_name.as_ptr()).to_owned(), (*ent).d_type) };
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            out.push(DirEntry { name, d_type });
        }
    };
    // SAFETY: `stream` is valid and closed exactly once; this also closes `raw`.
    unsafe { libc::closedir(stream) };
    result.map(|()| out)
}

/// Removes `name` under `parent`, recursively if it is a directory. A missing entry is fine.
pub(crate) fn remove_tree_at(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    match unlinkat(parent, name, 0) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EISDIR) | Some(libc::EPERM)) => {}
        Err(e) => return Err(e),
    }
    let dir = match open_dir_at(parent, name) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    remove_contents(dir_fd(&dir))?;
    match unlinkat(parent, name, libc::AT_REMOVEDIR) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// Removes everything inside the directory `dir`.
pub(crate) fn remove_contents(dir: BorrowedFd<'_>) -> io::Result<()> {
    for entry in read_dir(dir)? {
        remove_tree_at(dir, &entry.name)?;
    }
    Ok(())
}

/// Reads a whole file below `dir`.
pub(crate) fn read_file_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let fd = openat(dir, name, libc::O_RDONLY | libc::O_NOFOLLOW, 0)?;
    let mut out = Vec::new();
    std::fs::File::from(fd).read_to_end(&mut out)?;
    Ok(out)
}

/// fsyncs every directory below `dir` (deepest first), then `dir`.
pub(crate) fn fsync_dirs(dir: BorrowedFd<'_>) -> io::Result<()> {
    for entry in read_dir(dir)? {
        let is_subdir = match entry.d_type {
            libc::DT_DIR => true,
            libc::DT_UNKNOWN => fstatat(dir, &entry.name)?.is_some_and(|st| is_dir(&st)),
            _ => false,
        };
        if is_subdir {
            let sub = open_dir_at(dir, &entry.name)?;
            fsync_dirs(dir_fd(&sub))?;
        }
    }
    fsync(dir)
}

/// Borrows an owned descriptor (a shorthand).
pub(crate) fn dir_fd(fd: &OwnedFd) -> BorrowedFd<'_> {
    std::os::fd::AsFd::as_fd(fd)
}

/// Fills `buf` from getrandom(2), falling back to /dev/urandom.
pub(crate) fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            use std::io::Read;
            return std::fs::File::open("/dev/urandom")?.read_exact(&mut buf[filled..]);
        }
        filled += n as usize;
    }
    Ok(())
}

/// Best-effort path of an open descriptor (via /proc), for messages only.
pub(crate) fn fd_path(fd: BorrowedFd<'_>) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok().filter(|p| p.is_absolute())
}

/// Nanoseconds of a stat timestamp pair.
pub(crate) fn ts_ns(sec: i64, nsec: i64) -> i128 {
    i128::from(sec) * 1_000_000_000 + i128::from(nsec)
}
