//! Builds every guest crate in `plugins/` for `wasm32-wasip2` and writes the paths of the
//! components as constants, so that `cargo build` and `cargo test` need no separate step.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Plugins that `module: builtin:<name>` can name.
const BUILTINS: &[&str] = &["event-display", "type-filter", "pod-started"];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir.join("../..");
    let plugins = root.join("plugins");
    // The plugins workspace's manifest, lock and member crates, not all of plugins/: other
    // directories there (the JavaScript example's node_modules, an old target/) are not built.
    let watched = [
        "plugins/Cargo.toml",
        "plugins/Cargo.lock",
        "wit",
        "host/display",
    ]
    .map(|p| root.join(p))
    .into_iter()
    .chain(
        workspace_members(&plugins.join("Cargo.toml"))
            .into_iter()
            .map(|m| plugins.join(m)),
    );
    for path in watched {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let target_dir = outer_target_dir(&out_dir).join("wasm-plugins");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--target=wasm32-wasip2")
        .arg("--manifest-path")
        .arg(plugins.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    if env::var_os("CI").is_some() {
        cmd.arg("--locked");
    }
    // The outer build's settings (its flags, clippy as a wrapper, its jobserver) are not the
    // guests' business.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTC_")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    let status = cmd.status().expect("failed to run cargo for the plugins");
    if !status.success() {
        panic!(
            "building plugins/ for wasm32-wasip2 failed ({status}); if the target is missing: \
             rustup target add wasm32-wasip2"
        );
    }

    let wasm_dir = target_dir.join("wasm32-wasip2/release");
    let mut consts = String::from(
        "/// Every plugin component: (crate name, path).\npub const ALL: &[(&str, &str)] = &[\n",
    );
    let mut items = String::new();
    for name in members(&plugins.join("Cargo.toml")) {
        let file = wasm_dir.join(format!("{}.wasm", name.replace('-', "_")));
        assert!(file.exists(), "{} was not built", file.display());
        let path = file.display().to_string();
        let _ = writeln!(consts, "    ({name:?}, {path:?}),");
        let _ = writeln!(
            items,
            "/// Path of the `{name}` component.\npub const {}: &str = {path:?};",
            name.replace('-', "_").to_uppercase()
        );
    }
    consts.push_str("];\n");
    // The example plugins are built into the binary too, for `module: builtin:<name>`.
    consts.push_str("/// Example plugins built into the binary: (name, component bytes).\npub const BUILTINS: &[(&str, &[u8])] = &[\n");
    for name in BUILTINS {
        let file = wasm_dir.join(format!("{}.wasm", name.replace('-', "_")));
        let _ = writeln!(
            consts,
            "    ({name:?}, include_bytes!({:?})),",
            file.display().to_string()
        );
    }
    consts.push_str("];\n");
    std::fs::write(out_dir.join("plugins.rs"), consts + &items).expect("write plugins.rs");
}

/// `OUT_DIR` is `<target>/[<triple>/]<profile>/build/<pkg>/out`.
fn outer_target_dir(out_dir: &Path) -> PathBuf {
    let build = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .expect("OUT_DIR lies under a build directory");
    let profile = build.parent().expect("profile directory");
    profile.parent().expect("target directory").to_path_buf()
}

/// Every member listed in the plugins workspace manifest.
fn workspace_members(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).expect("read plugins/Cargo.toml");
    let start = text
        .find("members = [")
        .expect("plugins/Cargo.toml lists members");
    let list = &text[start + "members = [".len()..];
    let list = &list[..list.find(']').expect("members list ends")];
    list.split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The members that are components (the guest SDK crates are libraries).
fn members(manifest: &Path) -> Vec<String> {
    let dir = manifest.parent().expect("plugins/");
    workspace_members(manifest)
        .into_iter()
        .filter(|s| {
            std::fs::read_to_string(dir.join(s).join("Cargo.toml"))
                .is_ok_and(|m| m.contains("cdylib"))
        })
        .collect()
}
