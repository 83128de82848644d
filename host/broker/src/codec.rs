//! CloudEvents over HTTP (the HTTP protocol binding): binary, structured and batch content
//! modes, with the binding's percent-encoding of header values.

use std::borrow::Cow;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{HeaderMap, HeaderName, HeaderValue, header::CONTENT_TYPE};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use wasmesh_core::{
    AttributesReader, AttributesWriter, Data, Event, EventBuilder, EventBuilderV10, ExtensionValue,
};

/// Why a request does not carry valid CloudEvents. Each becomes a 400 naming the problem.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("header `{0}` is missing")]
    MissingHeader(&'static str),
    #[error("header `{name}` is not valid: {why}")]
    BadHeader { name: String, why: String },
    #[error("specversion `{0}` is not supported (use 1.0 or 0.3)")]
    SpecVersion(String),
    #[error(transparent)]
    Event(#[from] wasmesh_core::event::EventError),
    #[error("not a valid batch of CloudEvents: {0}")]
    Batch(String),
    #[error("invalid event: {0}")]
    Build(String),
}

/// The content mode a Content-Type selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Binary,
    Structured,
    Batch,
}

/// Mode by Content-Type prefix, as the binding says.
pub fn mode(headers: &HeaderMap) -> Mode {
    let ct = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim_start()
        .to_ascii_lowercase();
    if ct.starts_with("application/cloudevents-batch") {
        Mode::Batch
    } else if ct.starts_with("application/cloudevents") {
        Mode::Structured
    } else {
        Mode::Binary
    }
}

/// Reads the events of one request.
pub fn decode(headers: &HeaderMap, body: Bytes) -> Result<Vec<Event>, DecodeError> {
    match mode(headers) {
        Mode::Structured => Ok(vec![wasmesh_core::event::parse_json(&body)?]),
        Mode::Batch => {
            // Each item is kept as its own JSON text and parsed once, as an event.
            let items: Vec<&serde_json::value::RawValue> =
                serde_json::from_slice(&body).map_err(|e| DecodeError::Batch(e.to_string()))?;
            items
                .into_iter()
                .enumerate()
                .map(|(i, raw)| {
                    wasmesh_core::event::parse_json(raw.get().as_bytes())
                        .map_err(|e| DecodeError::Batch(format!("event {i}: {e}")))
                })
                .collect()
        }
        Mode::Binary => decode_binary(headers, body).map(|e| vec![e]),
    }
}

fn header(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, DecodeError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => decode_value(name, v).map(Some),
    }
}

/// A `ce-` header's value, percent-decoded. The binding asks senders to percent-encode
/// non-ASCII, but SDKs send it as it is: Python's `cloudevents` 1.x as UTF-8, JavaScript's
/// through Node's `http` as ISO-8859-1 (HTTP's old charset for header text). Go's server, so
/// Knative's broker, takes such bytes; here they are read as UTF-8 when they are, else as
/// ISO-8859-1. What percent-encoding holds must be UTF-8.
fn decode_value(name: &str, v: &HeaderValue) -> Result<String, DecodeError> {
    let raw = v.as_bytes();
    let text: Cow<'_, str> = match std::str::from_utf8(raw) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => Cow::Owned(raw.iter().map(|&b| char::from(b)).collect()),
    };
    percent_decode_str(&text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| DecodeError::BadHeader {
            name: name.to_string(),
            why: "percent-encoding does not decode to UTF-8".into(),
        })
}

