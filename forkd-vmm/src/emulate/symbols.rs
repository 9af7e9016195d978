//! Kernel symbols from a `System.map`, for naming guest code addresses in errors.

use std::path::Path;

/// Kernel symbols from a `System.map`, for naming guest addresses.
pub struct Symbols {
    sorted: Vec<(u64, String)>,
}

impl Symbols {
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        let mut sorted: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
                let kind = parts.next()?;
                let name = parts.next()?;
                matches!(kind, "T" | "t" | "W" | "w").then(|| (addr, name.to_string()))
            })
            .collect();
        sorted.sort();
        Self { sorted }
    }

    /// `function+0xoffset` for a code address, if it falls inside the kernel text.
    pub fn describe(&self, addr: u64) -> Option<String> {
        let idx = self.sorted.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
        let (base, name) = &self.sorted[idx];
        (addr - base < 0x10_0000).then(|| format!("{name}+{:#x}", addr - base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_name_addresses() {
        let s = Symbols::parse("ffffffff81000000 T _text\nffffffff81000100 t foo\nffffffff81000200 D data\n");
        assert_eq!(s.describe(0xffffffff81000104).as_deref(), Some("foo+0x4"));
        assert_eq!(s.describe(0x1000), None);
    }
}
