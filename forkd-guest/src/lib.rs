//! Guest artifacts: the microVM kernel (built from Debian's `linux-source` with the config and
//! patches kept in the repo's `kernel/` directory) and root filesystem images (`tiny`, `default`,
//! imported tarballs), stored under the host directories of [`forkd_core::Dirs`].

pub mod image;
pub mod kernel;
pub mod progress;
