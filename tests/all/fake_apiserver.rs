//! A fake Kubernetes API server on loopback that speaks the real list/watch protocol for
//! `v1` Events and Pods: discovery (`/api`, `/apis`, `/api/v1`), LIST with `resourceVersion`,
//! `limit` and `continue`, WATCH as a chunked stream of JSON watch events (ADDED, MODIFIED,
//! DELETED, BOOKMARK, ERROR), `410 Gone` for a compacted resourceVersion, dropped connections and
//! 403. wasmesh talks to it through kube-rs's real client, from a kubeconfig.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// One open watch stream: its resource and where its lines go.
type WatchSender = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

#[derive(Default)]
struct State {
    rv: u64,
    /// (plural, namespace, name) -> object
    objects: BTreeMap<(String, String, String), Value>,
    /// Every change: (rv, type, plural, object).
    history: Vec<(u64, &'static str, String, Value)>,
    /// Open watches: resource, label selector, where its lines go.
    watchers: Vec<(String, Option<String>, WatchSender)>,
    compacted_below: u64,
    forbidden: bool,
}

pub(crate) struct FakeApiServer {
    pub(crate) addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

type Body = BoxBody<Bytes, Infallible>;

fn json_body(status: u16, v: Value) -> hyper::Response<Body> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl FakeApiServer {
    pub(crate) fn start(first_rv: u64) -> FakeApiServer {
        let state = Arc::new(Mutex::new(State {
            rv: first_rv,
            ..Default::default()
        }));
        let s = Arc::clone(&state);
        let (runtime, addr) =
            crate::harness::loopback_server(move |req: hyper::Request<hyper::body::Incoming>| {
                let answer = handle(&s, req);
                async move { answer }
            });
        FakeApiServer {
            addr,
            state,
            _runtime: runtime,
        }
    }

    /// A kubeconfig pointing at this server, without credentials.
    pub(crate) fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nobody\n    namespace: default\ncurrent-context: fake\nusers:\n- name: nobody\n  user: {{}}\n",
            self.addr
        );
        std::fs::write(&path, text).expect("kubeconfig");
        path
    }

    fn change(&self, ty: &'static str, plural: &str, mut obj: Value, keep_rv: bool) -> Value {
        let mut st = self.state.lock().expect("lock");
        st.rv += 1;
        let rv = st.rv;
        if !keep_rv {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        }
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = obj["metadata"]["name"].as_str().expect("name").to_string();
        let key = (plural.to_string(), ns, name);
        let old = st.objects.get(&key).cloned();
        if ty == "DELETED" {
            st.objects.remove(&key);
        } else {
            st.objects.insert(key, obj.clone());
        }
        st.history.push((rv, ty, plural.to_string(), obj.clone()));
        // A watch with a label selector sees an object that starts matching as ADDED and one
        // that stops matching as DELETED, as the real API server does.
        st.watchers.retain(|(p, sel, tx)| {
            if p != plural {
                return true;
            }
            let before = old.as_ref().is_some_and(|o| labels_match(o, sel.as_ref()));
            let now = labels_match(&obj, sel.as_ref());
            let seen_as = match (ty, before, now) {
                ("DELETED", _, true) => "DELETED",
                ("DELETED", _, false) => return true,
                (_, true, true) => ty,
                (_, false, true) => "ADDED",
                (_, true, false) => "DELETED",
                (_, false, false) => return true,
            };
            let line = Bytes::from(format!("{}\n", json!({"type": seen_as, "object": obj})));
            tx.send(Ok(Frame::data(line))).is_ok()
        });
        obj
    }

    /// Adds an object; the server gives it the next resourceVersion unless `keep_rv`.
    pub(crate) fn add(&self, plural: &str, obj: Value, keep_rv: bool) -> Value {
        self.change("ADDED", plural, obj, keep_rv)
    }

    pub(crate) fn modify(&self, plural: &str, name: &str, f: impl FnOnce(&mut Value)) -> Value {
        let mut obj = self.get(plural, name);
        f(&mut obj);
        self.change("MODIFIED", plural, obj, false)
    }

    pub(crate) fn delete(&self, plural: &str, name: &str) -> Value {
        let obj = self.get(plural, name);
        self.change("DELETED", plural, obj, true)
    }

    fn get(&self, plural: &str, name: &str) -> Value {
        let st = self.state.lock().expect("lock");
        st.objects
            .iter()
            .find(|((p, _, n), _)| p == plural && n == name)
            .map(|(_, v)| v.clone())
            .expect("object exists")
    }

    /// Drops every open watch (as a load balancer timing out would).
    pub(crate) fn drop_watches(&self) {
        self.state.lock().expect("lock").watchers.clear();
    }

