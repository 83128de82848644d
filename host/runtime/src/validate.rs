//! Checks on a component before it may run: the bytes, the world it implements, the imports.

use wasmtime::Engine;
use wasmtime::component::Component;

use crate::error::LoadError;

/// The export of a filter and of a subscriber.
pub(crate) const MATCHER_EXPORT: &str = "wasmesh:plugin/matcher@0.1.0";
pub(crate) const HANDLER_EXPORT: &str = "wasmesh:plugin/handler@0.1.0";

/// Interfaces a plugin may import (by prefix; WASI versions are matched semver-compatibly by the
/// linker). Everything else, sockets, HTTP and the filesystem included, is refused.
const GRANTED: &[&str] = &[
    "wasmesh:plugin/types@0.1",
    "wasmesh:plugin/log@0.1",
    "wasmesh:plugin/config@0.1",
    "wasmesh:plugin/event-view@0.1",
    "wasi:io/",
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:random/",
];

/// Which world a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// World `filter`: a predicate over an event.
    Filter,
    /// World `subscriber`: a handler returning a disposition.
    Subscriber,
}

impl PluginKind {
    /// The world's name in `wit/plugin.wit`.
    pub fn world(self) -> &'static str {
        match self {
            PluginKind::Filter => "filter",
            PluginKind::Subscriber => "subscriber",
        }
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.world())
    }
}

/// The magic and version bytes tell a component from a core module before any parsing.
pub(crate) fn check_header(name: &str, bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm { name: name.into() });
    }
    match bytes[4..8] {
        [1, 0, 0, 0] => Err(LoadError::CoreModule { name: name.into() }),
        // Component-model binaries carry layer 1 in the upper half of the version field.
        [_, _, 1, 0] => Ok(()),
        _ => Err(LoadError::Invalid {
            name: name.into(),
            reason: format!("unknown binary version {:02x?}", &bytes[4..8]),
        }),
    }
}

/// Finds the world from the exports, then checks every import against what the host grants.
pub(crate) fn inspect(
    name: &str,
    engine: &Engine,
    component: &Component,
) -> Result<PluginKind, LoadError> {
    let ty = component.component_type();
    let exports: Vec<&str> = ty.exports(engine).map(|(n, _)| n).collect();
    let kind = match (
        exports.contains(&MATCHER_EXPORT),
        exports.contains(&HANDLER_EXPORT),
    ) {
        (true, false) => PluginKind::Filter,
        (false, true) => PluginKind::Subscriber,
        _ => {
            return Err(LoadError::NoWorld {
                name: name.into(),
                exports: exports.join(", "),
            });
        }
    };
    for (import, _) in ty.imports(engine) {
        if !GRANTED.iter().any(|g| import.starts_with(g)) {
            return Err(LoadError::Ungranted {
                name: name.into(),
                import: import.to_string(),
            });
        }
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert!(matches!(
            check_header("x", b"hello world"),
            Err(LoadError::NotWasm { .. })
        ));
        assert!(matches!(
            check_header("x", b"\0asm\x01\0\0\0"),
            Err(LoadError::CoreModule { .. })
        ));
        assert!(check_header("x", b"\0asm\x0d\0\x01\0").is_ok());
    }
}
