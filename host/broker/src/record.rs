//! An event's bytes in the durable log and in JetStream: TTL, context attributes as JSON, content
//! type, schema, pass-through headers and the data exactly as it came.

use wasmesh_core::{AttributesReader, AttributesWriter, Data, Event};

use crate::passthrough::Passthrough;

/// A record: TTL, the attributes as JSON, content type, schema, the kind of data, the
/// pass-through headers (when the kind has `WITH_HEADERS`), then the data bytes exactly as they
/// came (JSON would re-encode them).
pub(crate) fn encode_record(event: &Event, ttl: i32, headers: &Passthrough) -> Vec<u8> {
    let json;
    let (kind, bytes): (u8, &[u8]) = match event.data() {
        None => (0, &[]),
        Some(Data::Binary(b)) => (1, b),
        Some(Data::String(s)) => (2, s.as_bytes()),
        Some(Data::Json(v)) => {
            json = serde_json::to_vec(v).unwrap_or_default();
            (3, &json)
        }
    };
    let ct = event.datacontenttype().unwrap_or("");
    let schema = event.dataschema().map_or("", |u| u.as_str());
    let mut out = Vec::with_capacity(256 + ct.len() + schema.len() + bytes.len());
    out.extend(ttl.to_le_bytes());
    // The attributes' JSON goes in place, its length written in front once known.
    out.extend(0u32.to_le_bytes());
    let start = out.len();
    if event.specversion() == wasmesh_core::SpecVersion::V10 {
        // Serializing attributes to JSON cannot fail: every value is representable.
        let _ = serde_json::to_writer(&mut out, &AttributesOnly(event));
    } else {
        let mut e = event.clone();
        e.take_data();
        let _ = serde_json::to_writer(&mut out, &e);
    }
    let attrs_len = (out.len() - start) as u32;
    out[start - 4..start].copy_from_slice(&attrs_len.to_le_bytes());
    for part in [ct.as_bytes(), schema.as_bytes()] {
        out.extend((part.len() as u32).to_le_bytes());
        out.extend(part);
    }
    if headers.is_empty() {
        out.push(kind);
    } else {
        out.push(kind | WITH_HEADERS);
        headers.encode(&mut out);
    }
    out.extend(bytes);
    out
}

/// Set in a record's kind of data when pass-through headers follow it (records written before
/// there were any have none).
const WITH_HEADERS: u8 = 0x80;

/// A 1.0 event's context attributes but data, content type and schema (the record keeps those
/// apart), serialized as cloudevents-sdk serializes an event, so that `decode_record` reads them
/// back as an `Event`, without copying the event first.
struct AttributesOnly<'a>(&'a Event);

