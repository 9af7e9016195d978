//! Human sizes for memory and disk: `256M`, `1G`, `512MiB`, `2g`, or plain MiB (`256`).

use crate::error::{Error, Result};

/// Parses a size into MiB. Units: K/KiB (must be a whole MiB), M/MiB, G/GiB, T/TiB; no unit
/// means MiB.
pub fn parse_mib(field: &str, text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let value: u64 =
        digits.parse().map_err(|_| Error::invalid(field, format!("`{text}` is not a size; use e.g. 256M or 1G")))?;
    let unit = unit.trim().to_ascii_lowercase();
    let kib = match unit.as_str() {
        "" | "m" | "mb" | "mib" => value.checked_mul(1024),
        "k" | "kb" | "kib" => Some(value),
        "g" | "gb" | "gib" => value.checked_mul(1024 * 1024),
        "t" | "tb" | "tib" => value.checked_mul(1024 * 1024 * 1024),
        _ => return Err(Error::invalid(field, format!("unknown unit `{unit}` in `{text}`; use K, M, G or T"))),
    }
    .ok_or_else(|| Error::invalid(field, format!("`{text}` is too large")))?;
    if kib % 1024 != 0 {
        return Err(Error::invalid(field, format!("`{text}` is not a whole number of MiB")));
    }
    Ok(kib / 1024)
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
    }

    #[test]
    fn rejects_garbage_naming_the_field() {
        for bad in ["", "M", "12X", "-5M", "1.5G", "99999999999999999999G", "1000k"] {
            let err = parse_mib("memory", bad).unwrap_err();
            assert!(err.to_string().starts_with("invalid memory"), "{bad}: {err}");
        }
    }
}
