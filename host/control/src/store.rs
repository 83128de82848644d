//! What the control path keeps in the data directory: uploaded modules by digest, and the
//! changes made through the admin API (objects applied, objects deleted, each Function's
//! revisions), so that a restart comes back to the state the API left.

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Modules stored content-addressed: `<data-dir>/modules/<hex sha256>.wasm`.
#[derive(Debug, Clone)]
pub struct ModuleStore {
    dir: PathBuf,
}

impl ModuleStore {
    /// The store under `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("modules"),
        }
    }

    fn path(&self, hex: &str) -> Option<PathBuf> {
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| self.dir.join(format!("{}.wasm", hex.to_ascii_lowercase())))
    }

    /// Keeps `bytes`; returns their hex digest. Written to a temporary file and renamed, so a
    /// crash never leaves a torn module under its digest.
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<String> {
        let hex = wasmesh_runtime::digest(bytes);
        let Some(path) = self.path(&hex) else {
            return Err(std::io::Error::other("bad digest"));
        };
        if path.exists() {
            // Stored again (pushed once more, to be applied): its grace before pruning starts
            // again, as if it had just been written.
            let _ = std::fs::File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::now()));
            return Ok(hex);
        }
        std::fs::create_dir_all(&self.dir)?;
        // A name of its own: two uploads of the same module at once must not write one file
        // (the first rename would publish the second's half-written bytes, and the second
        // rename would fail).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".{hex}.{}-{n}.tmp", std::process::id()));
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
        if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &path)) {
            // A full disk, say: the partial file goes, not left to pile up.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        sync_dir(&self.dir)?;
        Ok(hex)
    }

    /// Removes the modules whose digest (hex) is not in `keep` and that were stored more than
    /// `grace` ago (an upload waits that long for the apply that names it), and temporary files
    /// a crash left; returns the digests removed.
    pub fn prune(&self, keep: &HashSet<String>, grace: Duration) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let now = SystemTime::now();
        let old = |meta: &std::fs::Metadata| {
            meta.modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > grace)
        };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if !old(&meta) {
                continue;
            }
            let stale_tmp = name.starts_with('.') && name.ends_with(".tmp");
            let unused = name
                .strip_suffix(".wasm")
                .is_some_and(|hex| self.path(hex).is_some() && !keep.contains(hex));
            if !(stale_tmp || unused) {
                continue;
            }
            let gone = std::fs::remove_file(entry.path()).is_ok();
            if gone && unused {
                removed.push(name.trim_end_matches(".wasm").to_string());
            }
        }
        removed
    }

    /// The bytes stored under `sha256:<hex>` (or a bare hex digest).
    pub fn get(&self, digest: &str) -> Result<Vec<u8>, String> {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let path = self
            .path(hex)
            .ok_or_else(|| format!("`{digest}` is not a sha256 digest (sha256:<64 hex digits>)"))?;
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "no uploaded module {digest}: upload it first (wasmesh push function NAME FILE.wasm)"
            ),
            _ => format!("cannot read {}: {e}", path.display()),
        })?;
        // The digest names what runs: bytes that changed on disk are not that module.
        if wasmesh_runtime::digest(&bytes) != hex {
            return Err(format!(
                "{} is corrupt: its bytes are not module {digest} any more (upload it again)",
                path.display()
            ));
        }
        Ok(bytes)
    }
}

/// Revisions kept per Function, as a Kubernetes Deployment keeps ten old ReplicaSets: older ones
/// go (`rollout undo` reaches these ten), and so does a module no revision or spec names.
pub(crate) const REVISIONS_KEPT: usize = 10;

/// Drops the oldest revisions past `REVISIONS_KEPT`. The live revision is always the newest
/// (an undo or an automatic rollback makes a new revision), and one on trial has its fallback
/// just before it.
pub(crate) fn trim_history(history: &mut Vec<Revision>) {
    let extra = history.len().saturating_sub(REVISIONS_KEPT);
    history.drain(..extra);
}

/// One revision of a Function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    pub revision: u32,
    /// `sha256:<hex>`.
    pub digest: String,
    /// `spec.module` as declared (a path, `builtin:...` or a digest).
    pub module: String,
    /// When it went live (RFC 3339).
    pub created: String,
    /// Why it is no longer live, when a rollout rolled it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<String>,
}

/// The admin API's changes, as persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Overlay {
    /// Objects applied through the API, by `Kind/namespace/name`, as JSON.
    #[serde(default)]
    pub applied: BTreeMap<String, serde_json::Value>,
    /// Objects deleted through the API (files may still declare them).
    #[serde(default)]
    pub deleted: Vec<String>,
    /// Each Function's revisions, oldest first.
    #[serde(default)]
    pub history: BTreeMap<String, Vec<Revision>>,
}

