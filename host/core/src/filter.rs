//! Trigger filters: Knative's `filter.attributes` and the CloudEvents Subscriptions API dialects
//! of `filters` (exact, prefix, suffix, all, any, not), compiled once when a trigger is applied
//! and evaluated natively on every event, before any Wasm runs.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::SecondsFormat;
use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesReader, Event};
use serde::{Deserialize, Serialize};

use crate::resources::AttributeName;

/// One element of `Trigger.spec.filters`, as declared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawFilterSpec", rename_all = "lowercase")]
pub enum FilterSpec {
    Exact(BTreeMap<AttributeName, String>),
    Prefix(BTreeMap<AttributeName, String>),
    Suffix(BTreeMap<AttributeName, String>),
    All(Vec<FilterSpec>),
    Any(Vec<FilterSpec>),
    Not(Box<FilterSpec>),
    /// Parsed when the spec is read (a bad expression refuses the trigger with its position);
    /// written back as its text.
    Cesql(#[serde(serialize_with = "cesql_text")] Arc<crate::cesql::Expression>),
}

fn cesql_text<S: serde::Serializer>(
    e: &Arc<crate::cesql::Expression>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(e.source())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilterSpec {
    exact: Option<BTreeMap<AttributeName, String>>,
    prefix: Option<BTreeMap<AttributeName, String>>,
    suffix: Option<BTreeMap<AttributeName, String>>,
    all: Option<Vec<FilterSpec>>,
    any: Option<Vec<FilterSpec>>,
    not: Option<Box<FilterSpec>>,
    cesql: Option<String>,
}

impl TryFrom<RawFilterSpec> for FilterSpec {
    type Error = String;

    fn try_from(r: RawFilterSpec) -> Result<Self, String> {
        let mut set = Vec::new();
        if let Some(m) = r.exact {
            set.push(FilterSpec::Exact(check_map("exact", m)?));
        }
        if let Some(m) = r.prefix {
            set.push(FilterSpec::Prefix(check_map("prefix", m)?));
        }
        if let Some(m) = r.suffix {
            set.push(FilterSpec::Suffix(check_map("suffix", m)?));
        }
        // Knative refuses an empty `all` (always true) or `any` (never true): a mistake.
        if let Some(v) = r.all {
            set.push(FilterSpec::All(nested("all", v)?));
        }
        if let Some(v) = r.any {
            set.push(FilterSpec::Any(nested("any", v)?));
        }
        if let Some(f) = r.not {
            set.push(FilterSpec::Not(f));
        }
        if let Some(expr) = r.cesql {
            set.push(FilterSpec::Cesql(Arc::new(
                crate::cesql::Expression::parse_filter(&expr)?,
            )));
        }
        match set.len() {
            1 => Ok(set.remove(0)),
            0 => Err(
                "a filter needs exactly one of exact, prefix, suffix, all, any, not, cesql".into(),
            ),
            _ => Err(
                "a filter has exactly one dialect: exact, prefix, suffix, all, any, not \
                      or cesql (found several)"
                    .into(),
            ),
        }
    }
}

fn nested(dialect: &str, v: Vec<FilterSpec>) -> Result<Vec<FilterSpec>, String> {
    if v.is_empty() {
        return Err(format!("`{dialect}` needs at least one nested filter"));
    }
    Ok(v)
}

fn check_map(
    dialect: &str,
    m: BTreeMap<AttributeName, String>,
) -> Result<BTreeMap<AttributeName, String>, String> {
    if m.is_empty() {
        return Err(format!("`{dialect}` needs at least one attribute"));
    }
    if let Some((k, _)) = m.iter().find(|(_, v)| v.is_empty()) {
        return Err(format!(
            "`{dialect}`: the value of `{}` must not be empty",
            k.as_str()
        ));
    }
    Ok(m)
}

/// A context attribute or an extension, resolved once when a filter is compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    Id,
    Source,
    SpecVersion,
    Type,
    DataContentType,
    DataSchema,
    Subject,
    Time,
    Extension(String),
}

impl Attr {
    /// The attribute of that name (an extension unless it is a context attribute).
    pub fn new(name: &str) -> Self {
        match name {
            "id" => Attr::Id,
            "source" => Attr::Source,
            "specversion" => Attr::SpecVersion,
            "type" => Attr::Type,
            "datacontenttype" => Attr::DataContentType,
            "dataschema" => Attr::DataSchema,
            "subject" => Attr::Subject,
            "time" => Attr::Time,
            other => Attr::Extension(other.to_string()),
        }
    }

