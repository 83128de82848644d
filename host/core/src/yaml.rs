//! Reading declarations: multi-document YAML of Knative's kinds (and wasmesh's `Function`).
//! Every error names the file, the line and column, the field path and what was expected.

use std::fmt;

use serde::de::DeserializeOwned;

use crate::resources::{BrokerSpec, NamespaceObject, Object, Resource};

/// A parsed object and where it was declared.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    /// The file, as given.
    pub file: String,
    /// The line (1-based) where the object's document starts.
    pub line: usize,
    /// The object.
    pub resource: Resource,
}

/// One error in a declaration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct YamlError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// The field path (`spec.subscriber.ref.kind`), empty for the document itself.
    pub path: String,
    pub message: String,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every error of one or more files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlErrors(pub Vec<YamlError>);

impl fmt::Display for YamlErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for YamlErrors {}

/// The Trigger annotation that asks for its namespace's `default` Broker (Knative's sugar).
pub const TRIGGER_INJECTION: &str = "eventing.knative.dev/injection";

const NAMESPACE: &[&str] = &["v1"];
const EVENTING: &[&str] = &[
    "eventing.knative.dev/v1",
    "eventing.knative.dev/v1beta1",
    "eventing.knative.dev/v1alpha1",
];
const FUNCTION: &[&str] = &["wasmesh.dev/v1alpha1"];
const PING: &[&str] = &["sources.knative.dev/v1", "sources.knative.dev/v1beta2"];
const APISERVER: &[&str] = &[
    "sources.knative.dev/v1",
    "sources.knative.dev/v1beta1",
    "sources.eventing.knative.dev/v1alpha1",
];

/// Deeper flow nesting is refused before the YAML parser sees it: libyaml's scanner spends time
/// quadratic in the nesting (a 4 MiB document of `[` would take minutes), and the parser refuses
/// more than 128 levels anyway.
const MAX_FLOW_NESTING: usize = 1000;

/// Where `[` and `{` first nest more than `limit` deep, counting every bracket (those inside
/// strings and comments too: a document needs that many unclosed ones to be refused by mistake).
fn flow_nesting_beyond(doc: &str, limit: usize) -> Option<(usize, usize)> {
    let mut depth = 0usize;
    for (i, line) in doc.lines().enumerate() {
        for (j, c) in line.chars().enumerate() {
            match c {
                '[' | '{' => {
                    depth += 1;
                    if depth > limit {
                        return Some((i + 1, j + 1));
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    None
}

/// Parses every document of one file. `file` is how errors name it.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Located>, YamlErrors> {
    // A UTF-8 byte order mark (a file saved by Windows' editors), as kubectl ignores it.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (first_line, doc) in split_documents(text) {
        // A List's items are read as documents of their own, where they are written.
        let parts = match list_items(doc) {
            None => vec![(first_line, std::borrow::Cow::Borrowed(doc))],
            Some(Ok(items)) => items
                .into_iter()
                .map(|(line, item)| (first_line + line, std::borrow::Cow::Owned(item)))
                .collect(),
            Some(Err((line, message))) => {
                errors.push(YamlError {
                    file: file.to_string(),
                    line: first_line + line,
                    column: 1,
                    path: "items".into(),
                    message,
                });
                continue;
            }
        };
        for (first_line, doc) in parts {
            match parse_document(file, first_line, &doc) {
                Ok(Some(resource)) => out.push(Located {
                    file: file.to_string(),
                    line: first_line + 1,
                    resource,
                }),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(YamlErrors(errors))
    }
}

/// The items of a document that is a `v1` `List` (what `kubectl get -o yaml` writes, and what
/// `kubectl apply -f` takes): each with the 0-based line of the document where it starts and
/// its text, left where it is written (its `-` turned into a space), so that the lines and
/// columns of errors in it stay right. `None` when the document is not a List; an error (the
/// line, 1-based, and why) when its `items` are not a list.
#[allow(clippy::type_complexity)]
fn list_items(doc: &str) -> Option<Result<Vec<(usize, String)>, (usize, String)>> {
    // Too deep a document is refused by `parse_document` before any parsing (see
    // `MAX_FLOW_NESTING`): not parsed here either.
    if !doc.contains("List") || flow_nesting_beyond(doc, MAX_FLOW_NESTING).is_some() {
        return None;
    }
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc).ok()?;
    let map = value.as_mapping()?;
    if map.get("kind")?.as_str()? != "List" || map.get("apiVersion")?.as_str()? != "v1" {
        return None;
    }
    let items_line = line_of(doc, "items");
    let items = match map.get("items") {
        None | Some(serde_yaml_ng::Value::Null) => return Some(Ok(Vec::new())),
        Some(serde_yaml_ng::Value::Sequence(items)) => items,
        Some(_) => {
            return Some(Err((
                items_line.0,
                "expected a list of objects (apiVersion, kind, metadata, ...)".into(),
            )));
        }
    };
    let lines: Vec<&str> = doc.split_inclusive('\n').collect();
    let mut found: Vec<(usize, String)> = Vec::new();
    if let Some(start) = lines.iter().position(|l| l.starts_with("items:")) {
        // Block style: each item starts with `-` at the indentation of the first one, and
        // runs until the next such `-` or a line less indented (the List's next key).
        let mut dash: Option<usize> = None;
        for (i, line) in lines.iter().enumerate().skip(start + 1) {
            let body = line.trim_start();
            if body.trim_end().is_empty() || body.starts_with('#') {
                if let Some((_, text)) = found.last_mut() {
                    text.push_str(line);
                }
                continue;
            }
            let indent = line.len() - body.len();
            let is_dash = body.starts_with("- ") || body.trim_end() == "-";
            match dash {
                None if is_dash => dash = Some(indent),
                None => break,
                Some(d) if indent < d || (indent == d && !is_dash) => break,
                Some(_) => {}
            }
            if Some(indent) == dash && is_dash {
                found.push((i, format!("{} {}", &line[..indent], &line[indent + 1..])));
            } else if let Some((_, text)) = found.last_mut() {
                text.push_str(line);
            }
        }
    }
    if found.len() != items.len() {
        // Flow style (`items: [...]`, JSON): each item as YAML of its own, at the List's line.
        found = items
            .iter()
            .map(|item| {
                (
                    items_line.0.saturating_sub(1),
                    serde_yaml_ng::to_string(item).unwrap_or_default(),
                )
            })
            .collect();
    }
    Some(Ok(found))
}

/// Splits at `---` lines; yields (0-based index of the document's first line, text).
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start_line = 0;
    let mut start_byte = 0;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") {
            docs.push((start_line, &text[start_byte..offset]));
            start_line = i + 1;
            start_byte = offset + line.len();
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start_byte..]));
    docs
}

