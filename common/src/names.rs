//! Names that become one path component: a node's name (its work directory, its log paths), a
//! job's name.

/// True for names safe as one path component: 1 to 63 characters of `[A-Za-z0-9._-]`, not
/// starting with `.` or `-` (no `..`, no hidden files, nothing read as a flag).
pub fn is_safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('.')
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::is_safe_component;

    #[test]
    fn safe_components() {
        for ok in ["node-0", "w1", "a.b_c-d", &"x".repeat(63)] {
            assert!(is_safe_component(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-rf",
            "a/b",
            "a b",
            "é",
            &"x".repeat(64),
        ] {
            assert!(!is_safe_component(bad), "{bad}");
        }
    }
}
