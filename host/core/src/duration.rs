//! ISO-8601 durations (`PT0.2S`, `P1DT2H`), as Knative's delivery spec writes them, and the
//! short forms (`100ms`, `2s`, `1m`) wasmesh also accepts for Function limits.

use std::time::Duration;

/// The longest duration accepted: what a Go `time.Duration` holds (about 292 years), as Knative
/// parses these fields and as NATS takes an ack wait or a redelivery delay.
pub const LONGEST: Duration = Duration::from_nanos(i64::MAX as u64);

/// `d` (read from `s`), unless it is longer than [`LONGEST`].
fn at_most_longest(s: &str, d: Duration) -> Result<Duration, String> {
    if d > LONGEST {
        Err(format!(
            "`{s}` is longer than 292 years, the longest duration accepted"
        ))
    } else {
        Ok(d)
    }
}

/// Parses an ISO-8601 duration: `P[nD][T[nH][nM][n[.n]S]]` (weeks `nW` too).
pub fn parse_iso8601(s: &str) -> Result<Duration, String> {
    let err = || format!("`{s}` is not an ISO-8601 duration (e.g. PT0.2S, PT1M, P1D)");
    let rest = s.strip_prefix('P').ok_or_else(err)?;
    if rest.is_empty() || rest == "T" {
        return Err(err());
    }
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) if !t.is_empty() => (d, Some(t)),
        Some(_) => return Err(err()),
        None => (rest, None),
    };
    let mut total = 0f64;
    for (part, units) in [
        (date, &[('W', 604_800.0), ('D', 86_400.0)][..]),
        (
            time.unwrap_or(""),
            &[('H', 3600.0), ('M', 60.0), ('S', 1.0)][..],
        ),
    ] {
        let mut num = String::new();
        let mut next_unit = 0;
        for c in part.chars() {
            if c.is_ascii_digit() || c == '.' {
                num.push(c);
                continue;
            }
            let idx = units[next_unit..]
                .iter()
                .position(|(u, _)| *u == c)
                .ok_or_else(err)?
                + next_unit;
            let n: f64 = num.parse().map_err(|_| err())?;
            total += n * units[idx].1;
            num.clear();
            next_unit = idx + 1;
        }
        if !num.is_empty() {
            return Err(err());
        }
    }
    at_most_longest(s, Duration::try_from_secs_f64(total).map_err(|_| err())?)
}

/// Parses `100ms`, `2s`, `1m`, or an ISO-8601 duration.
pub fn parse_flexible(s: &str) -> Result<Duration, String> {
    if s.starts_with('P') {
        return parse_iso8601(s);
    }
    let err = || format!("`{s}` is not a duration (e.g. 100ms, 2s, 1m or PT0.1S)");
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(err)?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| err())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(err()),
    };
    at_most_longest(s, Duration::try_from_secs_f64(secs).map_err(|_| err())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601() {
        assert_eq!(parse_iso8601("PT0.2S"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_iso8601("PT1M30S"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_iso8601("P1DT1H"), Ok(Duration::from_secs(90_000)));
        for bad in ["", "P", "PT", "0.2S", "PT1S2M", "PTXS", "PT1"] {
            assert!(parse_iso8601(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flexible() {
        assert_eq!(parse_flexible("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_flexible("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_flexible("PT1S"), Ok(Duration::from_secs(1)));
        assert!(parse_flexible("2h").is_err());
    }

    #[test]
    fn nothing_longer_than_a_go_duration() {
        assert_eq!(
            parse_iso8601("P106751D"),
            Ok(Duration::from_secs(106_751 * 86_400))
        );
        for long in ["P106752D", "P200000000000000D", "PT1e300S"] {
            let e = parse_iso8601(long).expect_err(long);
            assert!(e.contains("292 years") || long.contains('e'), "{e}");
        }
        assert!(
            parse_flexible("9300000000s")
                .expect_err("too long")
                .contains("292 years")
        );
    }
}
