//! The resource kinds users declare, in Knative's own kinds and versions plus wasmesh's
//! `Function`. Each type checks its own values while it is deserialized, so that an error
//! carries the file, line, column and field path of the value (see [`crate::yaml`]).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::filter::FilterSpec;

/// Kubernetes object metadata: what wasmesh reads, plus the fields a `kubectl get -o yaml`
/// carries, accepted and ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    /// A DNS-1123 subdomain, as Kubernetes requires: it appears in URLs and paths.
    #[serde(deserialize_with = "object_name")]
    pub name: String,
    /// A DNS-1123 label, as Kubernetes requires.
    #[serde(
        default,
        deserialize_with = "namespace_name",
        skip_serializing_if = "Option::is_none"
    )]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing)]
    pub uid: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub resource_version: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub generation: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub creation_timestamp: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub owner_references: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub finalizers: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub managed_fields: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub self_link: Option<serde_json::Value>,
}

impl ObjectMeta {
    /// The namespace, `default` when unset (as `kubectl apply` does).
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// Why `name` is not a DNS-1123 label (lower-case letters, digits and `-`, starting and ending
/// with a letter or digit, at most 63 characters); `None` when it is.
pub fn dns_label_problem(name: &str) -> Option<String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !name.starts_with('-') && !name.ends_with('-');
    if name.is_empty() {
        Some("must not be empty".into())
    } else if name.len() > 63 {
        Some(format!("`{name}` is longer than 63 characters"))
    } else if !ok_chars || !ok_ends {
        Some(format!(
            "`{name}` is not a DNS-1123 label: lower-case letters, digits and `-`, starting and \
             ending with a letter or digit"
        ))
    } else {
        None
    }
}

/// Why `name` is not a DNS-1123 subdomain (DNS-1123 labels joined by `.`, at most 253
/// characters), Kubernetes' rule for most object names; `None` when it is.
pub fn dns_subdomain_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.len() > 253 {
        return Some(format!("`{name}` is longer than 253 characters"));
    }
    if name
        .split('.')
        .any(|part| dns_label_problem(part).is_some())
    {
        return Some(format!(
            "`{name}` is not a DNS-1123 subdomain: lower-case letters, digits, `-` and `.`, \
             starting and ending with a letter or digit"
        ));
    }
    None
}

fn object_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    match dns_subdomain_problem(&name) {
        Some(why) => Err(serde::de::Error::custom(why)),
        None => Ok(name),
    }
}

fn namespace_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let name = Option::<String>::deserialize(d)?;
    match name.as_deref().and_then(dns_label_problem) {
        Some(why) => Err(serde::de::Error::custom(why)),
        None => Ok(name),
    }
}

/// One declared object of kind `S`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Object<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: S,
    #[serde(default, skip_serializing)]
    pub status: Option<serde_json::Value>,
}

/// A `Namespace`: only its labels matter (`knative-eventing-injection=enabled`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamespaceObject {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing)]
    pub spec: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub status: Option<serde_json::Value>,
}

/// A reference to another object (Knative's `KReference`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KReference {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Where events go: an object reference or a URI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawDestination")]
pub struct Destination {
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<KReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// CA certificates (PEM) trusted, besides the system's, for an `https` uri.
    #[serde(default, rename = "CACerts", skip_serializing_if = "Option::is_none")]
    pub ca_certs: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    #[serde(default, rename = "ref")]
    reference: Option<KReference>,
    #[serde(default)]
    uri: Option<String>,
    #[serde(default, rename = "CACerts")]
    ca_certs: Option<String>,
    // The v1alpha1 sources wrote the sink as an object reference, without `ref:`.
    #[serde(default, rename = "apiVersion")]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default, rename = "audience")]
    _audience: Option<String>,
}

impl TryFrom<RawDestination> for Destination {
    type Error = String;

    fn try_from(mut raw: RawDestination) -> Result<Self, String> {
        if raw.api_version.is_some() || raw.kind.is_some() || raw.name.is_some() {
            if raw.reference.is_some() {
                return Err("set `ref`, or the inline apiVersion/kind/name, not both".into());
            }
            match (raw.api_version.take(), raw.kind.take(), raw.name.take()) {
                (Some(api_version), Some(kind), Some(name)) => {
                    raw.reference = Some(KReference {
                        api_version,
                        kind,
                        name,
                        namespace: raw.namespace.take(),
                    })
                }
                _ => return Err("an inline reference needs apiVersion, kind and name".into()),
            }
        }
        match (&raw.reference, &raw.uri) {
            (None, None) => Err("a destination needs `ref` or `uri`".into()),
            (Some(_), Some(_)) => Err("set one of `ref` or `uri`, not both".into()),
            (None, Some(uri)) => {
                let parsed = url::Url::parse(uri).map_err(|e| format!("uri `{uri}`: {e}"))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(format!("uri `{uri}`: only http and https are supported"));
                }
                Ok(Destination {
                    reference: None,
                    uri: raw.uri,
                    ca_certs: raw.ca_certs,
                })
            }
            (Some(_), None) => Ok(Destination {
                reference: raw.reference,
                uri: None,
                ca_certs: raw.ca_certs,
            }),
        }
    }
}

