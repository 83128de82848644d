//! The Kubernetes manifests (`manifests/kubernetes/`): every object checked against the
//! Kubernetes schemas (kubernetes-validate, from PyPI; .ci/setup installs it), the declarations
//! in the ConfigMap read by wasmesh's own reader, and the Deployment's flags known to
//! `wasmesh serve`.

use crate::harness::repo;

fn documents() -> Vec<(String, serde_yaml_ng::Value)> {
    let dir = repo("manifests/kubernetes");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("manifests/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                out.push((
                    f.file_name().expect("name").to_string_lossy().into_owned(),
                    v,
                ));
            }
        }
    }
    out
}

#[test]
fn the_kubernetes_manifests_validate_against_the_schemas() {
    let files: Vec<_> = std::fs::read_dir(repo("manifests/kubernetes"))
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    let out = std::process::Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(&files)
        .output()
        .expect("python3 (with kubernetes-validate from PyPI; .ci/setup installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let passed = text.matches(" passed for resource ").count();
    assert_eq!(passed, documents().len(), "every object checked: {text}");
}

#[test]
fn the_deployment_runs_three_replicas_over_nats_with_flags_wasmesh_knows() {
    let docs = documents();
    let kind = |k: &'static str| docs.iter().filter(move |(_, d)| d["kind"] == k);
    let (_, deploy) = kind("Deployment").next().expect("a Deployment");
    assert_eq!(deploy["spec"]["replicas"], 3);
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(args[0], "serve");
    let store = args
        .iter()
        .position(|a| *a == "--store")
        .map(|i| args[i + 1])
        .expect("--store");
    assert!(store.starts_with("nats://"), "{store}");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_wasmesh"))
        .args(["serve", "--help"])
        .output()
        .expect("wasmesh");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag), "`wasmesh serve` has no {flag}");
    }
    // Services for ingress and admin, the seed's ClusterRole, the config wasmesh reads.
    let services: Vec<&str> = kind("Service")
        .filter_map(|(_, d)| d["metadata"]["name"].as_str())
        .collect();
    assert_eq!(services, ["wasmesh-ingress", "wasmesh-admin"]);
    assert!(
        kind("ClusterRole").any(|(_, d)| d["metadata"]["name"] == "event-watcher"),
        "the seed's ClusterRole"
    );
    let (_, config) = kind("ConfigMap").next().expect("a ConfigMap");
    for (name, text) in config["data"].as_mapping().expect("data") {
        let name = name.as_str().expect("key");
        let docs = wasmesh_core::yaml::parse_documents(name, text.as_str().expect("text"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(docs.len() >= 4, "{name}: the hello world's objects");
    }
}
