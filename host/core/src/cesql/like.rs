//! `LIKE` patterns: `%` any run of characters, `_` one character, `\%` and `\_` themselves.
//! Compiled once; the common shapes (`abc`, `abc%`, `%abc`, `%abc%`) become a comparison, a
//! prefix, a suffix or a substring test.

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Piece {
    /// Literal text.
    Text(String),
    /// `%`
    Any,
    /// `_`
    One,
}

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    General(Vec<Piece>),
}

impl Pattern {
    pub(super) fn compile(pattern: &str) -> Pattern {
        let mut pieces: Vec<Piece> = Vec::new();
        let mut chars = pattern.chars().peekable();
        let mut text = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' if matches!(chars.peek(), Some('%' | '_')) => {
                    text.extend(chars.next());
                }
                '%' | '_' => {
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    // Consecutive `%` are one.
                    if c == '_' {
                        pieces.push(Piece::One);
                    } else if pieces.last() != Some(&Piece::Any) {
                        pieces.push(Piece::Any);
                    }
                }
                other => text.push(other),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        match pieces.as_slice() {
            [] => Pattern::Exact(String::new()),
            [Piece::Text(t)] => Pattern::Exact(t.clone()),
            [Piece::Text(t), Piece::Any] => Pattern::Prefix(t.clone()),
            [Piece::Any, Piece::Text(t)] => Pattern::Suffix(t.clone()),
            [Piece::Any, Piece::Text(t), Piece::Any] => Pattern::Contains(t.clone()),
            [Piece::Any] => Pattern::Prefix(String::new()),
            _ => Pattern::General(pieces),
        }
    }

    pub(super) fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Exact(t) => s == t,
            Pattern::Prefix(t) => s.starts_with(t.as_str()),
            Pattern::Suffix(t) => s.ends_with(t.as_str()),
            Pattern::Contains(t) => s.contains(t.as_str()),
            Pattern::General(pieces) => general(pieces, s),
        }
    }
}

/// Matching with backtracking to the last `%` only (linear in practice): each piece after a `%`
/// is placed at the earliest position that lets the rest match greedily.
fn general(pieces: &[Piece], s: &str) -> bool {
    match pieces.first() {
        None => s.is_empty(),
        Some(Piece::Text(t)) => s
            .strip_prefix(t.as_str())
            .is_some_and(|rest| general(&pieces[1..], rest)),
        Some(Piece::One) => {
            let mut it = s.chars();
            it.next().is_some() && general(&pieces[1..], it.as_str())
        }
        Some(Piece::Any) => {
            let rest = &pieces[1..];
            if rest.is_empty() {
                return true;
            }
            // Try every start position for what follows the `%`.
            let mut at = s;
            loop {
                if general(rest, at) {
                    return true;
                }
                let mut it = at.chars();
                if it.next().is_none() {
                    return false;
                }
                at = it.as_str();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_compile_to_fast_tests() {
        assert_eq!(Pattern::compile("dev.%"), Pattern::Prefix("dev.".into()));
        assert_eq!(
            Pattern::compile("%.error"),
            Pattern::Suffix(".error".into())
        );
        assert_eq!(Pattern::compile("%x%"), Pattern::Contains("x".into()));
        assert_eq!(Pattern::compile("a\\%b"), Pattern::Exact("a%b".into()));
        assert!(matches!(Pattern::compile("a_c"), Pattern::General(_)));
    }

    #[test]
    fn general_patterns() {
        let m = |p: &str, s: &str| Pattern::compile(p).matches(s);
        assert!(m("a%b%c", "azzzbzzzc"));
        assert!(!m("a%b%c", "azzzbzzz"));
        assert!(m("_b%", "abcd1"));
        assert!(!m("_b%", "b"));
        assert!(m("é_", "éa"));
        assert!(m("%%a", "ba"));
        assert!(m("ab\\c", "ab\\c"));
    }
}
