//! Human sizes: `256M`, `1G`, `512MiB`, `10k`, `2g`. One parser for every size forkd reads
//! (guest memory, limits, I/O rates); units are powers of 1024.

use crate::error::{Error, Result};

/// Parses a size into bytes. Units: B (or none), K/KiB, M/MiB, G/GiB, T/TiB, case-insensitive.
pub fn parse_bytes(field: &str, text: &str) -> Result<u64> {
    parse(field, text, 0)
}

/// Parses a size into MiB. Units as [`parse_bytes`], but a bare number means MiB, and the size
/// must be a whole number of MiB.
pub fn parse_mib(field: &str, text: &str) -> Result<u64> {
    let bytes = parse(field, text, 20)?;
    if bytes % (1 << 20) != 0 {
        return Err(Error::invalid(field, format!("`{text}` is not a whole number of MiB")));
    }
    Ok(bytes >> 20)
}

/// `bare_shift`: what a number without a unit is worth (0: bytes, 20: MiB).
fn parse(field: &str, text: &str, bare_shift: u32) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| Error::invalid(field, format!("`{text}` is not a size; use e.g. 256M, 1G or 10K")))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" => bare_shift,
        "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(Error::invalid(field, format!("unknown unit `{other}` in `{text}`; use K, M, G or T"))),
    };
    value.checked_mul(1u64 << shift).ok_or_else(|| Error::invalid(field, format!("`{text}` is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_mib("memory", "256M").unwrap(), 256);
        assert_eq!(parse_mib("memory", "256").unwrap(), 256);
        assert_eq!(parse_mib("memory", "1G").unwrap(), 1024);
        assert_eq!(parse_mib("memory", "2GiB").unwrap(), 2048);
        assert_eq!(parse_mib("memory", "4096k").unwrap(), 4);
        assert_eq!(parse_bytes("io-bps", "10M").unwrap(), 10 << 20);
        assert_eq!(parse_bytes("io-bps", "10485760").unwrap(), 10 << 20);
        assert_eq!(parse_bytes("io-bps", "64k").unwrap(), 64 << 10);
        assert_eq!(parse_bytes("io-bps", "512B").unwrap(), 512);
    }

    #[test]
    fn rejects_garbage_naming_the_field() {
        for bad in ["", "M", "12X", "-5M", "1.5G", "99999999999999999999G", "1000k", "99999999T"] {
            let err = parse_mib("memory", bad).unwrap_err();
            assert!(err.to_string().starts_with("invalid memory"), "{bad}: {err}");
        }
        for bad in ["", "ten", "5Q", "-1", "99999999999999999999"] {
            assert!(parse_bytes("io-bps", bad).unwrap_err().to_string().starts_with("invalid io-bps"), "{bad}");
        }
    }
}
