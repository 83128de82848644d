//! Knative's event-display output, byte for byte.
//!
//! Knative's event-display prints `cloudevents.Event.String()` from sdk-go v2. This crate
//! reproduces that text from plain values so that the Wasm event-display plugin and the native
//! baseline of the benchmarks do exactly the same work.

use std::fmt::Write as _;

/// The values event-display prints, borrowed from whatever event type the caller has.
#[derive(Debug, Default, Clone)]
pub struct DisplayEvent<'a> {
    pub specversion: &'a str,
    pub ty: &'a str,
    pub source: &'a str,
    pub subject: Option<&'a str>,
    pub id: &'a str,
    /// Seconds and nanoseconds since the Unix epoch, UTC.
    pub time: Option<(i64, u32)>,
    pub dataschema: Option<&'a str>,
    pub datacontenttype: Option<&'a str>,
    /// Extensions with their values already in string form; any order.
    pub extensions: Vec<(&'a str, String)>,
    pub data: Option<&'a [u8]>,
}

/// Renders the event as Knative's event-display prints it, including the final newline.
pub fn render(event: &DisplayEvent<'_>) -> String {
    let mut out = String::with_capacity(256 + event.data.map_or(0, |d| d.len() * 2));
    render_into(event, &mut out);
    out
}

/// Same as [`render`], appending to `out`. Data that is not text can only be held in a
/// `String` lossily (U+FFFD for bytes that are not UTF-8): [`render_bytes`] keeps them.
pub fn render_into(event: &DisplayEvent<'_>, out: &mut String) {
    if let Some(raw) = render_text(event, out) {
        out.push_str(&String::from_utf8_lossy(raw));
        out.push('\n');
    }
}

/// What Knative's event-display writes, byte for byte: data that is not text is written as it
/// is, as sdk-go does (`b.Write(e.DataEncoded)`).
pub fn render_bytes(event: &DisplayEvent<'_>) -> Vec<u8> {
    let mut text = String::with_capacity(256 + event.data.map_or(0, |d| d.len() * 2));
    let raw = render_text(event, &mut text);
    let mut out = text.into_bytes();
    if let Some(raw) = raw {
        out.extend_from_slice(raw);
        out.push(b'\n');
    }
    out
}

/// Writes all but binary data; returns that data, whose lines, after the `Data (binary),`
/// header already written, are left to the caller.
fn render_text<'a>(event: &DisplayEvent<'a>, out: &mut String) -> Option<&'a [u8]> {
    out.push_str("☁️  cloudevents.Event\nContext Attributes,\n");
    line(out, "specversion", event.specversion);
    line(out, "type", event.ty);
    line(out, "source", event.source);
    if let Some(subject) = event.subject {
        line(out, "subject", subject);
    }
    line(out, "id", event.id);
    if let Some((secs, nanos)) = event.time {
        out.push_str("  time: ");
        push_rfc3339_nano(out, secs, nanos);
        out.push('\n');
    }
    if let Some(schema) = event.dataschema {
        // CloudEvents 0.3 named it `schemaurl`, and sdk-go prints it so.
        let name = if event.specversion == "0.3" {
            "schemaurl"
        } else {
            "dataschema"
        };
        line(out, name, schema);
    }
    if let Some(ct) = event.datacontenttype {
        line(out, "datacontenttype", ct);
    }
    if !event.extensions.is_empty() {
        out.push_str("Extensions,\n");
        let mut exts: Vec<&(&str, String)> = event.extensions.iter().collect();
        exts.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (name, value) in exts {
            line(out, name, value);
        }
    }
    if let Some(data) = event.data {
        match std::str::from_utf8(data) {
            Ok(text) if !is_binary_media_type(event.datacontenttype) => {
                out.push_str("Data,\n  ");
                if is_application_json(event.datacontenttype) {
                    if !indent_json(text, out) {
                        out.push_str(text);
                    }
                } else {
                    out.push_str(text);
                }
            }
            // Bytes that are not text are written as they are, as sdk-go does.
            _ => {
                out.push_str("Data (binary),\n  ");
                return Some(data);
            }
        }
        out.push('\n');
    }
    None
}

