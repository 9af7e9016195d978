//! `PrepareBranch`: the host is about to fork this VM. Work the kernel would otherwise leave to
//! a timer after the fork is done now, once, instead of in every child.

use std::io;

use forkd_agent::proto::{response, Empty};

use super::Conn;

/// Written by the guest kernel's forkd patch (kernel/patches/0004): drains every slab cache's
/// per-cpu arrays and frees its free slabs at once.
const SLAB_QUIESCE: &str = "/proc/sys/vm/forkd_slab_quiesce";

/// Drains the kernel's caches, answers, then holds the connection until the host closes it:
/// the host forks while it is open, so the fork does not race the guest tearing it down (in
/// the children the vsock transport reset ends it).
pub fn prepare(conn: &mut Conn) -> io::Result<()> {
    finish_kernel_housekeeping();
    conn.send_body(response::Body::BranchReady(Empty {}))?;
    // Anything else on this connection is ignored; the host sends nothing more.
    while let Ok(Some(_)) = conn.recv() {}
    Ok(())
}

/// Writes back what is dirty and returns the objects freed into SLAB's per-cpu arrays to their
/// slabs now. Otherwise the flusher (dirty data, and the atime of every file read since boot,
/// ~30 s after it was dirtied) and `cache_reap` (over ~30 s) would do it in every child, each
/// writing, and so copying, the same guest pages and disk blocks. A kernel without the slab
/// patch has no such file: nothing to drain.
fn finish_kernel_housekeeping() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    match std::fs::write(SLAB_QUIESCE, b"1") {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => super::log_error(&format!("{SLAB_QUIESCE}: {e}")),
    }
}
