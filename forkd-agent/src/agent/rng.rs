//! `Reseed`: feed host entropy into the guest kernel RNG and force a CRNG reseed, so
//! sandboxes forked from one snapshot stop sharing random streams.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use forkd_agent::proto::{response, Empty, ErrorKind};

use super::{Conn, Ctx};

/// `_IOW('R', 0x03, int[2])`
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

pub const MIN_ENTROPY: usize = 32;
pub const MAX_ENTROPY: usize = 4096;

pub fn reseed(conn: &mut Conn, entropy: &[u8], clock_unix_ns: u64, ctx: &Ctx) -> io::Result<()> {
    if !(MIN_ENTROPY..=MAX_ENTROPY).contains(&entropy.len()) {
        return conn.send_error(
            ErrorKind::InvalidArgument,
            format!(
                "reseed needs {MIN_ENTROPY}..={MAX_ENTROPY} bytes of entropy, got {}; send 64 bytes from the host's getrandom",
                entropy.len()
            ),
        );
    }
    if clock_unix_ns != 0 {
        if let Err(e) = set_wall_clock(clock_unix_ns) {
            return conn.send_error(ErrorKind::Permission, format!("setting the clock failed: {e}"));
        }
    }
    match add_and_reseed(entropy, ctx.urandom.as_ref()) {
        Ok(()) => {
            ctx.reseeds.fetch_add(1, Ordering::Relaxed);
            conn.send_body(response::Body::ReseedDone(Empty {}))
        }
        Err((step, e)) => {
            let kind = match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => ErrorKind::Permission,
                Some(libc::ENOENT) => ErrorKind::NotFound,
                _ => ErrorKind::Io,
            };
            conn.send_error(kind, format!("{step} failed: {e} (the agent needs CAP_SYS_ADMIN and /dev/urandom)"))
        }
    }
}

fn add_and_reseed(entropy: &[u8], urandom: Option<&File>) -> Result<(), (&'static str, io::Error)> {
    let opened;
    let f = match urandom {
        Some(f) => f,
        None => {
            opened = OpenOptions::new().write(true).open("/dev/urandom").map_err(|e| ("opening /dev/urandom", e))?;
            &opened
        }
    };
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built in a
    // u32 buffer so the ints are aligned.
    let words = entropy.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    info[0] = (entropy.len() * 8) as u32; // entropy credited, in bits
    info[1] = entropy.len() as u32;
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    // SAFETY: `info` is a valid rand_pool_info with buf_size bytes of payload after the header.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(("RNDADDENTROPY", io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(("RNDRESEEDCRNG", io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets `CLOCK_REALTIME` to `unix_ns` (the host's time: a restored guest's clock resumes where
/// its snapshot stopped it).
fn set_wall_clock(unix_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads one timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
