//! The request headers Knative's broker passes through to subscribers with an event
//! (`x-request-id`, `retry-after`, `knative-*`, `x-b3-*`): taken at ingress, kept with the event
//! in the log, and sent with each delivery over HTTP.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

/// An event's pass-through headers; cheap to clone (one allocation shared by the events of a
/// request), and nothing at all for the many requests that have none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Passthrough(Option<Arc<[(HeaderName, HeaderValue)]>>);

/// The most pass-through headers kept for a request, and the most bytes of them: a request's
/// headers are bounded by hyper already; this bounds what each event keeps in the log.
const MAX_HEADERS: usize = 32;
const MAX_BYTES: usize = 8 << 10;

fn passes(name: &str) -> bool {
    name == "x-request-id"
        || name == "retry-after"
        || name.starts_with("knative-")
        || name.starts_with("x-b3-")
}

impl Passthrough {
    /// The headers of an incoming request that pass through (header names are lower case).
    pub fn from_request(headers: &HeaderMap) -> Passthrough {
        let mut kept = Vec::new();
        let mut bytes = 0;
        for (name, value) in headers {
            if !passes(name.as_str()) {
                continue;
            }
            bytes += name.as_str().len() + value.len();
            if kept.len() == MAX_HEADERS || bytes > MAX_BYTES {
                tracing::warn!(
                    "a request carries more than {MAX_HEADERS} pass-through headers or {MAX_BYTES} bytes of them; the rest are not passed on"
                );
                break;
            }
            kept.push((name.clone(), value.clone()));
        }
        Passthrough((!kept.is_empty()).then(|| kept.into()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Adds the headers to an outgoing request's.
    pub fn add_to(&self, headers: &mut HeaderMap) {
        for (name, value) in self.0.iter().flat_map(|h| h.iter()) {
            headers.append(name.clone(), value.clone());
        }
    }

    /// Appends `[count u16]([name len u16][name][value len u16][value])*`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let headers = self.0.as_deref().unwrap_or_default();
        out.extend((headers.len() as u16).to_le_bytes());
        for (name, value) in headers {
            for part in [name.as_str().as_bytes(), value.as_bytes()] {
                out.extend((part.len() as u16).to_le_bytes());
                out.extend(part);
            }
        }
    }

    /// Reads what [`encode`](Self::encode) wrote at the start of `bytes`; returns the headers
    /// and the number of bytes read.
    pub(crate) fn decode(bytes: &[u8]) -> Result<(Passthrough, usize), String> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let part = bytes
                .get(at..at + n)
                .ok_or("truncated pass-through headers")?;
            at += n;
            Ok(part)
        };
        let count = u16::from_le_bytes(take(2)?.try_into().map_err(|_| "count")?);
        let mut kept = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let len = u16::from_le_bytes(take(2)?.try_into().map_err(|_| "length")?);
            let name =
                HeaderName::from_bytes(take(usize::from(len))?).map_err(|e| e.to_string())?;
            let len = u16::from_le_bytes(take(2)?.try_into().map_err(|_| "length")?);
            let value =
                HeaderValue::from_bytes(take(usize::from(len))?).map_err(|e| e.to_string())?;
            kept.push((name, value));
        }
        Ok((Passthrough((!kept.is_empty()).then(|| kept.into())), at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_headers_knative_passes_through_and_round_trips() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("x-request-id", "r-1"),
            ("knative-custom", "a"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("retry-after", "3"),
            ("authorization", "secret"),
            ("ce-id", "1"),
            ("content-type", "application/json"),
        ] {
            h.append(n, HeaderValue::from_static(v));
        }
        let p = Passthrough::from_request(&h);
        let mut out = HeaderMap::new();
        p.add_to(&mut out);
        let mut names: Vec<_> = out.keys().map(|k| k.as_str().to_string()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "knative-custom",
                "retry-after",
                "x-b3-traceid",
                "x-request-id"
            ]
        );
        let mut bytes = vec![9];
        p.encode(&mut bytes);
        bytes.push(7);
        let (back, read) = Passthrough::decode(&bytes[1..]).expect("decodes");
        assert_eq!(back, p);
        assert_eq!(bytes[1 + read], 7, "reads exactly what was written");
        assert!(Passthrough::decode(&bytes[1..read]).is_err(), "cut short");
        assert!(Passthrough::from_request(&HeaderMap::new()).is_empty());
    }
}