impl serde::Serialize for AttributesOnly<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let e = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("specversion", "1.0")?;
        map.serialize_entry("id", e.id())?;
        map.serialize_entry("type", e.ty())?;
        map.serialize_entry("source", e.source())?;
        if let Some(subject) = e.subject() {
            map.serialize_entry("subject", subject)?;
        }
        if let Some(time) = e.time() {
            map.serialize_entry("time", time)?;
        }
        for (name, value) in e.iter_extensions() {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

pub(crate) fn decode_record(bytes: &[u8]) -> Result<(Event, i32, Passthrough), String> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let part = bytes.get(at..at + n).ok_or("truncated record")?;
        at += n;
        Ok(part)
    };
    let ttl = i32::from_le_bytes(take(4)?.try_into().map_err(|_| "ttl")?);
    let mut parts = Vec::new();
    for _ in 0..3 {
        let len = u32::from_le_bytes(take(4)?.try_into().map_err(|_| "length")?) as usize;
        parts.push(take(len)?.to_vec());
    }
    let mut kind = take(1)?[0];
    let mut headers = Passthrough::default();
    if kind & WITH_HEADERS != 0 {
        kind &= !WITH_HEADERS;
        let (h, read) = Passthrough::decode(bytes.get(at..).unwrap_or_default())?;
        headers = h;
        at += read;
    }
    let data = bytes[at..].to_vec();
    let mut event: Event = serde_json::from_slice(&parts[0]).map_err(|e| e.to_string())?;
    let ct = String::from_utf8(parts[1].clone()).map_err(|e| e.to_string())?;
    let schema = String::from_utf8(parts[2].clone()).map_err(|e| e.to_string())?;
    let data = match kind {
        0 => None,
        1 => Some(Data::Binary(data)),
        2 => Some(Data::String(
            String::from_utf8(data).map_err(|e| e.to_string())?,
        )),
        _ => Some(Data::Json(
            serde_json::from_slice(&data).map_err(|e| e.to_string())?,
        )),
    };
    if let Some(d) = data {
        event.set_data_unchecked(d);
    }
    if !ct.is_empty() {
        event.set_datacontenttype(Some(ct));
    }
    if !schema.is_empty() {
        event.set_dataschema(url::Url::parse(&schema).ok());
    }
    Ok((event, ttl, headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmesh_core::AttributesReader;

    #[test]
    fn records_keep_data_bytes_exactly() {
        let mut e = wasmesh_core::event::parse_json(
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","ext":"v"}"#,
        )
        .expect("valid");
        e.set_data_unchecked(Data::Binary(b"{\"a\": 1}\n".to_vec()));
        let none = Passthrough::default();
        let (back, ttl, headers) = decode_record(&encode_record(&e, 9, &none)).expect("decodes");
        assert_eq!((ttl, &headers), (9, &none));
        assert_eq!(back.datacontenttype(), None);
        assert_eq!(
            wasmesh_core::event::data_bytes(&back).as_deref(),
            Some(&b"{\"a\": 1}\n"[..])
        );
        e.set_datacontenttype(Some("text/plain; charset=utf-8"));
        let mut request = http::HeaderMap::new();
        request.insert("x-request-id", http::HeaderValue::from_static("r-7"));
        let passed = Passthrough::from_request(&request);
        let (back, _, headers) = decode_record(&encode_record(&e, 1, &passed)).expect("decodes");
        assert_eq!(headers, passed);
        assert_eq!(back.datacontenttype(), Some("text/plain; charset=utf-8"));
        assert_eq!(
            wasmesh_core::event::data_bytes(&back).as_deref(),
            Some(&b"{\"a\": 1}\n"[..]),
            "the data follows the headers"
        );
        assert_eq!(
            back.extension("ext").map(|v| v.to_string()).as_deref(),
            Some("v")
        );
        assert!(
            decode_record(&encode_record(&e, 1, &none)[..10]).is_err(),
            "a cut record is refused"
        );
    }

    /// The attributes are written from the borrowed event exactly as cloudevents-sdk writes a
    /// copy of it whose data was taken (as records were written before), and read back whole.
    #[test]
    fn attributes_are_written_as_the_sdk_writes_them() {
        let full = wasmesh_core::event::parse_json(
            br#"{"specversion":"1.0","id":"a-1","source":"/apis/v1/namespaces/default","type":"dev.knative.apiserver.resource.add","subject":"pods/busybox","time":"2026-11-27T10:11:12.345Z","datacontenttype":"application/json","dataschema":"https://example.com/s.json","knativearrivaltime":"2026-11-27T10:11:12.4Z","count":7,"flag":true,"data":{"kind":"Pod","name":"busybox"}}"#,
        )
        .expect("valid");
        let bare = wasmesh_core::event::parse_json(
            br#"{"specversion":"1.0","id":"2","source":"/s","type":"t"}"#,
        )
        .expect("valid");
        for e in [full, bare] {
            let record = encode_record(&e, 3, &Passthrough::default());
            let len = u32::from_le_bytes(record[4..8].try_into().expect("4 bytes")) as usize;
            let mut copy = e.clone();
            copy.take_data();
            assert_eq!(
                std::str::from_utf8(&record[8..8 + len]).expect("utf-8"),
                serde_json::to_string(&copy).expect("serializes"),
            );
            let (back, ttl, _) = decode_record(&record).expect("decodes");
            assert_eq!((back, ttl), (e, 3));
        }
    }
}
