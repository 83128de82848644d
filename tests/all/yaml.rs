//! Declarations: the seed's YAML files parse unchanged, and bad files get golden errors (each
//! `tests/yaml/invalid/<case>.yaml` beside the `<case>.err` it must produce).

use wasmesh_core::resources::Resource;

use crate::harness::repo;

/// The YAML blocks of the seed document that declare Kubernetes objects.
fn seed_blocks() -> Vec<String> {
    let dir = repo("../shared/seed");
    let mut blocks = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("../shared/seed") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("seed text");
        let mut parts = text.split("```");
        while let (Some(_), Some(block)) = (parts.next(), parts.next()) {
            let block = block
                .trim_start_matches(|c: char| c.is_alphanumeric())
                .trim_start();
            // The seed's service.yaml has `image: {yourrepo}/...`, a placeholder that is not
            // valid YAML (kubectl refuses it too); wasmesh replaces it with a Function anyway.
            if block.starts_with("apiVersion:") && !block.contains("{yourrepo}") {
                blocks.push(block.to_string());
            }
        }
    }
    blocks
}

#[test]
fn the_seeds_yaml_files_parse_unchanged() {
    let blocks = seed_blocks();
    assert_eq!(blocks.len(), 3, "serviceaccount, k8s-events and trigger");
    let mut kinds = Vec::new();
    for b in &blocks {
        let docs =
            wasmesh_core::yaml::parse_documents("seed", b).unwrap_or_else(|e| panic!("{e}\n{b}"));
        kinds.extend(docs.into_iter().map(|d| d.resource.id()));
    }
    assert_eq!(
        kinds,
        [
            "ServiceAccount/events-sa",
            "ClusterRole/event-watcher",
            "ClusterRoleBinding/k8s-ra-event-watcher",
            "ApiServerSource/default/testevents",
            "Trigger/default/testevents-trigger",
        ]
    );
    // manifests/hello carries the seed's files verbatim.
    for (file, block) in [
        ("serviceaccount.yaml", 0),
        ("k8s-events.yaml", 1),
        ("trigger.yaml", 2),
    ] {
        let ours = std::fs::read_to_string(repo("manifests/hello").join(file)).expect("manifest");
        assert_eq!(ours.trim(), blocks[block].trim(), "{file} is the seed's");
    }
    let trigger = wasmesh_core::yaml::parse_documents("t", &blocks[2]).expect("valid");
    let Resource::Trigger(t) = &trigger[0].resource else {
        panic!("a trigger")
    };
    assert_eq!(t.spec.broker, "default");
    assert_eq!(
        t.spec
            .subscriber
            .reference
            .as_ref()
            .map(|r| r.kind.as_str()),
        Some("Service")
    );
}

/// A file saved on Windows (a UTF-8 byte order mark, CRLF line ends) reads as the same objects,
/// at the same lines, as kubectl reads it.
#[test]
fn a_byte_order_mark_and_crlf_line_ends_change_nothing() {
    for b in seed_blocks() {
        let plain = wasmesh_core::yaml::parse_documents("f", &b).expect("valid");
        let windows = format!("\u{feff}{}", b.replace('\n', "\r\n"));
        let read = wasmesh_core::yaml::parse_documents("f", &windows)
            .unwrap_or_else(|e| panic!("{e}\n{b}"));
        assert_eq!(read, plain);
    }
    // An error in such a file is still placed where it is.
    let bad = "\u{feff}apiVersion: eventing.knative.dev/v1\r\nkind: Broker\r\nmetadata:\r\n  name: b\r\n  colour: red\r\n";
    let err = wasmesh_core::yaml::parse_documents("f", bad).expect_err("unknown field");
    assert!(err.to_string().starts_with("f:5:3: metadata"), "{err}");
}

