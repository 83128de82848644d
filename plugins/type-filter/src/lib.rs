//! A trigger filter configured from the Function's `spec.config`:
//! - `attribute` (default `type`): the context attribute or extension to test;
//! - `prefix` (default empty): the value must start with it (a missing attribute never matches);
//! - `data-contains` (optional): the data must contain this text. Only then is the data read.

use std::sync::OnceLock;

use wasmesh_filter::{Filter, IncomingEvent, config};

struct Settings {
    attribute: Option<String>,
    prefix: String,
    data_contains: Option<String>,
}

/// Configuration is read-only for the life of an instance: read it once.
fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| Settings {
        attribute: config::get("attribute").filter(|a| a != "type"),
        prefix: config::get("prefix").unwrap_or_default(),
        data_contains: config::get("data-contains"),
    })
}

struct TypeFilter;

impl Filter for TypeFilter {
    fn matches(event: &IncomingEvent) -> bool {
        let s = settings();
        let value = match &s.attribute {
            None => Some(event.type_()),
            Some(name) => event.attribute(name),
        };
        if !value.is_some_and(|v| v.starts_with(&s.prefix)) {
            return false;
        }
        match &s.data_contains {
            None => true,
            Some(needle) => event.data().is_some_and(|d| {
                d.windows(needle.len().max(1))
                    .any(|w| w == needle.as_bytes())
            }),
        }
    }
}

wasmesh_filter::export_filter!(TypeFilter);
