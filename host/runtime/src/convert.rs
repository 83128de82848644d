//! Between the host's events (cloudevents-sdk) and the WIT types plugins see.

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use wasmesh_core::{
    AttributesReader, AttributesWriter as _, Event, EventBuilder, EventBuilderV10, ExtensionValue,
};

use crate::bindings::types;

pub(crate) fn datetime(t: &DateTime<Utc>) -> types::Datetime {
    types::Datetime {
        seconds: t.timestamp(),
        nanoseconds: t.timestamp_subsec_nanos(),
    }
}

fn from_datetime(t: types::Datetime) -> Option<DateTime<Utc>> {
    Utc.timestamp_opt(t.seconds, t.nanoseconds).single()
}

/// CloudEvents integers are 32-bit; a larger value travels as its string form.
pub(crate) fn extension_value(v: &ExtensionValue) -> types::ExtensionValue {
    match v {
        ExtensionValue::String(s) => types::ExtensionValue::String(s.clone()),
        ExtensionValue::Boolean(b) => types::ExtensionValue::Boolean(*b),
        ExtensionValue::Integer(i) => match i32::try_from(*i) {
            Ok(i) => types::ExtensionValue::Integer(i),
            Err(_) => types::ExtensionValue::String(i.to_string()),
        },
    }
}

