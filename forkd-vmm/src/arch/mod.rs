//! Architecture-specific VM setup. Only x86_64 is supported.

mod x86_64;
pub use self::x86_64::*;