fn parse_document(file: &str, first_line: usize, doc: &str) -> Result<Option<Resource>, YamlError> {
    let err_at = |line: usize, column: usize, path: &str, message: String| YamlError {
        file: file.to_string(),
        line: first_line + line,
        column,
        path: path.to_string(),
        message,
    };
    if let Some((line, column)) = flow_nesting_beyond(doc, MAX_FLOW_NESTING) {
        return Err(err_at(
            line,
            column,
            "",
            format!("`[` and `{{` nest more than {MAX_FLOW_NESTING} levels deep"),
        ));
    }
    let value: serde_yaml_ng::Value = match serde_yaml_ng::from_str(doc) {
        Ok(v) => v,
        Err(e) => {
            let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            let mut message = strip_location(&e.to_string());
            let at = doc
                .lines()
                .nth(line.saturating_sub(1))
                .and_then(|l| l.chars().nth(column.saturating_sub(1)));
            if at == Some('\t') {
                message.push_str(" (a tab: YAML indents with spaces only)");
            }
            return Err(err_at(line, column, "", message));
        }
    };
    let map = match &value {
        serde_yaml_ng::Value::Null => return Ok(None),
        serde_yaml_ng::Value::Mapping(m) => m,
        _ => {
            return Err(err_at(
                1,
                1,
                "",
                "expected a mapping with apiVersion, kind and metadata".into(),
            ));
        }
    };
    let field = |name: &str| -> Result<String, YamlError> {
        match map.get(name) {
            Some(serde_yaml_ng::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(err_at(1, 1, name, "expected a string".into())),
            None => Err(err_at(1, 1, name, "missing field".into())),
        }
    };
    let api_version = field("apiVersion")?;
    let kind = field("kind")?;
    let typed = |versions: &[&str]| -> Result<(), YamlError> {
        if versions.contains(&api_version.as_str()) {
            Ok(())
        } else {
            Err(err_at(
                1,
                1,
                "apiVersion",
                format!(
                    "apiVersion `{api_version}` of kind {kind} is not supported; expected one of: {}",
                    versions.join(", ")
                ),
            ))
        }
    };
    if let Some(why) = ignored_reason(&kind, &api_version) {
        return Ok(Some(Resource::Ignored {
            kind,
            name: name_of(map),
            why,
        }));
    }
    let resource = match kind.as_str() {
        "Namespace" => {
            typed(NAMESPACE)?;
            let ns = typed_parse::<NamespaceObject>(file, first_line, doc)?;
            // A namespace's name is a DNS-1123 label (no dots), as other objects' namespace is.
            if let Some(why) = crate::resources::dns_label_problem(&ns.metadata.name) {
                let (line, column) = line_of(doc, "name");
                return Err(err_at(line, column, "metadata.name", why));
            }
            Resource::Namespace(ns)
        }
        "Broker" => {
            typed(EVENTING)?;
            // A Broker may have no spec at all.
            let o: Object<Option<BrokerSpec>> = typed_parse(file, first_line, doc)?;
            Resource::Broker(Object {
                api_version: o.api_version,
                kind: o.kind,
                metadata: o.metadata,
                spec: o.spec.unwrap_or_default(),
                status: o.status,
            })
        }
        "Trigger" => {
            typed(EVENTING)?;
            let t: Object<crate::resources::TriggerSpec> = typed_parse(file, first_line, doc)?;
            // Knative's rules for the annotation that asks for the namespace's default Broker.
            if let Some(v) = t.metadata.annotations.get(TRIGGER_INJECTION) {
                let path = format!("metadata.annotations.{TRIGGER_INJECTION}");
                let (line, column) = line_of(doc, TRIGGER_INJECTION);
                let why = if v != "enabled" && v != "disabled" {
                    Some(format!("`{v}`: use enabled or disabled"))
                } else if v == "enabled" && t.spec.broker != "default" {
                    Some(format!(
                        "only the `default` broker is created this way, and this trigger's is `{}`",
                        t.spec.broker
                    ))
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(err_at(line, column, &path, why));
                }
            }
            Resource::Trigger(t)
        }
        "Function" => {
            typed(FUNCTION)?;
            Resource::Function(typed_parse::<Object<_>>(file, first_line, doc)?)
        }
        "PingSource" => {
            typed(PING)?;
            let p: Object<crate::resources::PingSourceSpec> = typed_parse(file, first_line, doc)?;
            if let Err(e) = crate::ping::Ping::check(&p.spec) {
                let key = e.path.rsplit('.').next().unwrap_or_default();
                let (line, column) = key_position(doc, key);
                return Err(err_at(line, column, e.path, e.message));
            }
            Resource::PingSource(p)
        }
        "ApiServerSource" => {
            typed(APISERVER)?;
            let s: Object<crate::resources::ApiServerSourceSpec> =
                typed_parse(file, first_line, doc)?;
            if s.spec.resources.is_empty() {
                let (line, column) = line_of(doc, "resources");
                return Err(err_at(
                    line,
                    column,
                    "spec.resources",
                    "at least one resource to watch is needed".into(),
                ));
            }
            Resource::ApiServerSource(s)
        }
        other => {
            let containers = matches!(
                other,
                "Deployment" | "Pod" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job"
            );
            return Err(err_at(
                1,
                1,
                "kind",
                format!(
                    "kind `{other}` is not supported{}; expected one of: Broker, Trigger, \
                     Function, PingSource, ApiServerSource, Namespace (and RBAC kinds, Services, \
                     ConfigMaps and Secrets, which are ignored)",
                    if containers {
                        ": wasmesh runs Wasm Functions, not containers (declare a Function, \
                         wasmesh.dev/v1alpha1, named like the Service a Trigger refers to)"
                    } else {
                        ""
                    }
                ),
            ));
        }
    };
    Ok(Some(resource))
}

/// The line and column of the first `text` in `doc` (1, 1 when it is not there).
fn line_of(doc: &str, text: &str) -> (usize, usize) {
    doc.lines()
        .enumerate()
        .find_map(|(i, l)| l.find(text).map(|c| (i + 1, c + 1)))
        .unwrap_or((1, 1))
}

/// Where the key `key` of `spec` is written in `doc` (`key:` in block style, `{key:` or
/// `, key:` in flow style): the first such place from the top-level `spec:` on (so that a label
/// of the same name in `metadata` is passed over), else that of the text `key`.
fn key_position(doc: &str, key: &str) -> (usize, usize) {
    let spec = doc
        .lines()
        .position(|l| l.starts_with("spec:"))
        .unwrap_or(0);
    doc.lines()
        .enumerate()
        .skip(spec)
        .find_map(|(i, l)| {
            l.match_indices(key).find_map(|(c, _)| {
                let before = l[..c].trim_end();
                let opens = before.is_empty() || before.ends_with('{') || before.ends_with(',');
                let after = l[c + key.len()..].trim_start();
                (opens && after.starts_with(':')).then_some((i + 1, c + 1))
            })
        })
        .unwrap_or_else(|| line_of(doc, key))
}

/// Why a kind that only means something inside Kubernetes is accepted and not run; `None` for
/// the kinds wasmesh runs and those it refuses.
fn ignored_reason(kind: &str, api_version: &str) -> Option<&'static str> {
    Some(match kind {
        "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding" => {
            "only meaningful inside Kubernetes"
        }
        // Knative's event registry: descriptions of event types, with no effect on delivery.
        "EventType" if api_version.starts_with("eventing.knative.dev/") => {
            "an entry of Knative's event registry, which wasmesh does not keep"
        }
        // A Broker's `spec.config` names a ConfigMap of Knative's own settings (its channel, its
        // class's defaults); wasmesh's flags say what those would.
        "ConfigMap" if api_version == "v1" => {
            "configures Knative's own components inside Kubernetes"
        }
        "Secret" if api_version == "v1" => "only meaningful inside Kubernetes",
        "Service" if api_version.starts_with("serving.knative.dev/") => {
            "a Knative Service runs a container; wasmesh runs a Function of the same name"
        }
        // A plain Kubernetes Service in front of a Deployment, as Knative's samples deploy
        // event-display: a Trigger's ref to it resolves to the Function of the same name.
        "Service" if api_version == "v1" => {
            "a Kubernetes Service fronts containers; wasmesh runs a Function of the same name"
        }
        _ => return None,
    })
}