fn decode_binary(headers: &HeaderMap, body: Bytes) -> Result<Event, DecodeError> {
    let spec =
        header(headers, "ce-specversion")?.ok_or(DecodeError::MissingHeader("ce-specversion"))?;
    // 0.3 events are read as 1.0 ones, then given their version back (the SDK converts).
    let v03 = match spec.as_str() {
        "1.0" => false,
        "0.3" => true,
        _ => return Err(DecodeError::SpecVersion(spec)),
    };
    let schema_header = if v03 { "ce-schemaurl" } else { "ce-dataschema" };
    let id = header(headers, "ce-id")?.ok_or(DecodeError::MissingHeader("ce-id"))?;
    let source = header(headers, "ce-source")?.ok_or(DecodeError::MissingHeader("ce-source"))?;
    let ty = header(headers, "ce-type")?.ok_or(DecodeError::MissingHeader("ce-type"))?;
    let mut b = EventBuilderV10::new().id(id).source(source).ty(ty);
    if let Some(subject) = header(headers, "ce-subject")? {
        b = b.subject(subject);
    }
    if let Some(time) = header(headers, "ce-time")? {
        let t = DateTime::parse_from_rfc3339(&time).map_err(|e| DecodeError::BadHeader {
            name: "ce-time".into(),
            why: format!("`{time}` is not an RFC 3339 timestamp: {e}"),
        })?;
        b = b.time(t.with_timezone(&Utc));
    }
    // Each name once, its first value: a header sent twice counts as Go's `Header.Get` reads
    // it (Knative's receiver), as the context attributes above do.
    for name in headers.keys() {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let Some(value) = headers.get(name) else {
            continue;
        };
        if matches!(
            attr,
            "specversion"
                | "id"
                | "source"
                | "type"
                | "subject"
                | "time"
                | "dataschema"
                | "datacontenttype"
        ) || (v03 && matches!(attr, "schemaurl" | "datacontentencoding"))
        {
            continue;
        }
        let value = decode_value(name.as_str(), value)?;
        b = b.extension(attr, value);
    }
    // Content-Type is an ordinary HTTP header: the binding's percent-encoding is for ce- only.
    let ct = match headers.get(CONTENT_TYPE) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| DecodeError::BadHeader {
                    name: "content-type".into(),
                    why: "not visible ASCII".into(),
                })?
                .to_string(),
        ),
        None => None,
    };
    let schema = match header(headers, schema_header)? {
        Some(s) => Some(url::Url::parse(&s).map_err(|e| DecodeError::BadHeader {
            name: schema_header.into(),
            why: format!("`{s}`: {e}"),
        })?),
        None => None,
    };
    let body = match header(headers, "ce-datacontentencoding")? {
        // 0.3's one encoding: the body is the data in base64.
        Some(enc) if v03 && enc.eq_ignore_ascii_case("base64") => {
            use base64::Engine as _;
            Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(body.trim_ascii())
                    .map_err(|e| DecodeError::BadHeader {
                        name: "ce-datacontentencoding".into(),
                        why: format!("the body is not base64: {e}"),
                    })?,
            )
        }
        Some(enc) if v03 => {
            return Err(DecodeError::BadHeader {
                name: "ce-datacontentencoding".into(),
                why: format!("`{enc}`: only base64 is defined"),
            });
        }
        _ => body,
    };
    let data = Data::Binary(body.to_vec());
    let has_data = !body.is_empty();
    if let Some(ct) = ct.clone() {
        b = match schema.clone() {
            Some(s) => b.data_with_schema(ct, s, data.clone()),
            None => b.data(ct, data.clone()),
        };
    }
    let mut event = b.build().map_err(|e| DecodeError::Build(e.to_string()))?;
    if ct.is_none() {
        // Data without a Content-Type keeps no datacontenttype, as it came.
        if has_data {
            event.set_data_unchecked(data);
        }
        if let Some(s) = schema {
            wasmesh_core::AttributesWriter::set_dataschema(&mut event, Some(s));
        }
    }
    if v03 {
        event = wasmesh_core::EventBuilderV03::from(event)
            .build()
            .map_err(|e| DecodeError::Build(e.to_string()))?;
    }
    wasmesh_core::event::validate(&event)?;
    Ok(event)
}

/// What the binding percent-encodes in header values: space, `"`, `%`, and anything outside
/// U+0021..U+007E (non-ASCII is encoded as its UTF-8 bytes).
const HEADER_VALUE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%').add(0x7f);