    /// The attribute's value in string form; `None` when the event does not have it.
    fn get<'e>(&self, e: &'e Event) -> Option<Cow<'e, str>> {
        Some(match self {
            Attr::Id => Cow::Borrowed(e.id()),
            Attr::Source => Cow::Borrowed(e.source().as_str()),
            Attr::SpecVersion => Cow::Owned(e.specversion().to_string()),
            Attr::Type => Cow::Borrowed(e.ty()),
            Attr::DataContentType => Cow::Borrowed(e.datacontenttype()?),
            Attr::DataSchema => Cow::Borrowed(e.dataschema()?.as_str()),
            Attr::Subject => Cow::Borrowed(e.subject()?),
            Attr::Time => Cow::Owned(e.time()?.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            Attr::Extension(name) => match e.extension(name)? {
                ExtensionValue::String(s) => Cow::Borrowed(s.as_str()),
                other => Cow::Owned(other.to_string()),
            },
        })
    }
}

/// A filter compiled for evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Lets everything through (a trigger without filters).
    True,
    /// Knative's `filter.attributes`: exact values; `""` means "present and non-empty".
    Attributes(Vec<(Attr, String)>),
    Exact(Vec<(Attr, String)>),
    Prefix(Vec<(Attr, String)>),
    Suffix(Vec<(Attr, String)>),
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
    /// A CESQL expression: passes when it evaluates to `true` without an error.
    Cesql(Arc<crate::cesql::Expression>),
}

impl Filter {
    /// Compiles a trigger's filters: `filters` wins over `filter.attributes` when both are set.
    pub fn for_trigger(
        attributes: Option<&BTreeMap<AttributeName, String>>,
        filters: &[FilterSpec],
    ) -> Filter {
        if !filters.is_empty() {
            return Filter::All(filters.iter().map(Filter::compile).collect()).simplify();
        }
        match attributes {
            Some(a) if !a.is_empty() => Filter::Attributes(pairs(a)),
            _ => Filter::True,
        }
    }

    /// Compiles one Subscriptions API filter.
    pub fn compile(spec: &FilterSpec) -> Filter {
        match spec {
            FilterSpec::Exact(m) => Filter::Exact(pairs(m)),
            FilterSpec::Prefix(m) => Filter::Prefix(pairs(m)),
            FilterSpec::Suffix(m) => Filter::Suffix(pairs(m)),
            FilterSpec::All(v) => Filter::All(v.iter().map(Filter::compile).collect()),
            FilterSpec::Any(v) => Filter::Any(v.iter().map(Filter::compile).collect()),
            FilterSpec::Not(f) => Filter::Not(Box::new(Filter::compile(f))),
            FilterSpec::Cesql(e) => Filter::Cesql(Arc::clone(e)),
        }
    }

    fn simplify(self) -> Filter {
        match self {
            Filter::All(mut v) if v.len() == 1 => v.remove(0),
            other => other,
        }
    }

    /// True when the event passes.
    pub fn matches(&self, e: &Event) -> bool {
        match self {
            Filter::True => true,
            Filter::Attributes(pairs) => pairs.iter().all(|(attr, want)| match attr.get(e) {
                None => false,
                Some(v) if want.is_empty() => !v.is_empty(),
                Some(v) => v == want.as_str(),
            }),
            Filter::Exact(pairs) => pairs
                .iter()
                .all(|(attr, want)| attr.get(e).is_some_and(|v| v == want.as_str())),
            Filter::Prefix(pairs) => pairs
                .iter()
                .all(|(attr, want)| attr.get(e).is_some_and(|v| v.starts_with(want.as_str()))),
            Filter::Suffix(pairs) => pairs
                .iter()
                .all(|(attr, want)| attr.get(e).is_some_and(|v| v.ends_with(want.as_str()))),
            Filter::All(v) => v.iter().all(|f| f.matches(e)),
            Filter::Any(v) => v.iter().any(|f| f.matches(e)),
            Filter::Not(f) => !f.matches(e),
            Filter::Cesql(expr) => expr.matches(e),
        }
    }
}

