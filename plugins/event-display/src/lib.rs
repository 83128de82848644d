//! event-display: prints each CloudEvent on stdout exactly as Knative's event-display does.

use std::io::Write;
use wasmesh_display::{DisplayEvent, push_rfc3339_nano};
use wasmesh_subscriber::{Disposition, Event, ExtensionValue, Level, Subscriber};

struct EventDisplay;

impl Subscriber for EventDisplay {
    fn handle(event: Event) -> Disposition {
        let a = &event.attributes;
        let extensions = a
            .extensions
            .iter()
            .map(|e| (e.name.as_str(), extension_text(&e.value)))
            .collect();
        let text = wasmesh_display::render_bytes(&DisplayEvent {
            specversion: &a.specversion,
            ty: &a.type_,
            source: &a.source,
            subject: a.subject.as_deref(),
            id: &a.id,
            time: a.time.map(|t| (t.seconds, t.nanoseconds)),
            dataschema: a.dataschema.as_deref(),
            datacontenttype: a.datacontenttype.as_deref(),
            extensions,
            data: event.data.as_deref(),
        });
        // One write per event, as Go's fmt.Printf does: the host keeps it together. The text
        // ends with a newline, so the line-buffered stdout passes it on whole; no flush needed.
        let mut out = std::io::stdout().lock();
        match out.write_all(&text) {
            Ok(()) => Disposition::Ack,
            Err(e) => Disposition::Retry(None).tap_log(&format!("stdout: {e}")),
        }
    }
}

trait TapLog {
    fn tap_log(self, msg: &str) -> Self;
}

impl TapLog for Disposition {
    fn tap_log(self, msg: &str) -> Self {
        wasmesh_subscriber::log::log(Level::Error, msg);
        self
    }
}

/// The value as sdk-go's `%v` prints it after an HTTP hop: the canonical string form.
fn extension_text(v: &ExtensionValue) -> String {
    match v {
        ExtensionValue::String(s) | ExtensionValue::Uri(s) | ExtensionValue::UriReference(s) => {
            s.clone()
        }
        ExtensionValue::Integer(i) => i.to_string(),
        ExtensionValue::Boolean(b) => b.to_string(),
        ExtensionValue::Binary(b) => base64(b),
        ExtensionValue::Timestamp(t) => {
            let mut s = String::new();
            push_rfc3339_nano(&mut s, t.seconds, t.nanoseconds);
            s
        }
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

wasmesh_subscriber::export_subscriber!(EventDisplay);
