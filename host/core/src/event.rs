//! Parsing, validating and reading CloudEvents.

use std::borrow::Cow;

use cloudevents::{AttributesReader, Data, Event};

/// Why bytes are not a valid CloudEvent.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The JSON (structured mode) could not be read as an event.
    #[error("not a valid structured CloudEvent: {0}")]
    Json(serde_json::Error),
    /// A required attribute is empty.
    #[error("attribute `{0}` must not be empty")]
    EmptyAttribute(&'static str),
    /// An extension name breaks the CloudEvents naming rules.
    #[error("extension name `{0}` is invalid: use lower-case letters a-z and digits 0-9 only")]
    ExtensionName(String),
}

/// Reads one event in the JSON format (structured mode) and checks it.
pub fn parse_json(bytes: &[u8]) -> Result<Event, EventError> {
    let event: Event = serde_json::from_slice(bytes).map_err(EventError::Json)?;
    validate(&event)?;
    Ok(event)
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
        if !is_valid_extension_name(name) {
            return Err(EventError::ExtensionName(name.to_string()));
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

/// CloudEvents attribute names: lower-case ASCII letters and digits, not empty.
pub fn is_valid_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
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
    fn rejects_missing_and_empty_attributes() {
        let missing = br#"{"specversion":"1.0","source":"/s","type":"t"}"#;
        assert!(matches!(parse_json(missing), Err(EventError::Json(_))));
        let empty = br#"{"specversion":"1.0","id":"","source":"/s","type":"t"}"#;
        assert!(matches!(
            parse_json(empty),
            Err(EventError::EmptyAttribute("id"))
        ));
        let bad_ext = br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","BadName":"x"}"#;
        assert!(parse_json(bad_ext).is_err());
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