/// The canonical string form of a typed extension value (CloudEvents type system).
fn extension_from_wit(v: types::ExtensionValue) -> ExtensionValue {
    match v {
        types::ExtensionValue::String(s)
        | types::ExtensionValue::Uri(s)
        | types::ExtensionValue::UriReference(s) => ExtensionValue::String(s),
        types::ExtensionValue::Integer(i) => ExtensionValue::Integer(i64::from(i)),
        types::ExtensionValue::Boolean(b) => ExtensionValue::Boolean(b),
        types::ExtensionValue::Binary(b) => {
            ExtensionValue::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        types::ExtensionValue::Timestamp(t) => ExtensionValue::String(
            from_datetime(t)
                .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
                .unwrap_or_default(),
        ),
    }
}

pub(crate) fn empty_attributes() -> types::Attributes {
    types::Attributes {
        id: String::new(),
        source: String::new(),
        specversion: String::new(),
        type_: String::new(),
        datacontenttype: None,
        dataschema: None,
        subject: None,
        time: None,
        extensions: Vec::new(),
    }
}

pub(crate) fn attributes(e: &Event) -> types::Attributes {
    types::Attributes {
        id: e.id().to_string(),
        source: e.source().to_string(),
        specversion: e.specversion().to_string(),
        type_: e.ty().to_string(),
        datacontenttype: e.datacontenttype().map(str::to_string),
        dataschema: e.dataschema().map(|u| u.to_string()),
        subject: e.subject().map(str::to_string),
        time: e.time().map(datetime),
        extensions: e
            .iter_extensions()
            .map(|(name, value)| types::Extension {
                name: name.to_string(),
                value: extension_value(value),
            })
            .collect(),
    }
}

/// Any context attribute or extension, as a string.
pub(crate) fn attribute_text(e: &Event, name: &str) -> Option<String> {
    match name {
        "id" => Some(e.id().to_string()),
        "source" => Some(e.source().to_string()),
        "specversion" => Some(e.specversion().to_string()),
        "type" => Some(e.ty().to_string()),
        "datacontenttype" => e.datacontenttype().map(str::to_string),
        "dataschema" => e.dataschema().map(|u| u.to_string()),
        "subject" => e.subject().map(str::to_string),
        "time" => e
            .time()
            .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        _ => e.extension(name).map(|v| v.to_string()),
    }
}

/// The whole event, data included, for a subscriber.
pub(crate) fn to_wit(e: &Event) -> types::Event {
    types::Event {
        attributes: attributes(e),
        data: wasmesh_core::event::data_bytes(e).map(|d| d.into_owned()),
    }
}

/// Why a plugin's reply is not a valid CloudEvent.
#[derive(Debug, thiserror::Error)]
#[error("malformed reply: {0}")]
pub struct ReplyError(pub String);

/// A plugin's reply, checked like any event that enters the broker.
pub(crate) fn from_wit(ev: types::Event) -> Result<Event, ReplyError> {
    let a = ev.attributes;
    // A reply may keep the version of the event it answers, as ingress keeps what it takes.
    let v03 = match a.specversion.as_str() {
        "1.0" => false,
        "0.3" => true,
        other => {
            return Err(ReplyError(format!(
                "specversion `{other}` is not supported (use 1.0 or 0.3)"
            )));
        }
    };
    for (name, value) in [("id", &a.id), ("source", &a.source), ("type", &a.type_)] {
        if value.is_empty() {
            return Err(ReplyError(format!("attribute `{name}` must not be empty")));
        }
    }
    let mut b = EventBuilderV10::new().id(a.id).source(a.source).ty(a.type_);
    if let Some(subject) = a.subject {
        b = b.subject(subject);
    }
    if let Some(t) = a.time {
        let t = from_datetime(t).ok_or_else(|| ReplyError("time is out of range".into()))?;
        b = b.time(t);
    }
    for ext in a.extensions {
        if let Some(why) = wasmesh_core::event::extension_name_problem(&ext.name) {
            return Err(ReplyError(format!("extension name `{}` {why}", ext.name)));
        }
        b = b.extension(&ext.name, extension_from_wit(ext.value));
    }
    let schema = match a.dataschema {
        Some(schema) => Some(
            url::Url::parse(&schema)
                .map_err(|e| ReplyError(format!("dataschema `{schema}`: {e}")))?,
        ),
        None => None,
    };
    let mut event = b.build().map_err(|e| ReplyError(e.to_string()))?;
    if let Some(data) = ev.data {
        // JSON stays JSON (keys in their order), so that structured mode inlines it. Data
        // without a content type keeps none, as an event that ingress takes does.
        let json = a
            .datacontenttype
            .as_deref()
            .is_some_and(wasmesh_core::event::is_json_media_type);
        let data = match serde_json::from_slice(&data) {
            Ok(v) if json => wasmesh_core::Data::Json(v),
            _ => wasmesh_core::Data::Binary(data),
        };
        event.set_data_unchecked(data);
    }
    event.set_datacontenttype(a.datacontenttype);
    event.set_dataschema(schema);
    if v03 {
        event = wasmesh_core::EventBuilderV03::from(event)
            .build()
            .map_err(|e| ReplyError(e.to_string()))?;
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_attributes_and_typed_extensions() {
        let ev = wasmesh_core::event::parse_json(
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","subject":"x",
                "time":"2019-05-10T23:27:06.695575294Z","num":7,"flag":true,"text":"hi",
                "datacontenttype":"application/json","data":{"b":1,"a":2}}"#,
        )
        .expect("valid");
        let wit = to_wit(&ev);
        assert_eq!(wit.data.as_deref(), Some(&br#"{"b":1,"a":2}"#[..]));
        let back = from_wit(wit).expect("valid reply");
        assert_eq!(back.id(), "1");
        assert_eq!(back.time(), ev.time());
        assert_eq!(back.extension("num"), Some(&ExtensionValue::Integer(7)));
        assert_eq!(back.extension("flag"), Some(&ExtensionValue::Boolean(true)));
        assert_eq!(attribute_text(&back, "text").as_deref(), Some("hi"));
    }

    /// What a plugin gives back unchanged comes back unchanged: no content type added, the
    /// version kept.
    #[test]
    fn an_event_replied_as_it_came_is_the_same_event() {
        for text in [
            &br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"AAH/"}"#[..],
            br#"{"specversion":"0.3","id":"1","source":"/s","type":"t","schemaurl":"http://x/s",
                "datacontenttype":"application/json","data":{"b":1,"a":2}}"#,
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t",
                "dataschema":"http://x/s","datacontenttype":"text/plain","data":"hi"}"#,
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t"}"#,
        ] {
            let ev = wasmesh_core::event::parse_json(text).expect("valid");
            let back = from_wit(to_wit(&ev)).expect("valid reply");
            let said = String::from_utf8_lossy(text);
            assert_eq!(back.specversion(), ev.specversion(), "{said}");
            assert_eq!(back.datacontenttype(), ev.datacontenttype(), "{said}");
            assert_eq!(back.dataschema(), ev.dataschema(), "{said}");
            assert_eq!(
                wasmesh_core::event::data_bytes(&back),
                wasmesh_core::event::data_bytes(&ev),
                "{said}"
            );
        }
    }

    #[test]
    fn rejects_bad_replies() {
        let mut wit = to_wit(
            &wasmesh_core::event::parse_json(
                br#"{"specversion":"1.0","id":"1","source":"/s","type":"t"}"#,
            )
            .expect("valid"),
        );
        wit.attributes.extensions.push(types::Extension {
            name: "Bad".into(),
            value: types::ExtensionValue::Boolean(true),
        });
        let err = from_wit(wit.clone()).expect_err("bad name");
        assert!(err.to_string().contains("`Bad`"), "{err}");
        wit.attributes.extensions.clear();
        wit.attributes.id.clear();
        assert!(from_wit(wit).is_err());
    }
}