fn line(out: &mut String, name: &str, value: &str) {
    out.push_str("  ");
    out.push_str(name);
    out.push_str(": ");
    out.push_str(value);
    out.push('\n');
}

fn media_type(ct: Option<&str>) -> Option<String> {
    ct.map(|ct| {
        ct.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    })
}

/// sdk-go pretty-prints only `application/json` exactly (parameters aside).
fn is_application_json(ct: Option<&str>) -> bool {
    media_type(ct).as_deref() == Some("application/json")
}

fn is_binary_media_type(ct: Option<&str>) -> bool {
    matches!(
        media_type(ct).as_deref(),
        Some("application/octet-stream" | "application/protobuf" | "application/x-protobuf")
    ) || media_type(ct).is_some_and(|m| {
        m.starts_with("image/") || m.starts_with("audio/") || m.starts_with("video/")
    })
}

/// Formats a UTC time as Go's `time.RFC3339Nano` does: trailing zeros of the fraction removed,
/// no fraction at all when it is zero.
pub fn push_rfc3339_nano(out: &mut String, secs: i64, nanos: u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    );
    if nanos > 0 {
        let mut frac = format!("{:09}", nanos.min(999_999_999));
        while frac.ends_with('0') {
            frac.pop();
        }
        out.push('.');
        out.push_str(&frac);
    }
    out.push('Z');
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Go's `json.Indent(dst, src, "  ", "  ")`: only whitespace changes, keys keep their order and
/// numbers their spelling. Returns false (leaving `out` as it was) when `src` is not valid JSON,
/// nests deeper than Go's JSON scanner allows (10,000 levels; Go's event-display then prints the
/// data as it is, and so does the caller), or would come out larger than 4 MiB: indentation
/// grows with the square of the nesting, and a function has 16 MiB by default.
pub fn indent_json(src: &str, out: &mut String) -> bool {
    if serde_json::from_str::<serde::de::IgnoredAny>(src).is_err() {
        return false;
    }
    let start = out.len();
    if indent_within(src, out, start + MAX_INDENTED) {
        return true;
    }
    out.truncate(start);
    false
}

/// Go's `maxNestingDepth` (encoding/json's scanner).
const MAX_JSON_DEPTH: usize = 10_000;

/// The largest indented JSON `indent_json` writes.
const MAX_INDENTED: usize = 4 << 20;

