//! The io_uring memory writer: up to `queue_depth` `IORING_OP_WRITE`s in flight, each straight
//! from guest memory to its offset in `memory.bin`.
//!
//! A completion with a short count resubmits the rest; `-EINTR`/`-EAGAIN` resubmit the same
//! write. On the first hard error no new writes start, the ones in flight are reaped (so no
//! buffer is referenced by the kernel after return), and the error is returned.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

use super::{Progress, Run, WriteFailure};

/// Sets up a ring for `queue_depth` writes.
pub(crate) fn new_ring(queue_depth: u32) -> io::Result<IoUring> {
    IoUring::new(queue_depth.clamp(1, 4096).next_power_of_two())
}

/// A write in flight: what remains of it.
#[derive(Clone, Copy)]
struct InFlight {
    offset: u64,
    ptr: *const u8,
    len: usize,
}

/// Writes every run to `fd`.
pub(crate) fn write_runs(
    ring: &mut IoUring,
    fd: RawFd,
    runs: &[Run],
    queue_depth: u32,
    progress: &mut Progress<'_>,
) -> Result<(), WriteFailure> {
    let depth = (queue_depth.max(1) as usize).min(ring.params().sq_entries() as usize).max(1);
    let mut slots: Vec<Option<InFlight>> = vec![None; depth];
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut to_submit: Vec<usize> = Vec::with_capacity(depth);
    let mut completions: Vec<(u64, i32)> = Vec::with_capacity(depth);
    let mut next_run = 0;
    let mut in_flight = 0usize;
    let mut failure: Option<WriteFailure> = None;

    loop {
        if failure.is_none() {
            while next_run < runs.len() {
                let Some(slot) = free.pop() else { break };
                let run = runs[next_run];
                next_run += 1;
                slots[slot] = Some(InFlight { offset: run.file_offset, ptr: run.ptr, len: run.len });
                to_submit.push(slot);
            }
        }
        for slot in to_submit.drain(..) {
            let Some(w) = slots[slot] else { continue };
            // Runs are at most 1 GiB (MAX_WRITE_CAP), so the length fits in u32.
            let entry =
                opcode::Write::new(types::Fd(fd), w.ptr, w.len as u32).offset(w.offset).build().user_data(slot as u64);
            // SAFETY: the buffer is guest memory that stays mapped and unchanged for the whole
            // write_memory call (its contract), and we reap every submitted entry before
            // returning. The queue has room: at most `depth` <= sq_entries entries are queued.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                failure.get_or_insert(WriteFailure {
                    source: io::Error::other("io_uring submission queue full"),
                    offset: w.offset,
                });
                slots[slot] = None;
                free.push(slot);
                continue;
            }
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)) => {}
            Err(e) => {
                // The ring itself is broken: nothing more will complete. Entries already in the
                // kernel keep their pages pinned until they finish, so returning is safe.
                return Err(failure.unwrap_or(WriteFailure { source: e, offset: 0 }));
            }
        }
        completions.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for (user_data, res) in completions.drain(..) {
            let slot = user_data as usize;
            let Some(w) = slots.get_mut(slot).and_then(|s| s.as_mut()) else { continue };
            in_flight -= 1;
            if res < 0 {
                let errno = -res;
                if (errno == libc::EINTR || errno == libc::EAGAIN) && failure.is_none() {
                    to_submit.push(slot);
                    continue;
                }
                failure.get_or_insert(WriteFailure { source: io::Error::from_raw_os_error(errno), offset: w.offset });
            } else if res == 0 {
                failure.get_or_insert(WriteFailure {
                    source: io::Error::new(io::ErrorKind::WriteZero, "write wrote nothing"),
                    offset: w.offset,
                });
            } else {
                let n = (res as usize).min(w.len);
                progress.add(n as u64);
                w.offset += n as u64;
                // SAFETY: n <= len, so the pointer stays inside the run.
                w.ptr = unsafe { w.ptr.add(n) };
                w.len -= n;
                if w.len > 0 && failure.is_none() {
                    to_submit.push(slot);
                    continue;
                }
            }
            slots[slot] = None;
            free.push(slot);
        }
    }
    match failure {
        Some(f) => Err(f),
        None => Ok(()),
    }
}
