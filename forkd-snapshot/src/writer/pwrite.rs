//! The plain `pwrite(2)` memory writer: one run at a time, straight from guest memory.
//!
//! Used when io_uring cannot be set up (old kernel, `io_uring_disabled`, a seccomp filter)
//! or when [`crate::WriteOptions::method`] asks for it.

use std::io;
use std::os::fd::RawFd;

use super::{Progress, Run, WriteFailure};

/// Writes every run to `fd`, retrying `EINTR`/`EAGAIN` and short writes.
pub(crate) fn write_runs(fd: RawFd, runs: &[Run], progress: &mut Progress<'_>) -> Result<(), WriteFailure> {
    for run in runs {
        let (mut ptr, mut len, mut offset) = (run.ptr, run.len, run.file_offset);
        while len > 0 {
            let fail = |source| WriteFailure { source, offset };
            let off = libc::off_t::try_from(offset).map_err(|_| fail(io::Error::from_raw_os_error(libc::EFBIG)))?;
            // SAFETY: `ptr..ptr+len` lies in guest memory that stays mapped and unchanged for
            // the whole write_memory call (its contract).
            let n = unsafe { libc::pwrite(fd, ptr.cast(), len, off) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
                    continue;
                }
                return Err(fail(e));
            }
            if n == 0 {
                return Err(fail(io::Error::new(io::ErrorKind::WriteZero, "pwrite wrote nothing")));
            }
            let n = (n as usize).min(len);
            progress.add(n as u64);
            // SAFETY: n <= len, so the pointer stays inside the run.
            ptr = unsafe { ptr.add(n) };
            len -= n;
            offset += n as u64;
        }
    }
    Ok(())
}
