//! The one place that reaps children.
//!
//! As PID 1 the agent inherits every orphan in the guest, so something must `waitpid(-1)`;
//! if exec handlers also waited on their own pids the two would race and steal each other's
//! statuses. Instead one thread reaps everything and hands the status of a registered exec
//! child to its handler through a pipe (pollable, so the exec loop waits on it together with
//! the child's output). Statuses of unregistered pids (orphans) are dropped.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

#[derive(Default)]
struct State {
    /// pid → write end of its exit pipe.
    waiting: HashMap<u32, File>,
    /// Bumped on every spawn so the reaper knows new children may exist.
    generation: u64,
}

/// Shared between the reaper thread and exec handlers.
#[derive(Default)]
pub struct Reaper {
    state: Mutex<State>,
    spawned: Condvar,
}

/// Read end of a child's exit pipe: becomes readable when the child has been reaped.
pub struct ExitWatch {
    pub file: File,
}

impl ExitWatch {
    /// Blocks until the child's raw wait status arrives; `None` if it was lost.
    pub fn wait(&mut self) -> Option<i32> {
        let mut b = [0u8; 4];
        match self.file.read_exact(&mut b) {
            Ok(()) => Some(i32::from_ne_bytes(b)),
            Err(_) => None,
        }
    }
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> io::Result<Arc<Reaper>> {
        let r = Arc::new(Reaper::default());
        let r2 = Arc::clone(&r);
        std::thread::Builder::new().stack_size(64 << 10).spawn(move || r2.run())?;
        Ok(r)
    }

    /// Runs `spawn` (which starts a child and returns its pid) and registers the child
    /// before the reaper can see its exit: the lock is held across the spawn, so no status
    /// is ever lost or misdelivered.
    pub fn spawn<T>(&self, spawn: impl FnOnce() -> io::Result<(u32, T)>) -> io::Result<(u32, T, ExitWatch)> {
        let (r, w) = super::spawn::pipe()?;
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (pid, extra) = spawn()?;
        st.waiting.insert(pid, w);
        st.generation += 1;
        drop(st);
        self.spawned.notify_one();
        Ok((pid, extra, ExitWatch { file: r }))
    }

    fn run(&self) {
        loop {
            let generation = self.state.lock().unwrap_or_else(PoisonError::into_inner).generation;
            let mut status = 0i32;
            // SAFETY: plain syscall with a valid out-pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                let w = self.state.lock().unwrap_or_else(PoisonError::into_inner).waiting.remove(&(pid as u32));
                if let Some(mut w) = w {
                    // The handler may be gone already (pipe closed); nothing to do then.
                    let _ = w.write_all(&status.to_ne_bytes());
                }
                continue;
            }
            // Otherwise EINTR: just retry.
            if io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                // No children at all: sleep until the next spawn. Anything spawned after
                // we read `generation` bumped it, so the wait cannot miss it.
                let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                let _st =
                    self.spawned.wait_while(st, |s| s.generation == generation).unwrap_or_else(PoisonError::into_inner);
            }
        }
    }
}