/// Percent-encodes one header value as the binding says.
pub fn encode_value(v: &str) -> HeaderValue {
    let encoded = utf8_percent_encode(v, HEADER_VALUE).to_string();
    // Every byte left is visible ASCII, which a HeaderValue always accepts.
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Binary mode: attributes as `ce-` headers, the data as the body.
pub fn encode_binary(event: &Event, headers: &mut HeaderMap) -> Bytes {
    let mut put = |name: &str, value: &str| {
        if let Ok(n) = HeaderName::from_bytes(format!("ce-{name}").as_bytes()) {
            headers.insert(n, encode_value(value));
        }
    };
    put("specversion", event.specversion().as_str());
    put("id", event.id());
    put("source", event.source());
    put("type", event.ty());
    if let Some(s) = event.subject() {
        put("subject", s);
    }
    if let Some(t) = event.time() {
        put(
            "time",
            &t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        );
    }
    if let Some(s) = event.dataschema() {
        let name = match event.specversion() {
            wasmesh_core::SpecVersion::V03 => "schemaurl",
            _ => "dataschema",
        };
        put(name, s.as_str());
    }
    for (name, value) in event.iter_extensions() {
        match value {
            ExtensionValue::String(s) => put(name, s),
            other => put(name, &other.to_string()),
        }
    }
    if let Some(ct) = event.datacontenttype()
        && let Ok(v) = HeaderValue::from_str(ct)
    {
        headers.insert(CONTENT_TYPE, v);
    }
    match event.data() {
        Some(Data::Binary(b)) => Bytes::copy_from_slice(b),
        Some(Data::String(s)) => Bytes::copy_from_slice(s.as_bytes()),
        Some(Data::Json(v)) => Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
        None => Bytes::new(),
    }
}

/// Structured mode: the event in the JSON format. Data that came as bytes of a JSON content
/// type goes in `data` as it is (the format's rule for JSON data), not base64-encoded.
pub fn encode_structured(event: &Event) -> Bytes {
    if let Some(Data::Binary(bytes)) = event.data()
        && event
            .datacontenttype()
            .is_some_and(wasmesh_core::event::is_json_media_type)
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        let mut attributes = event.clone();
        let (ct, schema, _) = attributes.take_data();
        attributes.set_datacontenttype(ct);
        attributes.set_dataschema(schema);
        let mut out = serde_json::to_vec(&attributes).unwrap_or_default();
        if out.pop() == Some(b'}') {
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(bytes);
            out.push(b'}');
            return Bytes::from(out);
        }
    }
    Bytes::from(serde_json::to_vec(event).unwrap_or_default())
}