/// What `kubectl get ... -o yaml` writes, a `v1` `List` of objects with their status and
/// server-set metadata, is read as its items (as `kubectl apply -f` reads it): moving objects
/// out of a cluster takes no editing. Each item is located where it is written; a List in JSON
/// (flow style) works too.
#[test]
fn a_kubectl_list_is_read_as_its_items() {
    let exported = r#"apiVersion: v1
items:
- apiVersion: eventing.knative.dev/v1
  kind: Broker
  metadata:
    annotations:
      eventing.knative.dev/broker.class: MTChannelBasedBroker
    creationTimestamp: "2024-01-01T00:00:00Z"
    generation: 1
    name: default
    namespace: default
    resourceVersion: "12345"
    uid: 0b7c1f2e-1111-2222-3333-444455556666
  spec:
    delivery:
      retry: 10
  status:
    address:
      url: http://broker-ingress.knative-eventing.svc.cluster.local/default/default
    conditions:
    - status: "True"
      type: Ready

- apiVersion: eventing.knative.dev/v1
  kind: Trigger
  metadata:
    name: t
    namespace: default
  spec:
    broker: default
    subscriber:
      uri: http://127.0.0.1:9/
kind: List
metadata:
  resourceVersion: ""
"#;
    let docs = wasmesh_core::yaml::parse_documents("export.yaml", exported)
        .unwrap_or_else(|e| panic!("{e}"));
    let found: Vec<(String, usize)> = docs.iter().map(|d| (d.resource.id(), d.line)).collect();
    assert_eq!(
        found,
        [
            ("Broker/default/default".to_string(), 3),
            ("Trigger/default/t".to_string(), 24)
        ]
    );
    // Items indented under `items:`, after another document.
    let indented = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: other\n---\napiVersion: v1\nkind: List\nitems:\n  - apiVersion: eventing.knative.dev/v1\n    kind: Broker\n    metadata:\n      name: b\n      namespace: other\n";
    let docs =
        wasmesh_core::yaml::parse_documents("i.yaml", indented).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(docs[1].resource.id(), "Broker/other/b");
    assert_eq!(docs[1].line, 9);
    let json = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"eventing.knative.dev/v1","kind":"Broker","metadata":{"name":"j","namespace":"default"}}]}"#;
    let docs =
        wasmesh_core::yaml::parse_documents("j.json", json).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(docs[0].resource.id(), "Broker/default/j");
    // An empty List declares nothing; items that are not a list are refused.
    assert!(
        wasmesh_core::yaml::parse_documents("e.yaml", "apiVersion: v1\nkind: List\nitems: []\n")
            .expect("empty")
            .is_empty()
    );
    let err =
        wasmesh_core::yaml::parse_documents("x.yaml", "apiVersion: v1\nkind: List\nitems: 3\n")
            .expect_err("refused");
    assert!(
        err.to_string()
            .starts_with("x.yaml:3:1: items: expected a list"),
        "{err}"
    );
}

#[test]
fn bad_yaml_gets_golden_errors() {
    let dir = repo("tests/yaml/invalid");
    let mut cases = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("cases")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let name = format!("{}", path.file_name().expect("name").to_string_lossy());
        let text = std::fs::read_to_string(&path).expect("case");
        let expected = std::fs::read_to_string(path.with_extension("err"))
            .expect("expected .err beside the case");
        let got = match wasmesh_core::yaml::parse_documents(&name, &text) {
            Ok(docs) => panic!("{name} must be refused, parsed {} documents", docs.len()),
            Err(e) => e.to_string(),
        };
        assert_eq!(got.trim(), expected.trim(), "case {name}");
        cases += 1;
    }
    assert!(cases >= 8, "found {cases} cases");
}

/// `serve -f` of a directory with no declarations in it (a wrong path, or files named
/// `.txt`) says so instead of sitting idle without a word.
#[test]
fn serving_a_directory_without_declarations_says_so() {
    let serve = crate::harness::Serve::start(&[("broker.txt", "kind: Broker\n")], &[]);
    serve.wait_log("nothing is declared in");
    assert!(
        serve.stderr().contains("a .yaml or .yml file"),
        "{}",
        serve.stderr()
    );
}