fn name_of(map: &serde_yaml_ng::Mapping) -> String {
    map.get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("")
        .to_string()
}

fn typed_parse<T: DeserializeOwned>(
    file: &str,
    first_line: usize,
    doc: &str,
) -> Result<T, YamlError> {
    let de = serde_yaml_ng::Deserializer::from_str(doc);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let (line, column) = inner.location().map_or((1, 1), |l| (l.line(), l.column()));
        let (line, column) = locate_key(doc, line, column, &path);
        let mut message = strip_location(&inner.to_string());
        // serde_yaml_ng prefixes the path of the enclosing value; ours is more precise, say it once.
        if let Some((prefix, rest)) = message.split_once(": ")
            && !prefix.contains(' ')
            && path.starts_with(prefix)
        {
            message = rest.to_string();
        }
        YamlError {
            file: file.to_string(),
            line: first_line + line,
            column,
            path: if path == "." { String::new() } else { path },
            message,
        }
    })
}

/// Where the field `path` ends in is written, searched from the location the parser gave: for a
/// value refused after it was read (a duration, a URI), the parser points at the start of the
/// enclosing mapping, not at the field. The mapping's keys are at the given column (block
/// style) or on that line (flow style); the location is kept when the key is not found.
fn locate_key(doc: &str, line: usize, column: usize, path: &str) -> (usize, usize) {
    let Some(key) = path
        .rsplit('.')
        .next()
        .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    else {
        return (line, column);
    };
    let lines: Vec<&str> = doc.lines().collect();
    let indent = column.saturating_sub(1);
    let starts_key = |text: &str| {
        text.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with(':'))
    };
    for (i, text) in lines.iter().enumerate().skip(line.saturating_sub(1)) {
        let body = text.trim_start();
        let here = text.len() - body.len();
        if i + 1 > line && !body.is_empty() && !body.starts_with('#') && here < indent {
            break; // Past the mapping.
        }
        if here == indent && starts_key(body) {
            return (i + 1, column);
        }
        if i + 1 == line {
            // Flow style: `{retry: 3, timeout: PT0S}`.
            let mut at = 0;
            while let Some(found) = text[at..].find(key) {
                let k = at + found;
                let before = text[..k].trim_end();
                if (before.ends_with('{') || before.ends_with(',')) && starts_key(&text[k..]) {
                    return (line, k + 1);
                }
                at = k + key.len();
            }
        }
    }
    (line, column)
}

fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}