/// Any context attribute or extension of an event, by name, in string form.
pub fn attribute_value<'e>(e: &'e Event, name: &str) -> Option<Cow<'e, str>> {
    Attr::new(name).get(e)
}

fn pairs(m: &BTreeMap<AttributeName, String>) -> Vec<(Attr, String)> {
    m.iter()
        .map(|(k, v)| (Attr::new(k.as_str()), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(extra: &str) -> Event {
        let json = format!(
            r#"{{"specversion":"1.0","id":"1","source":"/apis/v1/ns","type":"dev.knative.apiserver.resource.add"{extra}}}"#
        );
        crate::event::parse_json(json.as_bytes()).expect("valid")
    }

    fn spec(yaml: &str) -> Result<FilterSpec, String> {
        serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn dialects() {
        let e = event(r#","kind":"Event","empty":"""#);
        let check = |yaml: &str| Filter::compile(&spec(yaml).expect("valid")).matches(&e);
        assert!(check("exact: {type: dev.knative.apiserver.resource.add}"));
        assert!(!check("exact: {type: dev.knative}"));
        assert!(check("prefix: {type: dev.knative., source: /apis}"));
        assert!(!check("prefix: {type: dev.knative., source: /nope}"));
        assert!(check("suffix: {type: .add}"));
        assert!(!check("exact: {missing: x}"));
        assert!(!check("prefix: {missing: x}"));
        assert!(check("not: {exact: {missing: x}}"));
        assert!(check(
            "all: [{prefix: {type: dev.}}, {exact: {kind: Event}}]"
        ));
        assert!(!check(
            "all: [{prefix: {type: dev.}}, {exact: {kind: Pod}}]"
        ));
        assert!(check("any: [{exact: {kind: Pod}}, {exact: {kind: Event}}]"));
        for empty in ["any: []", "all: []"] {
            let e = spec(empty).map(|_| ()).expect_err(empty);
            assert!(
                e.to_string().contains("needs at least one nested filter"),
                "{e}"
            );
        }
    }

    #[test]
    fn attributes_filter_rules() {
        let e = event(r#","kind":"Event","empty":"""#);
        let attrs = |pairs: &[(&str, &str)]| {
            let m: BTreeMap<AttributeName, String> = pairs
                .iter()
                .map(|(k, v)| {
                    (
                        AttributeName::try_from(k.to_string()).expect("name"),
                        v.to_string(),
                    )
                })
                .collect();
            Filter::for_trigger(Some(&m), &[]).matches(&e)
        };
        assert!(attrs(&[
            ("type", "dev.knative.apiserver.resource.add"),
            ("kind", "Event")
        ]));
        assert!(attrs(&[("kind", "")]), "empty value: present and non-empty");
        assert!(!attrs(&[("empty", "")]), "present but empty does not match");
        assert!(!attrs(&[("missing", "")]), "missing extension fails");
        assert!(!attrs(&[("kind", "Pod")]));
        assert!(Filter::for_trigger(None, &[]).matches(&e));
    }

    #[test]
    fn invalid_specs_say_why() {
        assert!(spec("{}").expect_err("none").contains("exactly one"));
        assert!(
            spec("{exact: {a: b}, prefix: {a: b}}")
                .expect_err("two")
                .contains("found several")
        );
        assert!(
            spec("exact: {}")
                .expect_err("empty")
                .contains("at least one")
        );
        assert!(
            spec("exact: {a: ''}")
                .expect_err("empty value")
                .contains("must not be empty")
        );
        assert!(
            spec("exact: {Bad: x}")
                .expect_err("bad name")
                .contains("^[a-z][a-z0-9]*$")
        );
        assert!(
            spec("cesql: \"type =\"")
                .expect_err("cesql")
                .contains("CESQL: column 7: expected an expression")
        );
        let cesql = spec("cesql: \"type = 'x'\"").expect("valid");
        assert_eq!(
            serde_json::to_string(&cesql).expect("json"),
            r#"{"cesql":"type = 'x'"}"#,
            "written back as its text"
        );
        assert!(
            spec("exakt: {a: b}")
                .expect_err("unknown")
                .contains("unknown field `exakt`")
        );
    }
}
