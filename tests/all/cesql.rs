//! CESQL: every case of the CloudEvents SQL TCK (read from ../shared/conformance/cesql-tck at
//! test time), and triggers filtering with CESQL through the real broker.

use std::borrow::Cow;
use std::time::Duration;

use serde_json::Value as Json;
use wasmesh_core::cesql::{Attr, Attributes, ErrorKind, Expression, Value};

use crate::harness::{Capture, Serve, broker_with_triggers, ce_headers, repo, wait_for};

/// An event as the TCK writes it: a JSON object, attribute values as given (strings, and
/// booleans and integers for extensions).
struct JsonEvent(serde_json::Map<String, Json>);

impl Attributes for JsonEvent {
    fn get(&self, attr: &Attr) -> Option<Value<'_>> {
        let name = match attr {
            Attr::Id => "id",
            Attr::Source => "source",
            Attr::SpecVersion => "specversion",
            Attr::Type => "type",
            Attr::DataContentType => "datacontenttype",
            Attr::DataSchema => "dataschema",
            Attr::Subject => "subject",
            Attr::Time => "time",
            Attr::Extension(n) => n,
        };
        Some(match self.0.get(name)? {
            Json::String(s) => Value::Str(Cow::Borrowed(s)),
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => Value::Int(n.as_i64().and_then(|i| i32::try_from(i).ok())?),
            other => Value::Str(Cow::Owned(other.to_string())),
        })
    }
}

struct Case {
    file: String,
    name: String,
    expression: String,
    result: Option<Json>,
    error: Option<String>,
    event: serde_json::Map<String, Json>,
}

fn cases() -> Vec<Case> {
    let dir = repo("../shared/conformance/cesql-tck");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (the TCK lives in ../shared)", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read");
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("yaml");
        let doc: Json = serde_json::to_value(doc).expect("json");
        let file = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        for t in doc["tests"].as_array().expect("tests") {
            let mut event = match &t["event"] {
                Json::Object(m) => m.clone(),
                _ => serde_json::json!({
                    "specversion": "1.0", "id": "tck-id", "source": "/tck", "type": "tck.type"
                })
                .as_object()
                .cloned()
                .expect("object"),
            };
            if let Json::Object(over) = &t["eventOverrides"] {
                event.extend(over.clone());
            }
            out.push(Case {
                file: file.clone(),
                name: scalar(&t["name"]),
                expression: scalar(&t["expression"]),
                result: t.get("result").cloned(),
                error: t["error"].as_str().map(str::to_string),
                event,
            });
        }
    }
    out
}

/// A YAML scalar's text: plain `TRUE` or `0` read as a boolean or a number.
fn scalar(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Bool(_) | Json::Number(_) => v.to_string(),
        other => panic!("not a scalar: {other}"),
    }
}

fn same(expected: &Json, got: &Value<'_>) -> bool {
    match (expected, got) {
        (Json::Bool(e), Value::Bool(g)) => e == g,
        (Json::Number(e), Value::Int(g)) => e.as_i64() == Some(i64::from(*g)),
        (Json::String(e), Value::Str(g)) => e == g,
        _ => false,
    }
}

/// Runs one case against `attrs`; `Err` says how it failed.
fn run(case: &Case, attrs: &dyn Attributes) -> Result<(), String> {
    let expr = match Expression::parse(&case.expression) {
        Ok(e) => e,
        Err(e) if case.error.as_deref() == Some("parse") => {
            assert!(e.column >= 1 && !e.message.is_empty());
            return Ok(());
        }
        Err(e) => return Err(format!("does not parse: {e}")),
    };
    if case.error.as_deref() == Some("parse") {
        return Err("parsed, but the TCK expects a parse error".into());
    }
    let got = expr.evaluate(attrs);
    // The filter fast path agrees with the evaluator: passes exactly when the value is `true`
    // and there is no error.
    let passes = got.error.is_none() && got.value == Value::Bool(true);
    if expr.matches(attrs) != passes {
        return Err(format!(
            "the filter path says {}, the evaluator {passes}",
            !passes
        ));
    }
    let error = got.error.map(ErrorKind::name);
    if error != case.error.as_deref() {
        return Err(format!(
            "error {error:?}, expected {:?} (value {:?})",
            case.error, got.value
        ));
    }
    if let Some(want) = &case.result
        && !same(want, &got.value)
    {
        return Err(format!("value {:?}, expected {want}", got.value));
    }
    Ok(())
}

