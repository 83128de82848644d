//! Compiled components, cached by the sha256 of their bytes: in memory, and on disk in the data
//! directory so that a restart deserializes (about 0.3 ms) instead of recompiling (tens of ms).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

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
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache a compiled component");
        }
    }
}