    /// Forgets history up to now: watches resumed from an older resourceVersion get 410 Gone.
    pub(crate) fn compact(&self) {
        let mut st = self.state.lock().expect("lock");
        st.compacted_below = st.rv + 1;
        st.history.clear();
        st.watchers.clear();
    }

    /// Answers 403 to every list and watch while true.
    pub(crate) fn forbid(&self, on: bool) {
        let mut st = self.state.lock().expect("lock");
        st.forbidden = on;
        st.watchers.clear();
    }

    /// How many watch connections on `plural` are open.
    pub(crate) fn watchers_of(&self, plural: &str) -> usize {
        let mut st = self.state.lock().expect("lock");
        st.watchers.retain(|(_, _, tx)| !tx.is_closed());
        st.watchers.iter().filter(|(p, _, _)| p == plural).count()
    }

    /// How many watch connections are open.
    pub(crate) fn watchers(&self) -> usize {
        let mut st = self.state.lock().expect("lock");
        st.watchers.retain(|(_, _, tx)| !tx.is_closed());
        st.watchers.len()
    }
}

fn query(req: &hyper::Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned(),
            )
        })
        .collect()
}

fn resources() -> Value {
    let r = |name: &str, kind: &str| {
        json!({"name": name, "singularName": kind.to_lowercase(), "namespaced": true, "kind": kind,
               "verbs": ["get", "list", "watch"]})
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
           "resources": [r("events", "Event"), r("pods", "Pod"),
                         {"name": "namespaces", "singularName": "namespace", "namespaced": false,
                          "kind": "Namespace", "verbs": ["get", "list", "watch"]}]})
}

fn labels_match(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => obj["metadata"]["labels"][k].as_str() == Some(v),
        None => obj["metadata"]["labels"].get(term).is_some(),
    })
}

fn handle(
    state: &Arc<Mutex<State>>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Body> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/api" => {
            return json_body(
                200,
                json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            );
        }
        "/apis" => {
            return json_body(
                200,
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
            );
        }
        "/api/v1" => return json_body(200, resources()),
        _ => {}
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /api/v1/namespaces/{ns}/{plural} or /api/v1/{plural}
    let (ns, plural) = match parts.as_slice() {
        ["api", "v1", "namespaces", ns, plural] => (Some(ns.to_string()), plural.to_string()),
        ["api", "v1", plural] => (None, plural.to_string()),
        _ => {
            return json_body(
                404,
                status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        }
    };
    let q = query(&req);
    let mut st = state.lock().expect("lock");
    if st.forbidden {
        let verb = if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
            "watch"
        } else {
            "list"
        };
        return json_body(
            403,
            status(
                403,
                "Forbidden",
                &format!(
                    "{plural} is forbidden: User \"system:serviceaccount:default:events-sa\" cannot {verb} resource \"{plural}\" in API group \"\" in the namespace \"default\""
                ),
            ),
        );
    }
    let in_scope = |k: &(String, String, String), v: &Value| {
        k.0 == plural
            && ns.as_ref().is_none_or(|n| *n == k.1)
            && labels_match(v, q.get("labelSelector"))
    };
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::unbounded_channel();
        if from != 0 && from < st.compacted_below {
            let err = json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from} ({})", st.compacted_below))});
            let _ = tx.send(Ok(Frame::data(Bytes::from(format!("{err}\n")))));
            drop(tx);
        } else {
            for (rv, ty, p, obj) in &st.history {
                if *rv > from && *p == plural && labels_match(obj, q.get("labelSelector")) {
                    let line = json!({"type": ty, "object": obj});
                    let _ = tx.send(Ok(Frame::data(Bytes::from(format!("{line}\n")))));
                }
            }
            let bookmark = json!({"type": "BOOKMARK", "object": {"kind": "Event", "apiVersion": "v1",
                "metadata": {"resourceVersion": st.rv.to_string()}}});
            let _ = tx.send(Ok(Frame::data(Bytes::from(format!("{bookmark}\n")))));
            st.watchers
                .push((plural.clone(), q.get("labelSelector").cloned(), tx));
        }
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        return hyper::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .expect("response");
    }
    // LIST, paginated with limit/continue.
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|(k, v)| in_scope(k, v))
        .map(|(_, v)| v.clone())
        .collect();
    let start: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(usize::MAX);
    let page: Vec<Value> = items.iter().skip(start).take(limit).cloned().collect();
    let mut meta = json!({"resourceVersion": st.rv.to_string()});
    if start + page.len() < items.len() {
        meta["continue"] = json!((start + page.len()).to_string());
    }
    let kind = if plural == "pods" {
        "PodList"
    } else {
        "EventList"
    };
    json_body(
        200,
        json!({"kind": kind, "apiVersion": "v1", "metadata": meta, "items": page}),
    )
}