#[test]
fn every_cesql_tck_case_passes() {
    let cases = cases();
    assert!(cases.len() > 100, "found only {} TCK cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        if let Err(why) = run(case, &JsonEvent(case.event.clone())) {
            failures.push(format!(
                "{} / {}: `{}`: {why}",
                case.file, case.name, case.expression
            ));
        }
    }
    let files: std::collections::BTreeSet<_> = cases.iter().map(|c| &c.file).collect();
    println!(
        "CESQL TCK: {} of {} cases passed, in {} files",
        cases.len() - failures.len(),
        cases.len(),
        files.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same cases through the broker's own event type (cloudevents-sdk). It keeps `time` as an
/// instant and writes it in UTC, so a time given with another offset reads back in UTC: such a
/// case counts when the two name the same instant.
#[test]
fn every_cesql_tck_case_passes_on_cloudevents_sdk_events() {
    let cases = cases();
    let mut failures = Vec::new();
    let mut normalized = 0;
    for case in &cases {
        let json = serde_json::to_vec(&case.event).expect("json");
        let event = wasmesh_core::event::parse_json(&json)
            .unwrap_or_else(|e| panic!("{}: the TCK's event is invalid: {e}", case.name));
        if let Err(why) = run(case, &event) {
            let same_instant = case
                .result
                .as_ref()
                .and_then(Json::as_str)
                .is_some_and(|want| {
                    let got = Expression::parse(&case.expression)
                        .map(|e| e.evaluate(&event).value.to_string())
                        .unwrap_or_default();
                    match (
                        chrono::DateTime::parse_from_rfc3339(want),
                        chrono::DateTime::parse_from_rfc3339(&got),
                    ) {
                        (Ok(a), Ok(b)) => a == b,
                        _ => false,
                    }
                });
            if same_instant {
                normalized += 1;
            } else {
                failures.push(format!("{} / {}: {why}", case.file, case.name));
            }
        }
    }
    println!(
        "CESQL TCK on cloudevents-sdk events: {} of {} passed ({normalized} with a time read back in UTC)",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(normalized <= 1, "only the one time case may differ");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn cesql_triggers_filter_through_the_broker() {
    let sub = Capture::ok();
    let yaml = broker_with_triggers(&[
        (
            "knative",
            "  filters:\n  - cesql: \"type LIKE 'dev.knative.%' AND EXISTS subject\"\n",
            &sub.url("/knative"),
        ),
        (
            "mixed",
            "  filters:\n  - prefix: {type: com.}\n  - not:\n      cesql: \"INT(priority) < 5\"\n",
            &sub.url("/mixed"),
        ),
        (
            "listed",
            "  filters:\n  - any:\n    - cesql: \"source IN ('/a', '/b', '/c')\"\n    - exact: {type: always}\n",
            &sub.url("/listed"),
        ),
    ]);
    let serve = Serve::start(&[("b.yaml", &yaml)], &[]);
    let send = |id: &str, headers: &[(&str, &str)]| {
        let mut h = ce_headers(id, "unused");
        h.retain(|(k, _)| !headers.iter().any(|(hk, _)| hk == k));
        h.extend_from_slice(headers);
        let r = serve.request("POST", "/default/default", &h, b"{}");
        assert_eq!(r.status, 202, "{}", r.text());
    };
    send("k1", &[("ce-type", "dev.knative.x"), ("ce-subject", "s")]);
    send("k2", &[("ce-type", "dev.knative.x")]);
    send("k3", &[("ce-type", "com.x"), ("ce-subject", "s")]);
    send("m1", &[("ce-type", "com.y"), ("ce-priority", "9")]);
    send("m2", &[("ce-type", "com.y"), ("ce-priority", "1")]);
    // No priority: a missing attribute is an error, so the cesql filter fails and `not` passes.
    send("m3", &[("ce-type", "com.y")]);
    send("l1", &[("ce-type", "t"), ("ce-source", "/b")]);
    send("l2", &[("ce-type", "t"), ("ce-source", "/z")]);
    send("l3", &[("ce-type", "always"), ("ce-source", "/z")]);
    let ids = |path: &str| {
        let mut v: Vec<String> = sub
            .on(path)
            .iter()
            .map(|c| c.headers["ce-id"].clone())
            .collect();
        v.sort();
        v
    };
    wait_for("deliveries", Duration::from_secs(20), || {
        ids("/knative").len() == 1 && ids("/mixed").len() == 3 && ids("/listed").len() == 2
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ids("/knative"), ["k1"]);
    assert_eq!(ids("/mixed"), ["k3", "m1", "m3"]);
    assert_eq!(ids("/listed"), ["l1", "l3"]);
}

/// `wasmesh serve` on one trigger with `filters`; returns its exit code and stderr (it exits at
/// once when the files do not validate).
fn serve_refuses(filters: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = broker_with_triggers(&[("bad", filters, "http://127.0.0.1:1/")]);
    std::fs::write(dir.path().join("b.yaml"), yaml).expect("yaml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasmesh"))
        .args([
            "serve",
            "--admin-listen",
            "off",
            "--listen",
            "127.0.0.1:0",
            "-f",
        ])
        .arg(dir.path())
        .output()
        .expect("wasmesh");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_cesql_parse_error_refuses_the_trigger_with_its_position() {
    let (code, err) = serve_refuses("  filters:\n  - cesql: \"type = 'a' AND (source = 'b'\"\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("b.yaml:") && err.contains("spec.filters[0]: CESQL: column 29: expected `)`"),
        "{err}"
    );
    // A function that does not exist is refused too, inside `not` as well.
    let (code, err) = serve_refuses("  filters:\n  - not:\n      cesql: \"NOPE(type) = 'a'\"\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no function NOPE with 1 argument(s)"), "{err}");
}
