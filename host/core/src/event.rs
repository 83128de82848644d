//! Parsing, validating and reading CloudEvents.

use std::borrow::Cow;

use cloudevents::{AttributesReader, Data, Event};

/// Why bytes are not a valid CloudEvent.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The JSON (structured mode) could not be read as an event: which member and why.
    #[error("not a valid structured CloudEvent: {0}")]
    Json(String),
    /// A required attribute is empty.
    #[error("attribute `{0}` must not be empty")]
    EmptyAttribute(&'static str),
    /// An extension name breaks the CloudEvents naming rules: the name and why.
    #[error("extension name `{0}` {1}")]
    ExtensionName(String, &'static str),
}

/// Reads one event in the JSON format (structured mode) and checks it.
pub fn parse_json(bytes: &[u8]) -> Result<Event, EventError> {
    let event: Event = match serde_json::from_slice(bytes) {
        Ok(event) => event,
        Err(e) => base64_v03(bytes)
            .ok_or_else(|| EventError::Json(explain(bytes).unwrap_or_else(|| e.to_string())))?,
    };
    if event.specversion() == cloudevents::event::SpecVersion::V03
        && event.extension("data_base64").is_some()
    {
        // Python's SDK writes 0.3 events so; sdk-go would keep the text as an extension.
        return Err(EventError::Json(
            "`data_base64` is CloudEvents 1.0's; a 0.3 event carries base64 data in `data`, \
             with `datacontentencoding: base64`"
                .into(),
        ));
    }
    validate(&event)?;
    Ok(event)
}

/// A 0.3 event whose `data` is base64 (`datacontentencoding`) with a JSON content type, or none
/// (which means JSON): cloudevents-sdk refuses it unless the decoded bytes are JSON, where
/// sdk-go, so Knative's broker, keeps whatever bytes they are (1.0's `data_base64` is kept so by
/// both). Read the rest of the event, then give it the bytes. `None` when that is not the case.
fn base64_v03(bytes: &[u8]) -> Option<Event> {
    use base64::Engine as _;
    use serde_json::Value;
    let Ok(Value::Object(mut members)) = serde_json::from_slice::<Value>(bytes) else {
        return None;
    };
    let encoding = members.get("datacontentencoding")?.as_str()?;
    if members.get("specversion")?.as_str()? != "0.3" || !encoding.eq_ignore_ascii_case("base64") {
        return None;
    }
    let Value::String(data) = members.remove("data")? else {
        return None;
    };
    members.remove("datacontentencoding");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(data)
        .ok()?;
    let mut event: Event = serde_json::from_value(Value::Object(members)).ok()?;
    event.set_data_unchecked(Data::Binary(decoded));
    Some(event)
}

/// Says which member of a JSON event the SDK refused and why, where its own message names
/// neither (`invalid type: integer `5`, expected a string`). `None` when the text is not a JSON
/// object, or when nothing here explains the refusal.
fn explain(bytes: &[u8]) -> Option<String> {
    use serde_json::Value;
    let Ok(Value::Object(members)) = serde_json::from_slice::<Value>(bytes) else {
        return None;
    };
    let version = members.get("specversion").and_then(Value::as_str);
    for required in ["specversion", "id", "source", "type"] {
        match members.get(required) {
            None => return Some(format!("attribute `{required}` is missing")),
            Some(Value::String(_)) => {}
            Some(other) => {
                return Some(format!(
                    "attribute `{required}` must be a string, not {}",
                    json_kind(other)
                ));
            }
        }
    }
    if !matches!(version, Some("1.0" | "0.3")) {
        return Some(format!(
            "specversion `{}` is not supported (use 1.0 or 0.3)",
            version.unwrap_or_default()
        ));
    }
    if members.contains_key("data") && members.contains_key("data_base64") {
        return Some("`data` and `data_base64` are exclusive: give one".into());
    }
    for (name, value) in &members {
        let why = match (name.as_str(), value) {
            (_, Value::Null) | ("data", _) => continue,
            ("specversion" | "id" | "source" | "type", _) => continue,
            ("time", Value::String(t)) => match chrono::DateTime::parse_from_rfc3339(t) {
                Ok(_) => continue,
                Err(e) => format!("`{t}` is not an RFC 3339 timestamp: {e}"),
            },
            ("dataschema" | "schemaurl", Value::String(u)) => match url::Url::parse(u) {
                Ok(_) => continue,
                Err(e) => format!("`{u}` is not an absolute URI: {e}"),
            },
            ("data_base64", Value::String(b)) => {
                use base64::Engine as _;
                match base64::engine::general_purpose::STANDARD.decode(b) {
                    Ok(_) => continue,
                    Err(e) => format!("not base64: {e}"),
                }
            }
            ("subject" | "datacontenttype", Value::String(_)) => continue,
            (
                "subject" | "time" | "datacontenttype" | "dataschema" | "schemaurl" | "data_base64",
                other,
            ) => format!("must be a string, not {}", json_kind(other)),
            (_, Value::String(_) | Value::Bool(_)) => continue,
            (_, Value::Number(n)) if n.is_i64() => continue,
            (_, other) => format!(
                "an extension is a string, an integer or a boolean, not {}",
                json_kind(other)
            ),
        };
        return Some(format!("attribute `{name}`: {why}"));
    }
    None
}

fn json_kind(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Checks what cloudevents-sdk does not: non-empty required attributes and extension names.
pub fn validate(event: &Event) -> Result<(), EventError> {
    if event.id().is_empty() {
        return Err(EventError::EmptyAttribute("id"));
    }
    if event.source().is_empty() {
        return Err(EventError::EmptyAttribute("source"));
    }
    if event.ty().is_empty() {
        return Err(EventError::EmptyAttribute("type"));
    }
    for (name, _) in event.iter_extensions() {
        if let Some(why) = extension_name_problem(name) {
            return Err(EventError::ExtensionName(name.to_string(), why));
        }
    }
    Ok(())
}

/// True for `application/json` and any `+json` media type, parameters aside.
pub fn is_json_media_type(ct: &str) -> bool {
    let media = ct.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/json")
        || media.to_ascii_lowercase().ends_with("+json")
        || media.eq_ignore_ascii_case("text/json")
}

/// CloudEvents attribute names: lower-case ASCII letters and digits, not empty; and not `data`,
/// which the JSON format holds the data in (`data_base64` is refused by the first rule), so that
/// an event read in binary mode can be written in structured mode.
pub fn is_valid_extension_name(name: &str) -> bool {
    extension_name_problem(name).is_none()
}

/// What is wrong with an extension name, said after it (`extension name `x` ...`).
pub fn extension_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Some("is invalid: use lower-case letters a-z and digits 0-9 only");
    }
    if name == "data" {
        return Some("is reserved: the JSON format keeps the event's data under it");
    }
    None
}

