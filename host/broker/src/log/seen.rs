//! What the ApiServerSources last saw of each object, kept in the log's database so that a
//! restart emits exactly what changed while wasmesh was down.

use std::collections::HashMap;

use redb::ReadableDatabase;

use super::{DurableLog, SEEN, SEEN_SOURCES};

/// What a source last saw of one object: (resourceVersion, object JSON).
pub type SeenObject = (String, Vec<u8>);

/// What the sources last saw of each object lives in the same database as the log.
impl DurableLog {
    /// Everything `source` has seen, by uid; `None` if it never finished a listing.
    pub fn seen_load(&self, source: &str) -> Result<Option<HashMap<String, SeenObject>>, String> {
        let r = self.db.begin_read().map_err(|e| e.to_string())?;
        let sources = r.open_table(SEEN_SOURCES).map_err(|e| e.to_string())?;
        if sources.get(source).map_err(|e| e.to_string())?.is_none() {
            return Ok(None);
        }
        let seen = r.open_table(SEEN).map_err(|e| e.to_string())?;
        let mut out = HashMap::new();
        for item in seen.range((source, "")..).map_err(|e| e.to_string())? {
            let (k, v) = item.map_err(|e| e.to_string())?;
            let (s, uid) = k.value();
            if s != source {
                break;
            }
            let bytes = v.value();
            let n = bytes.len().min(4);
            let rv_len = u32::from_le_bytes(bytes[..n].try_into().unwrap_or_default()) as usize;
            let rv =
                String::from_utf8_lossy(bytes.get(4..4 + rv_len).unwrap_or_default()).into_owned();
            let object = bytes.get(4 + rv_len..).unwrap_or_default().to_vec();
            out.insert(uid.to_string(), (rv, object));
        }
        Ok(Some(out))
    }

    /// The object `source` last saw with this uid.
    pub fn seen_object(&self, source: &str, uid: &str) -> Result<Option<Vec<u8>>, String> {
        let r = self.db.begin_read().map_err(|e| e.to_string())?;
        let seen = r.open_table(SEEN).map_err(|e| e.to_string())?;
        Ok(seen
            .get((source, uid))
            .map_err(|e| e.to_string())?
            .map(|v| {
                let bytes = v.value();
                let n = bytes.len().min(4);
                let rv_len = u32::from_le_bytes(bytes[..n].try_into().unwrap_or_default()) as usize;
                bytes.get(4 + rv_len..).unwrap_or_default().to_vec()
            }))
    }

    /// Records what `source` saw (`None` forgets an object), durably.
    pub fn seen_update(
        &self,
        source: &str,
        changes: Vec<(String, Option<SeenObject>)>,
    ) -> Result<(), String> {
        let w = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut sources = w.open_table(SEEN_SOURCES).map_err(|e| e.to_string())?;
            sources.insert(source, 1).map_err(|e| e.to_string())?;
            let mut seen = w.open_table(SEEN).map_err(|e| e.to_string())?;
            for (uid, s) in changes {
                match s {
                    Some((rv, object)) => {
                        let mut v = (rv.len() as u32).to_le_bytes().to_vec();
                        v.extend(rv.as_bytes());
                        v.extend(&object);
                        seen.insert((source, uid.as_str()), v.as_slice())
                            .map_err(|e| e.to_string())?;
                    }
                    None => {
                        seen.remove((source, uid.as_str()))
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        w.commit().map_err(|e| e.to_string())
    }
}
