//! Compiled components, cached by the sha256 of their bytes: in memory, and on disk in the data
//! directory so that a restart deserializes (about 0.3 ms) instead of recompiling (tens of ms;
//! seconds for a JavaScript or Python component). The disk cache keeps at most `DISK_CAP`
//! bytes, the least recently used artifacts going first: a plugin rebuilt over and over (each
//! build a new digest, 40-60 MB compiled for JavaScript or Python) does not fill the disk.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The most bytes of compiled artifacts kept on disk.
const DISK_CAP: u64 = 1 << 30;

/// A temporary file this old was left by a crash mid-write: removed when the cache is trimmed.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// The artifact in a cache file (its bytes followed by their sha256), if the checksum matches.
fn checked(file: &[u8]) -> Option<&[u8]> {
    let split = file.len().checked_sub(32)?;
    let (bytes, sum) = file.split_at(split);
    (Sha256::digest(bytes).as_slice() == sum).then_some(bytes)
}

/// The hex sha256 of a module's bytes: its identity everywhere in wasmesh.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(crate) struct ComponentCache {
    memory: Mutex<HashMap<String, Component>>,
    disk: Option<PathBuf>,
    /// Artifacts are only valid for the same wasmtime build and settings.
    compat: String,
}

impl ComponentCache {
    pub(crate) fn new(engine: &Engine, disk: Option<PathBuf>) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Self {
            memory: Mutex::new(HashMap::new()),
            disk,
            compat: format!("{:016x}", h.finish()),
        }
    }

    /// Returns the compiled component for these bytes, compiling only on a miss of both caches.
    pub(crate) fn get_or_compile(
        &self,
        engine: &Engine,
        digest: &str,
        bytes: &[u8],
    ) -> wasmtime::Result<Component> {
        if let Some(c) = self.lock().get(digest) {
            return Ok(c.clone());
        }
        let component = match self.load_from_disk(engine, digest) {
            Some(c) => c,
            None => {
                let c = Component::new(engine, bytes)?;
                self.store_on_disk(digest, &c);
                c
            }
        };
        self.lock().insert(digest.to_string(), component.clone());
        Ok(component)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Component>> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn path(&self, digest: &str) -> Option<PathBuf> {
        Some(
            self.disk
                .as_ref()?
                .join(format!("{digest}-{}.cwasm", self.compat)),
        )
    }

    /// True when a compiled artifact for this digest is on disk.
    pub(crate) fn on_disk(&self, digest: &str) -> bool {
        self.path(digest).is_some_and(|p| p.exists())
    }

    fn load_from_disk(&self, engine: &Engine, digest: &str) -> Option<Component> {
        let path = self.path(digest)?;
        let file = std::fs::read(&path).ok()?;
        // Machine code is about to run from these bytes: they must be exactly what
        // `store_on_disk` wrote, not a torn write or a flipped bit (wasmtime checks the header
        // only).
        // Used: the last to go when the cache is trimmed.
        if let Ok(f) = std::fs::File::options().write(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        let Some(bytes) = checked(&file) else {
            tracing::warn!(path = %path.display(), "ignoring a cached artifact whose checksum does not match; compiling again");
            let _ = std::fs::remove_file(&path);
            return None;
        };
        // SAFETY: the artifact was written by `store_on_disk` below, by this wasmtime build (the
        // file name carries the engine's compatibility hash) into the host's own data directory,
        // and its checksum matches; wasmtime also refuses artifacts of another version or config.
        #[allow(unsafe_code)]
        match unsafe { Component::deserialize(engine, bytes) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring a cached artifact");
                None
            }
        }
    }

    fn store_on_disk(&self, digest: &str, component: &Component) {
        let Some(path) = self.path(digest) else {
            return;
        };
        let result = component
            .serialize()
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                // Write (with the checksum), sync, then rename, so that a crash never leaves
                // half an artifact under the name.
                // A name of its own, as two loads of one module may compile it at once.
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
                let written = std::fs::File::create(&tmp).and_then(|mut file| {
                    file.write_all(&bytes)?;
                    file.write_all(&Sha256::digest(&bytes))?;
                    file.sync_all()
                });
                let renamed = written.and_then(|()| std::fs::rename(&tmp, &path));
                if renamed.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                renamed
            });
        match result {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    trim(dir, DISK_CAP, &path);
                }
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot cache a compiled component");
            }
        }
    }
}

/// Removes the least recently used artifacts (`*.cwasm`, oldest modification time first) until
/// those left take at most `cap` bytes, never `keep` (the one just written); and temporary files
/// a crash left behind. A removed artifact is only compiled again when next needed.
fn trim(dir: &Path, cap: u64, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    let mut artifacts = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        let modified = meta.modified().unwrap_or(now);
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".cwasm") {
            artifacts.push((modified, meta.len(), path));
        } else if name.contains(".tmp")
            && now
                .duration_since(modified)
                .is_ok_and(|age| age > STALE_TMP)
        {
            let _ = std::fs::remove_file(&path);
        }
    }
    let mut total: u64 = artifacts.iter().map(|(_, len, _)| len).sum();
    artifacts.sort();
    for (_, len, path) in artifacts {
        if total <= cap {
            break;
        }
        if path == keep {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                total -= len;
                tracing::info!(path = %path.display(), "removed a compiled component from the cache (least recently used)");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot trim the component cache")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimming_removes_the_least_recently_used_down_to_the_cap() {
        let dir = tempfile::tempdir().expect("dir");
        let at = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs);
        let file = |name: &str, len: usize, modified: SystemTime| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![0u8; len]).expect("write");
            let f = std::fs::File::options()
                .write(true)
                .open(&path)
                .expect("open");
            f.set_modified(modified).expect("mtime");
            path
        };
        let oldest = file("a-x.cwasm", 400, at(1));
        let old = file("b-x.cwasm", 400, at(2));
        let recent = file("c-x.cwasm", 400, at(3));
        // The one just written, though its time says otherwise, stays.
        let kept = file("d-x.cwasm", 400, at(0));
        let stale_tmp = file("e-x.tmp1-0", 10, at(0));
        let fresh_tmp = file("f-x.tmp1-1", 10, SystemTime::now());
        let other = file("notes.txt", 5000, at(0));
        trim(dir.path(), 900, &kept);
        assert!(
            !oldest.exists() && !old.exists(),
            "the two least recently used go"
        );
        assert!(recent.exists() && kept.exists());
        assert!(!stale_tmp.exists(), "a crash's leftover goes");
        assert!(fresh_tmp.exists(), "a write in progress stays");
        assert!(other.exists(), "only artifacts count and go");
        // Under the cap, nothing goes.
        trim(dir.path(), 900, &kept);
        assert!(recent.exists() && kept.exists());
    }
}
