//! Guest artifacts: the microVM kernel (built from Debian's `linux-source` with the config and
//! patches kept in the repo's `kernel/` directory) and root filesystem images (`tiny`, `default`,
//! imported tarballs), plus the on-host directories that hold them.

pub mod dirs;
pub mod image;
pub mod kernel;
pub mod progress;
