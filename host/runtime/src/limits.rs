//! Per-function limits and isolation, with their defaults.

use std::time::Duration;

/// How much one call of a function may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most linear memory an instance may grow to.
    pub memory_bytes: usize,
    /// Wall time allowed for one call.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            timeout: Duration::from_secs(1),
        }
    }
}

/// Whether instances serve many events or one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Isolation {
    /// An instance serves event after event; a trap or a limit breach discards it.
    #[default]
    Warm,
    /// Every event gets a fresh instance (strict isolation, slower).
    Fresh,
}

/// `16 MiB`, `512 KiB`, `100 B`.
pub fn human_bytes(n: usize) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

/// `100 ms`, `2 s`.
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(16 << 20), "16 MiB");
        assert_eq!(human_bytes(1536), "1536 B");
        assert_eq!(human_duration(Duration::from_millis(100)), "100 ms");
        assert_eq!(human_duration(Duration::from_secs(2)), "2 s");
    }
}
