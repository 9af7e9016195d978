//! `/proc/sys` reads and writes. Network sysctls resolve against the network namespace of the
//! thread that opens the file, so calling these inside [`crate::netns::run_in`] sets the
//! sandbox namespace's values.

use std::path::Path;

use crate::NetError;

pub fn read(key: &str) -> Result<String, NetError> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| NetError::Io { what: format!("reading {}", path.display()), source })
}

/// Writes `value` to the sysctl at `path` (a path under /proc/sys, slashes kept as they are:
/// interface names may contain dots).
pub fn write_path(path: &str, value: &str) -> Result<(), NetError> {
    let path = Path::new("/proc/sys").join(path);
    std::fs::write(&path, value).map_err(|source| NetError::Io { what: format!("writing {}", path.display()), source })
}

pub fn write(key: &str, value: &str) -> Result<(), NetError> {
    write_path(&key.replace('.', "/"), value)
}
