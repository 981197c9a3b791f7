//! Sizes as people write them: `64MiB`, `80GB`, `40G`, `1.5TiB`, `512 GiB`, or bytes.
//! `K`/`M`/`G`/`T` and `KiB`.. are powers of 1024; `KB`.. powers of 1000.

/// Parses a size in bytes (0 allowed).
///
/// # Errors
/// Anything else, naming the accepted forms.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => f64::NAN,
    };
    let bytes = num.parse::<f64>().unwrap_or(f64::NAN) * mult;
    if !(0.0..1.8e19).contains(&bytes) {
        return Err(format!(
            "'{s}' is not a size: use e.g. 64MiB, 80GiB, 24GB, 40G or a number of bytes"
        ));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("80gb"), Ok(80_000_000_000));
        assert_eq!(parse_size("1.5 KiB"), Ok(1536));
        for bad in ["12 parsecs", "MiB", "", "-1", "1e99"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