/// `linear` (delay × n) or `exponential` (delay × 2^n).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackoffPolicy {
    Linear,
    #[default]
    Exponential,
}

/// A duration written in ISO-8601 (`PT0.2S`), kept with its spelling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IsoDuration {
    text: String,
    value: Duration,
}

impl IsoDuration {
    /// The duration.
    pub fn get(&self) -> Duration {
        self.value
    }
}

impl TryFrom<String> for IsoDuration {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let value = crate::duration::parse_iso8601(&text)?;
        Ok(Self { text, value })
    }
}

impl From<IsoDuration> for String {
    fn from(d: IsoDuration) -> String {
        d.text
    }
}

/// An ISO-8601 duration above zero (a delivery's `timeout`: Knative refuses `PT0S`, which would
/// fail every request).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PositiveIsoDuration(IsoDuration);

impl PositiveIsoDuration {
    /// The duration.
    pub fn get(&self) -> Duration {
        self.0.value
    }
}

impl TryFrom<String> for PositiveIsoDuration {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let d = IsoDuration::try_from(text)?;
        if d.value.is_zero() {
            return Err(format!("`{}` must be above zero", d.text));
        }
        Ok(Self(d))
    }
}

impl From<PositiveIsoDuration> for String {
    fn from(d: PositiveIsoDuration) -> String {
        d.0.text
    }
}

/// A duration in ISO-8601 or short form (`100ms`, `2s`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FlexDuration {
    text: String,
    value: Duration,
}

impl FlexDuration {
    /// The duration.
    pub fn get(&self) -> Duration {
        self.value
    }
}

impl TryFrom<String> for FlexDuration {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let value = crate::duration::parse_flexible(&text)?;
        if value.is_zero() {
            return Err("must be above zero".into());
        }
        Ok(Self { text, value })
    }
}

impl From<FlexDuration> for String {
    fn from(d: FlexDuration) -> String {
        d.text
    }
}

/// How a trigger delivers (Knative's `DeliverySpec`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeliverySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_policy: Option<BackoffPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_delay: Option<IsoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<PositiveIsoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_sink: Option<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_max: Option<IsoDuration>,
    /// The content mode of deliveries: `json` (structured) or `binary` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DeliveryFormat>,
    /// wasmesh: the longest wait between retries, whatever the policy computes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_max: Option<IsoDuration>,
    /// wasmesh: deliveries in flight at once for this trigger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    /// wasmesh: `unordered` (default) or `ordered` per partition key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<Ordering>,
    /// wasmesh: the attribute whose value partitions ordered delivery (default `subject`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<AttributeName>,
}

/// Knative's delivery format: `json` sends each event in structured mode, `binary` in binary
/// mode (also the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryFormat {
    #[serde(alias = "JSON")]
    Json,
    Binary,
}

/// Delivery order of a trigger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Events may be delivered in any order, many at once (like Knative's Kafka broker default).
    #[default]
    Unordered,
    /// Events with the same partition key are delivered one at a time, in the order accepted.
    Ordered,
}

/// A concurrency: 1 to 1024.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Concurrency(u32);

impl Concurrency {
    /// The value.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Concurrency {
    type Error = String;
    fn try_from(n: u32) -> Result<Self, String> {
        if (1..=1024).contains(&n) {
            Ok(Self(n))
        } else {
            Err(format!("concurrency {n} is out of range: use 1 to 1024"))
        }
    }
}

impl From<Concurrency> for u32 {
    fn from(c: Concurrency) -> u32 {
        c.0
    }
}

/// `Broker.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BrokerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<KReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySpec>,
}

/// `Trigger.spec.filter`: attributes that must match exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerFilter {
    #[serde(default)]
    pub attributes: BTreeMap<AttributeName, String>,
}

/// A CloudEvents attribute name: `^[a-z][a-z0-9]*$` (Knative's rule for filter keys).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AttributeName(String);

impl AttributeName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AttributeName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let mut chars = s.chars();
        let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if ok {
            Ok(Self(s))
        } else {
            Err(format!(
                "attribute name `{s}` is invalid: it must match ^[a-z][a-z0-9]*$"
            ))
        }
    }
}

impl From<AttributeName> for String {
    fn from(a: AttributeName) -> String {
        a.0
    }
}