impl Overlay {
    /// Reads `<data-dir>/control.json` (empty when there is none).
    pub fn load(data_dir: &Path) -> Result<Self, String> {
        let path = data_dir.join("control.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// The modules (hex digests) the changes name: each Function's kept revisions, and each
    /// applied Function's `spec.module` that is a digest.
    pub fn module_digests(&self) -> HashSet<String> {
        let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
        let mut named: HashSet<String> = self
            .history
            .values()
            .flatten()
            .map(|r| hex(&r.digest))
            .collect();
        named.extend(
            self.applied
                .values()
                .filter_map(|o| o.pointer("/spec/module")?.as_str())
                .filter(|m| m.starts_with("sha256:"))
                .map(hex),
        );
        named
    }

    /// Writes it atomically (temporary file, fsync, rename).
    pub fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        let path = data_dir.join("control.json");
        let tmp = data_dir.join(".control.json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(data_dir)
    }
}

/// Makes a rename in `dir` durable: until the directory itself is synced, a crash can bring
/// back the old name (an applied change, or an uploaded module, the API answered for).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_newest_ten() {
        let rev = |n: u32, digest: &str| Revision {
            revision: n,
            digest: digest.into(),
            module: digest.into(),
            created: String::new(),
            rolled_back: None,
        };
        let mut h: Vec<Revision> = (1..=12).map(|n| rev(n, &format!("d{}", n % 2))).collect();
        trim_history(&mut h);
        let kept: Vec<u32> = h.iter().map(|r| r.revision).collect();
        assert_eq!(kept, (3..=12).collect::<Vec<_>>());
        let mut short = h[..4].to_vec();
        trim_history(&mut short);
        assert_eq!(short.len(), 4);
    }

    #[test]
    fn the_changes_name_their_revisions_and_applied_digests() {
        let mut overlay = Overlay::default();
        overlay.history.insert(
            "default/sub".into(),
            vec![Revision {
                revision: 1,
                digest: "sha256:aa".into(),
                module: "sub.wasm".into(),
                created: String::new(),
                rolled_back: None,
            }],
        );
        let function =
            |module: &str| serde_json::json!({"kind": "Function", "spec": {"module": module}});
        overlay
            .applied
            .insert("Function/default/up".into(), function("sha256:bb"));
        overlay
            .applied
            .insert("Function/default/path".into(), function("f.wasm"));
        overlay
            .applied
            .insert("Broker/default/b".into(), serde_json::json!({"spec": {}}));
        assert_eq!(
            overlay.module_digests(),
            HashSet::from(["aa".to_string(), "bb".to_string()])
        );
    }

    #[test]
    fn pruning_removes_old_unnamed_modules_only() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ModuleStore::new(dir.path());
        let named = store.put(b"\0asm named").expect("put");
        let unnamed = store.put(b"\0asm unnamed").expect("put");
        let fresh = store.put(b"\0asm just uploaded").expect("put");
        let tmp = dir.path().join("modules/.abc.1-0.tmp");
        std::fs::write(&tmp, b"torn").expect("write");
        let hours_ago = SystemTime::now() - Duration::from_secs(2 * 3600);
        for path in [store.path(&named), store.path(&unnamed), Some(tmp.clone())]
            .into_iter()
            .flatten()
        {
            let f = std::fs::File::options()
                .write(true)
                .open(&path)
                .expect("open");
            f.set_modified(hours_ago).expect("mtime");
        }
        let keep = HashSet::from([named.clone()]);
        let removed = store.prune(&keep, Duration::from_secs(3600));
        assert_eq!(removed, std::slice::from_ref(&unnamed));
        assert!(store.get(&named).is_ok());
        assert!(store.get(&unnamed).is_err());
        assert!(
            store.get(&fresh).is_ok(),
            "an upload waiting for its apply stays"
        );
        assert!(!tmp.exists(), "a crash's leftover goes");
    }

    #[test]
    fn a_module_changed_on_disk_is_refused_not_run() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ModuleStore::new(dir.path());
        let hex = store.put(b"\0asm module bytes").expect("put");
        assert_eq!(
            store.get(&format!("sha256:{hex}")).expect("get"),
            b"\0asm module bytes"
        );
        let path = store.path(&hex).expect("path");
        std::fs::write(&path, b"\0asm other bytes").expect("corrupt");
        let e = store.get(&hex).expect_err("corrupt");
        assert!(e.contains("is corrupt"), "{e}");
    }

    /// A module stored again (pushed once more, to be applied) waits its whole grace again.
    #[test]
    fn a_module_stored_again_waits_its_grace_again() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ModuleStore::new(dir.path());
        let hex = store.put(b"\0asm pushed twice").expect("put");
        let path = store.path(&hex).expect("path");
        let hours_ago = SystemTime::now() - Duration::from_secs(2 * 3600);
        let f = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open");
        f.set_modified(hours_ago).expect("mtime");
        assert_eq!(store.put(b"\0asm pushed twice").expect("put again"), hex);
        assert!(
            store
                .prune(&HashSet::new(), Duration::from_secs(3600))
                .is_empty()
        );
        assert!(store.get(&hex).is_ok());
    }

    /// The same module uploaded several times at once (two `wasmesh push` of one file): each
    /// upload succeeds and the module stored is whole.
    #[test]
    fn the_same_module_put_at_once_is_stored_whole() {
        let dir = tempfile::tempdir().expect("dir");
        let store = ModuleStore::new(dir.path());
        let bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..5 {
            let hex = std::thread::scope(|s| {
                let puts: Vec<_> = (0..6).map(|_| s.spawn(|| store.put(&bytes))).collect();
                let results: Vec<_> = puts
                    .into_iter()
                    .map(|p| p.join().expect("no panic"))
                    .collect();
                for r in &results {
                    assert!(r.is_ok(), "every upload succeeds: {r:?}");
                }
                results[0].as_ref().expect("ok").clone()
            });
            assert_eq!(store.get(&hex).expect("whole"), bytes);
            std::fs::remove_file(store.path(&hex).expect("path")).expect("remove");
        }
    }
}