/// The event's data as bytes, as it would travel in binary mode.
pub fn data_bytes(event: &Event) -> Option<Cow<'_, [u8]>> {
    match event.data()? {
        Data::Binary(b) => Some(Cow::Borrowed(b.as_slice())),
        Data::String(s) => Some(Cow::Borrowed(s.as_bytes())),
        Data::Json(v) => Some(Cow::Owned(serde_json::to_vec(v).unwrap_or_default())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_base64_data_of_0_3_whatever_the_bytes() {
        // No datacontenttype (JSON by default) and bytes that are not JSON: kept as they are.
        let text = br#"{"specversion":"0.3","id":"a","source":"/s","type":"t",
            "datacontentencoding":"base64","data":"aGVsbG8="}"#;
        let e = parse_json(text).expect("accepted, as sdk-go does");
        assert_eq!(e.specversion(), cloudevents::event::SpecVersion::V03);
        assert_eq!(e.datacontenttype(), None);
        assert_eq!(e.data(), Some(&Data::Binary(b"hello".to_vec())));
        // The same with a JSON content type and an extension.
        let text = br#"{"specversion":"0.3","id":"a","source":"/s","type":"t","ext":"x",
            "datacontenttype":"application/json","datacontentencoding":"Base64","data":"AAH/"}"#;
        let e = parse_json(text).expect("accepted");
        assert_eq!(e.data(), Some(&Data::Binary(vec![0, 1, 255])));
        assert_eq!(e.datacontenttype(), Some("application/json"));
        assert!(e.extension("ext").is_some());
        // Bytes that are JSON stay JSON data, as before.
        let text = br#"{"specversion":"0.3","id":"a","source":"/s","type":"t",
            "datacontentencoding":"base64","data":"eyJhIjoxfQ=="}"#;
        let e = parse_json(text).expect("accepted");
        assert_eq!(e.data(), Some(&Data::Json(serde_json::json!({"a": 1}))));
        // 1.0's member in a 0.3 event is named as such.
        let text =
            br#"{"specversion":"0.3","id":"a","source":"/s","type":"t","data_base64":"AA=="}"#;
        let err = parse_json(text).expect_err("refused").to_string();
        assert!(err.contains("datacontentencoding"), "{err}");
        // What is wrong still is: not base64, or another attribute broken.
        for bad in [
            &br#"{"specversion":"0.3","id":"a","source":"/s","type":"t",
            "datacontentencoding":"base64","data":"not base64!"}"#[..],
            br#"{"specversion":"0.3","id":"a","source":"/s","type":"t","time":"never",
            "datacontentencoding":"base64","data":"aGVsbG8="}"#,
        ] {
            assert!(parse_json(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn rejects_missing_and_empty_attributes() {
        let missing = br#"{"specversion":"1.0","source":"/s","type":"t"}"#;
        assert!(matches!(parse_json(missing), Err(EventError::Json(_))));
        assert!(
            parse_json(missing)
                .expect_err("no id")
                .to_string()
                .contains("attribute `id` is missing")
        );
        let empty = br#"{"specversion":"1.0","id":"","source":"/s","type":"t"}"#;
        assert!(matches!(
            parse_json(empty),
            Err(EventError::EmptyAttribute("id"))
        ));
        let bad_ext = br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","BadName":"x"}"#;
        assert!(parse_json(bad_ext).is_err());
    }

    /// Each refusal names the member at fault and why, where the SDK's own message named neither.
    #[test]
    fn refusals_name_the_member_and_why() {
        let base = r#""specversion":"1.0","id":"1","source":"/s","type":"t""#;
        for (members, expected) in [
            (
                r#""specversion":"1.0","id":5,"source":"/s","type":"t""#,
                "attribute `id` must be a string, not the number 5",
            ),
            (
                &format!(r#"{base},"myf":1.5"#),
                "attribute `myf`: an extension is a string, an integer or a boolean, not the number 1.5",
            ),
            (
                &format!(r#"{base},"myobj":{{"a":1}}"#),
                "attribute `myobj`: an extension is a string, an integer or a boolean, not an object",
            ),
            (
                &format!(r#"{base},"time":"yesterday""#),
                "attribute `time`: `yesterday` is not an RFC 3339 timestamp",
            ),
            (
                &format!(r#"{base},"dataschema":"not a uri""#),
                "attribute `dataschema`: `not a uri` is not an absolute URI",
            ),
            (
                &format!(r#"{base},"data_base64":"!!!""#),
                "attribute `data_base64`: not base64",
            ),
            (
                &format!(r#"{base},"subject":7"#),
                "attribute `subject`: must be a string, not the number 7",
            ),
            (
                &format!(r#"{base},"data":1,"data_base64":"AA==""#),
                "`data` and `data_base64` are exclusive",
            ),
            (
                r#""specversion":"2.0","id":"1","source":"/s","type":"t""#,
                "specversion `2.0` is not supported",
            ),
        ] {
            let json = format!("{{{members}}}");
            let e = parse_json(json.as_bytes()).expect_err(&json).to_string();
            assert!(e.contains(expected), "{json}: {e}");
        }
        // Not an object at all: the parser's own words.
        let e = parse_json(b"[1]").expect_err("array").to_string();
        assert!(e.contains("expected a map"), "{e}");
    }

    #[test]
    fn json_data_keeps_key_order() {
        let ev = parse_json(
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"application/json","data":{"z":1,"a":2}}"#,
        )
        .expect("valid event");
        assert_eq!(data_bytes(&ev).as_deref(), Some(&br#"{"z":1,"a":2}"#[..]));
    }
}