/// Indents valid JSON `src` onto `out`; false as soon as it nests deeper than `MAX_JSON_DEPTH`
/// or `out` grows past `limit` bytes.
fn indent_within(src: &str, out: &mut String, limit: usize) -> bool {
    const PREFIX: &str = "  ";
    const INDENT: &str = "  ";
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(PREFIX);
        for _ in 0..depth {
            out.push_str(INDENT);
        }
        out.len() <= limit
    };
    let mut depth = 0usize;
    let mut open = 0usize;
    let mut need_indent = false;
    let mut chars = src.trim_start().chars();
    while let Some(c) = chars.next() {
        if c.is_ascii_whitespace() {
            continue;
        }
        if need_indent && c != ']' && c != '}' {
            need_indent = false;
            depth += 1;
            if !newline(out, depth) {
                return false;
            }
        }
        match c {
            '"' => {
                out.push('"');
                let mut escaped = false;
                for s in chars.by_ref() {
                    out.push(s);
                    if escaped {
                        escaped = false;
                    } else if s == '\\' {
                        escaped = true;
                    } else if s == '"' {
                        break;
                    }
                }
            }
            '{' | '[' => {
                open += 1;
                if open > MAX_JSON_DEPTH {
                    return false;
                }
                out.push(c);
                need_indent = true;
            }
            ',' => {
                out.push(c);
                if !newline(out, depth) {
                    return false;
                }
            }
            ':' => out.push_str(": "),
            '}' | ']' => {
                open = open.saturating_sub(1);
                if need_indent {
                    // An empty object or array stays on one line.
                    need_indent = false;
                } else {
                    depth = depth.saturating_sub(1);
                    if !newline(out, depth) {
                        return false;
                    }
                }
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_rfc3339_nano_trims_zeros() {
        let mut s = String::new();
        push_rfc3339_nano(&mut s, 1_557_530_826, 695_575_294);
        assert_eq!(s, "2019-05-10T23:27:06.695575294Z");
        s.clear();
        push_rfc3339_nano(&mut s, 0, 500_000_000);
        assert_eq!(s, "1970-01-01T00:00:00.5Z");
        s.clear();
        push_rfc3339_nano(&mut s, 951_782_400, 0);
        assert_eq!(s, "2000-02-29T00:00:00Z");
    }

    #[test]
    fn indent_matches_go() {
        let mut s = String::new();
        assert!(indent_json(
            r#"{"a":[],"b":{},"c":[1, 2.50],"d":"x\"y"}"#,
            &mut s
        ));
        assert_eq!(
            s,
            "{\n    \"a\": [],\n    \"b\": {},\n    \"c\": [\n      1,\n      2.50\n    ],\n    \"d\": \"x\\\"y\"\n  }"
        );
        let mut bad = String::new();
        assert!(!indent_json("{nope", &mut bad));
        assert!(bad.is_empty());
    }

    /// Deep nesting: past Go's 10,000 levels, or past 4 MiB of indentation (which grows with
    /// the square of the depth: 100,000 levels would be 10 GB), the data is left as it is.
    #[test]
    fn indent_refuses_what_go_refuses_or_what_would_not_fit() {
        for depth in [20_000, 3_000] {
            let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let mut out = String::new();
            assert!(!indent_json(&deep, &mut out), "depth {depth}");
            assert!(out.is_empty());
        }
        let mut out = String::new();
        let fine = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        assert!(indent_json(&fine, &mut out));
        assert_eq!(out.lines().count(), 201);
        // What was in `out` before stays, and nothing is added when the JSON is refused.
        let mut out = String::from("Data,\n  ");
        let deep = format!("{}{}", "[".repeat(3_000), "]".repeat(3_000));
        assert!(!indent_json(&deep, &mut out));
        assert_eq!(out, "Data,\n  ");
    }

    #[test]
    fn optional_attributes_omitted_and_extensions_sorted() {
        let ev = DisplayEvent {
            specversion: "1.0",
            ty: "t",
            source: "/s",
            id: "1",
            extensions: vec![("zeta", "1".into()), ("alpha", "true".into())],
            data: Some(b"hello"),
            datacontenttype: Some("text/plain"),
            ..Default::default()
        };
        assert_eq!(
            render(&ev),
            "☁️  cloudevents.Event\nContext Attributes,\n  specversion: 1.0\n  type: t\n  source: /s\n  id: 1\n  datacontenttype: text/plain\nExtensions,\n  alpha: true\n  zeta: 1\nData,\n  hello\n"
        );
    }

    #[test]
    fn the_schema_is_schemaurl_in_0_3() {
        let mut ev = DisplayEvent {
            specversion: "1.0",
            ty: "t",
            source: "/s",
            id: "1",
            dataschema: Some("https://example.com/s"),
            ..Default::default()
        };
        assert!(render(&ev).contains("\n  dataschema: https://example.com/s\n"));
        ev.specversion = "0.3";
        let text = render(&ev);
        assert!(text.contains("\n  specversion: 0.3\n"), "{text}");
        assert!(
            text.contains("\n  schemaurl: https://example.com/s\n"),
            "{text}"
        );
    }
}