/// The name of an extension a source sets (`ceOverrides`): an attribute name, and not `data`
/// (see [`crate::event::is_valid_extension_name`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ExtensionName(AttributeName);

impl ExtensionName {
    /// The name.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl TryFrom<String> for ExtensionName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if let Some(why) = crate::event::extension_name_problem(&s) {
            return Err(format!("extension name `{s}` {why}"));
        }
        AttributeName::try_from(s).map(Self)
    }
}

impl From<ExtensionName> for String {
    fn from(e: ExtensionName) -> String {
        e.0.into()
    }
}

/// `Trigger.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TriggerSpec {
    #[serde(default = "default_broker")]
    pub broker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<TriggerFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<FilterSpec>,
    pub subscriber: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySpec>,
    /// wasmesh: a Function of the `filter` world, run on the events the native filters pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm_filter: Option<String>,
}

fn default_broker() -> String {
    "default".into()
}

/// Memory in Kubernetes quantity form: `16Mi`, `1Gi`, `512Ki`, or bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Memory {
    text: String,
    bytes: usize,
}

impl Memory {
    /// In bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl TryFrom<String> for Memory {
    type Error = String;
    /// A Kubernetes quantity, as a container's memory limit is written: digits with an
    /// optional fraction, then a binary (`Ki`, `Mi`, `Gi`, `Ti`) or decimal (`k`, `M`, `G`, `T`)
    /// suffix or none (bytes): `16Mi`, `0.5Gi`, `128M`.
    fn try_from(text: String) -> Result<Self, String> {
        let split = text
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(text.len());
        let (num, unit) = text.split_at(split);
        let (whole, fraction) = num.split_once('.').unwrap_or((num, ""));
        let not_a_size = || format!("`{text}` is not a memory size (e.g. 16Mi, 0.5Gi, 128M)");
        if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
            return Err(not_a_size());
        }
        let mult: u128 = match unit {
            "" => 1,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            _ => {
                return Err(format!(
                    "`{text}`: use the units Ki, Mi, Gi, Ti (or k, M, G, T), as for a container"
                ));
            }
        };
        let digits = |s: &str| -> Result<u128, String> {
            if s.is_empty() {
                return Ok(0);
            }
            s.parse::<u128>().map_err(|_| not_a_size())
        };
        let out_of_range = || format!("`{text}` is out of range");
        // Whole bytes of whole.fraction × mult, the fraction's remainder dropped.
        let scale = 10u128
            .checked_pow(u32::try_from(fraction.len()).map_err(|_| out_of_range())?)
            .ok_or_else(out_of_range)?;
        let (whole, fraction) = (digits(whole)?, digits(fraction)?);
        let total = whole
            .checked_mul(mult)
            .zip(fraction.checked_mul(mult))
            .and_then(|(w, f)| w.checked_add(f / scale))
            .ok_or_else(out_of_range)?;
        let bytes = usize::try_from(total).map_err(|_| out_of_range())?;
        // Every module's memory comes in 64 KiB pages: less could never run a call.
        if bytes < 64 << 10 {
            return Err(format!(
                "`{text}` is less than one WebAssembly memory page: use at least 64Ki"
            ));
        }
        Ok(Self { text, bytes })
    }
}

impl From<Memory> for String {
    fn from(m: Memory) -> String {
        m.text
    }
}

/// `Function.spec.limits`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<FlexDuration>,
}

/// `warm` (instances serve many events) or `fresh` (one instance per event).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IsolationSpec {
    #[default]
    Warm,
    Fresh,
}

/// `Function.spec` (`wasmesh.dev/v1alpha1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// A path relative to the declaring file, or `sha256:<hex>` of an uploaded module.
    pub module: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<FunctionLimits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<IsolationSpec>,
    /// How a new version goes live: on trial, rolled back by itself when it fails too often.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
}

/// `Function.spec.rollout`: a new version's first `window` events decide it; when more than
/// `maxFailureRate` of them fail, wasmesh goes back to the version before.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", try_from = "RawRollout")]
pub struct RolloutSpec {
    pub window: u32,
    pub max_failure_rate: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRollout {
    #[serde(default = "default_window")]
    window: u32,
    max_failure_rate: f64,
}

fn default_window() -> u32 {
    20
}

impl TryFrom<RawRollout> for RolloutSpec {
    type Error = String;

    fn try_from(raw: RawRollout) -> Result<Self, String> {
        if !(1..=100_000).contains(&raw.window) {
            return Err(format!(
                "window {}: expected 1 to 100000 events",
                raw.window
            ));
        }
        if !(0.0..1.0).contains(&raw.max_failure_rate) {
            return Err(format!(
                "maxFailureRate {}: expected a fraction from 0 up to (not including) 1, e.g. 0.2",
                raw.max_failure_rate
            ));
        }
        Ok(Self {
            window: raw.window,
            max_failure_rate: raw.max_failure_rate,
        })
    }
}

/// `PingSource.spec` (`sources.knative.dev/v1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PingSourceSpec {
    /// Empty (or absent) means every minute, `* * * * *`, as Knative defaults it.
    #[serde(default)]
    pub schedule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    pub sink: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_overrides: Option<CeOverrides>,
}