/// True when a response's headers say it carries a CloudEvent (for replies).
pub fn carries_event(headers: &HeaderMap) -> bool {
    headers.contains_key("ce-specversion") || mode(headers) != Mode::Binary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_mode_puts_json_bytes_inline_and_keeps_them() {
        let event = |ct: &str, data: &[u8]| {
            let mut h = HeaderMap::new();
            for (k, v) in [
                ("ce-specversion", "1.0"),
                ("ce-id", "1"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
            ] {
                h.insert(k, HeaderValue::from_static(v));
            }
            h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).expect("ct"));
            decode(&h, Bytes::copy_from_slice(data))
                .expect("valid")
                .remove(0)
        };
        let json = encode_structured(&event("application/json", b"{ \"n\": 1.50 }"));
        let text = std::str::from_utf8(&json).expect("utf-8");
        assert!(text.ends_with(",\"data\":{ \"n\": 1.50 }}"), "{text}");
        let v: serde_json::Value = serde_json::from_slice(&json).expect("valid JSON");
        assert_eq!(v["datacontenttype"], "application/json");
        let plain = encode_structured(&event("text/plain", b"hi"));
        let v: serde_json::Value = serde_json::from_slice(&plain).expect("valid JSON");
        assert!(v.get("data_base64").is_some() || v["data"] == "hi", "{v}");
        let broken = encode_structured(&event("application/json", b"{not json"));
        let v: serde_json::Value = serde_json::from_slice(&broken).expect("valid JSON");
        assert!(
            v.get("data_base64").is_some(),
            "bytes that are not JSON stay base64: {v}"
        );
    }

    #[test]
    fn percent_encoding_round_trips() {
        let tricky = "Euro € 😀 \"quoted\" 100% done";
        let encoded = encode_value(tricky);
        assert_eq!(
            encoded.to_str().expect("ascii"),
            "Euro%20%E2%82%AC%20%F0%9F%98%80%20%22quoted%22%20100%25%20done"
        );
        assert_eq!(decode_value("x", &encoded).expect("decodes"), tricky);
        // Lower-case hex is accepted; invalid UTF-8 is refused.
        assert_eq!(
            decode_value("x", &HeaderValue::from_static("%e2%82%ac")).expect("ok"),
            "€"
        );
        assert!(decode_value("x", &HeaderValue::from_static("%ff%fe")).is_err());
        // Text sent as it is (not percent-encoded): UTF-8 when it is, else ISO-8859-1.
        let raw = HeaderValue::from_bytes("caf\u{e9} 100%25".as_bytes()).expect("obs-text");
        assert_eq!(
            decode_value("x", &raw).expect("raw UTF-8"),
            "caf\u{e9} 100%"
        );
        let latin1 = HeaderValue::from_bytes(b"caf\xe9 \xfc%20").expect("obs-text");
        assert_eq!(
            decode_value("x", &latin1).expect("latin-1"),
            "caf\u{e9} \u{fc} "
        );
        let err = decode_value(
            "ce-subject",
            &HeaderValue::from_bytes(b"\xe9%ff").expect("obs"),
        )
        .expect_err("not UTF-8");
        assert!(err.to_string().contains("ce-subject"), "{err}");
    }

    #[test]
    fn binary_mode_round_trips() {
        let mut h = HeaderMap::new();
        h.insert("ce-specversion", HeaderValue::from_static("1.0"));
        h.insert("ce-id", HeaderValue::from_static("1"));
        h.insert("ce-source", HeaderValue::from_static("/s"));
        h.insert("ce-type", HeaderValue::from_static("t"));
        h.insert("ce-myext", HeaderValue::from_static("a%20b"));
        // Sent twice: the first counts, as sdk-go reads `v[0]`.
        h.append("ce-myext", HeaderValue::from_static("second"));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let ev = decode(&h, Bytes::from_static(b"{\"x\":1}"))
            .expect("valid")
            .remove(0);
        assert_eq!(
            ev.extension("myext"),
            Some(&ExtensionValue::String("a b".into()))
        );
        let mut out = HeaderMap::new();
        let body = encode_binary(&ev, &mut out);
        assert_eq!(body.as_ref(), b"{\"x\":1}");
        assert_eq!(out["ce-myext"], "a%20b");
        assert_eq!(out[CONTENT_TYPE], "application/json");
        let mut missing = h.clone();
        missing.remove("ce-id");
        assert_eq!(
            decode(&missing, Bytes::new())
                .expect_err("no id")
                .to_string(),
            "header `ce-id` is missing"
        );
    }

    /// CloudEvents 0.3, as older SDKs still send it: read in binary mode as in structured mode,
    /// kept at 0.3 (`schemaurl`, not `dataschema`), its base64 `datacontentencoding` decoded.
    #[test]
    fn binary_mode_reads_and_writes_specversion_0_3() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "0.3"),
            ("ce-id", "1"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
            ("ce-schemaurl", "https://example.com/schema"),
            ("ce-myext", "x"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let ev = decode(&h, Bytes::from_static(b"hi"))
            .expect("valid")
            .remove(0);
        assert_eq!(ev.specversion(), wasmesh_core::SpecVersion::V03);
        assert_eq!(
            ev.dataschema().map(|u| u.as_str()),
            Some("https://example.com/schema")
        );
        assert_eq!(ev.extension("schemaurl"), None);
        let mut out = HeaderMap::new();
        let body = encode_binary(&ev, &mut out);
        assert_eq!(body.as_ref(), b"hi");
        assert_eq!(out["ce-specversion"], "0.3");
        assert_eq!(out["ce-schemaurl"], "https://example.com/schema");
        assert!(!out.contains_key("ce-dataschema"));
        assert_eq!(out["ce-myext"], "x");

        h.insert("ce-datacontentencoding", HeaderValue::from_static("base64"));
        let ev = decode(&h, Bytes::from_static(b"aGk="))
            .expect("valid")
            .remove(0);
        assert_eq!(
            wasmesh_core::event::data_bytes(&ev).as_deref(),
            Some(&b"hi"[..])
        );
        let e = decode(&h, Bytes::from_static(b"!!"))
            .expect_err("not base64")
            .to_string();
        assert!(e.contains("not base64"), "{e}");
        h.insert("ce-specversion", HeaderValue::from_static("0.2"));
        let e = decode(&h, Bytes::new()).expect_err("0.2").to_string();
        assert!(e.contains("`0.2` is not supported"), "{e}");
    }
}
