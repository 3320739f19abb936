//! Parsing and printing byte sizes and durations the way sysadmins write them (`20G`, `512MiB`,
//! `4096`; `30s`, `7d`).

use anyhow::{bail, Result};

/// Parses a size: a number with an optional binary unit (K, M, G, T, P; `KiB`, `KB` and `k` alike).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        bail!("invalid size '{s}': expected a number such as 4096, 512M or 20G");
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        "p" | "pb" | "pib" => 1 << 50,
        u => bail!("invalid size '{s}': unknown unit '{u}' (use K, M, G, T or P)"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid size '{s}': '{num}' is not a number"))?;
    let bytes = v * mult as f64;
    if !(bytes.is_finite() && (0.0..1.9e19).contains(&bytes)) || bytes.fract() != 0.0 {
        bail!("invalid size '{s}': must be a whole number of bytes");
    }
    Ok(bytes as u64)
}

/// Parses a duration as sysadmins write it: `30s`, `15m`, `1h`, `7d`, `2w` (or plain seconds);
/// returns seconds.
pub fn parse_duration(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid duration '{s}': expected a number with s, m, h, d or w, such as 30s, 15m, 1h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        u => bail!("invalid duration '{s}': unknown unit '{u}' (use s, m, h, d or w)"),
    };
    n.checked_mul(mult)
        .ok_or_else(|| anyhow::anyhow!("invalid duration '{s}': too long"))
}

/// Parses an offset or length: a size, or a hexadecimal number with `0x`.
pub fn parse_number(s: &str) -> Result<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).map_err(|_| anyhow::anyhow!("invalid number '{s}'"));
    }
    parse_size(s)
}

pub use cairn_engine::names::human;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20G").unwrap_or(0), 20 << 30);
        assert_eq!(parse_size("512MiB").unwrap_or(0), 512 << 20);
        assert_eq!(parse_size("4096").unwrap_or(0), 4096);
        assert_eq!(parse_size("1.5k").unwrap_or(0), 1536);
        assert!(parse_size("abc").is_err());
        assert!(parse_size("10X").is_err());
        assert!(parse_size("0.3").is_err());
        assert_eq!(parse_number("0x10").unwrap_or(0), 16);
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(12), "12 B");
    }
}