/// `ceOverrides`: extensions set on every event a source sends.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CeOverrides {
    #[serde(default)]
    pub extensions: BTreeMap<ExtensionName, String>,
}

/// A label selector (`matchLabels`, `matchExpressions`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// `In`, `NotIn`, `Exists`, `DoesNotExist`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One watched resource of an ApiServerSource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiServerResource {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// v1alpha1 spelling of `selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<LabelSelector>,
    /// v1alpha1: only objects controlled by the owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_selector: Option<serde_json::Value>,
}

/// `Resource` (the whole object) or `Reference` (kind, namespace, name, apiVersion).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiServerMode {
    #[default]
    Reference,
    Resource,
}

/// `ApiServerSource.owner`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OwnerFilter {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
}

/// `ApiServerSource.spec` (both `sources.knative.dev/v1` and the seed's v1alpha1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiServerSourceSpec {
    pub resources: Vec<ApiServerResource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<OwnerFilter>,
    #[serde(default)]
    pub mode: ApiServerMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    pub sink: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_overrides: Option<CeOverrides>,
    /// Knative's Subscriptions API filters (its `new-apiserversource-filters` feature): only
    /// events that pass them are sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<FilterSpec>,
}

/// Any declared object wasmesh knows.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Namespace(NamespaceObject),
    Broker(Object<BrokerSpec>),
    Trigger(Object<TriggerSpec>),
    Function(Object<FunctionSpec>),
    PingSource(Object<PingSourceSpec>),
    ApiServerSource(Object<ApiServerSourceSpec>),
    /// A kind that only means something inside Kubernetes (RBAC, ServiceAccount, a Knative
    /// Service whose container wasmesh replaces with a Function): accepted, not run.
    Ignored {
        kind: String,
        name: String,
        why: &'static str,
    },
}

impl Resource {
    /// The object as JSON, as it was declared (what `wasmesh get -o yaml` prints).
    pub fn to_json(&self) -> Option<serde_json::Value> {
        let v = match self {
            Resource::Namespace(o) => serde_json::to_value(o),
            Resource::Broker(o) => serde_json::to_value(o),
            Resource::Trigger(o) => serde_json::to_value(o),
            Resource::Function(o) => serde_json::to_value(o),
            Resource::PingSource(o) => serde_json::to_value(o),
            Resource::ApiServerSource(o) => serde_json::to_value(o),
            Resource::Ignored { .. } => return None,
        };
        v.ok()
    }

    /// `Kind/namespace/name`, for messages.
    pub fn id(&self) -> String {
        let (kind, meta) = match self {
            Resource::Namespace(o) => return format!("Namespace/{}", o.metadata.name),
            Resource::Broker(o) => ("Broker", &o.metadata),
            Resource::Trigger(o) => ("Trigger", &o.metadata),
            Resource::Function(o) => ("Function", &o.metadata),
            Resource::PingSource(o) => ("PingSource", &o.metadata),
            Resource::ApiServerSource(o) => ("ApiServerSource", &o.metadata),
            Resource::Ignored { kind, name, .. } => return format!("{kind}/{name}"),
        };
        format!("{kind}/{}/{}", meta.namespace(), meta.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(text: &str) -> Result<usize, String> {
        Memory::try_from(text.to_string()).map(|m| m.bytes())
    }

    /// Memory limits are Kubernetes quantities, as a container's are.
    #[test]
    fn memory_limits_read_as_kubernetes_quantities() {
        assert_eq!(bytes("16Mi"), Ok(16 << 20));
        assert_eq!(bytes("0.5Gi"), Ok(512 << 20));
        assert_eq!(bytes(".5Gi"), Ok(512 << 20));
        assert_eq!(bytes("128M"), Ok(128_000_000));
        assert_eq!(bytes("1.5k").unwrap_or_default(), 0, "below one page");
        assert_eq!(bytes("65536"), Ok(65536));
        assert_eq!(bytes("1Ti"), Ok(1 << 40));
        for bad in ["", ".", "1.2.3", "16MB", "1e6", "-1Mi", "64Kix"] {
            assert!(bytes(bad).is_err(), "{bad}");
        }
        assert!(
            bytes("1Ki")
                .expect_err("1Ki")
                .contains("one WebAssembly memory page")
        );
        assert!(bytes("99999999999999999999999999999999999999999Ti").is_err());
    }
}
