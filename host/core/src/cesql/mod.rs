//! CloudEvents SQL (CESQL v1): expressions over an event's context attributes and extensions,
//! parsed and checked once (`Expression::parse`) and evaluated per event without allocating
//! in the common cases (attributes are borrowed from the event; `LIKE` patterns are compiled to
//! prefix, suffix, contains or exact tests where they can be).
//!
//! Evaluation is total, as the spec says: every expression has a value, and errors (math, cast,
//! missing attribute, missing function, function evaluation) are collected beside it. A filter
//! passes only when the value is `true` and no error occurred.
//!
//! ```text
//! parse.rs  tokens and a precedence-climbing parser following CESQLParser.g4
//! eval.rs   values, the casting rules (spec 3.7), operators and built-in functions
//! like.rs   LIKE patterns
//! pred.rs   the filter fast path: the expression as a predicate over the attributes
//! ```

mod eval;
mod like;
mod parse;
mod pred;

use std::borrow::Cow;

use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesReader, Event};

pub use crate::filter::Attr;

/// A CESQL value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Bool(bool),
    Int(i32),
    Str(Cow<'a, str>),
}

impl std::fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Str(s) => f.write_str(s),
        }
    }
}

/// The kinds of error the spec names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Parse,
    Math,
    Cast,
    MissingFunction,
    FunctionEvaluation,
    MissingAttribute,
}

impl ErrorKind {
    /// The TCK's name for it.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Parse => "parse",
            ErrorKind::Math => "math",
            ErrorKind::Cast => "cast",
            ErrorKind::MissingFunction => "missingFunction",
            ErrorKind::FunctionEvaluation => "functionEvaluation",
            ErrorKind::MissingAttribute => "missingAttribute",
        }
    }
}

/// A parse error: where (1-based column, in characters) and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CESQL: column {column}: {message}")]
pub struct ParseError {
    pub column: usize,
    pub message: String,
}

/// Where an expression reads attributes from: an event, or anything shaped like one.
pub trait Attributes {
    /// The value of a context attribute or extension; `None` when absent.
    fn get(&self, attr: &Attr) -> Option<Value<'_>>;

    /// The value when it is a string the source holds (the filter fast path borrows it).
    fn text(&self, attr: &Attr) -> Text<'_> {
        match self.get(attr) {
            Some(Value::Str(Cow::Borrowed(s))) => Text::Str(s),
            Some(_) => Text::Other,
            None => Text::Missing,
        }
    }
}

/// What [`Attributes::text`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Text<'a> {
    Str(&'a str),
    /// Present, but not held as a string (a Boolean or an Integer, a formatted time).
    Other,
    Missing,
}

impl Attributes for Event {
    fn text(&self, attr: &Attr) -> Text<'_> {
        let found = match attr {
            Attr::Id => Some(self.id()),
            Attr::Source => Some(self.source().as_str()),
            Attr::Type => Some(self.ty()),
            Attr::DataContentType => self.datacontenttype(),
            Attr::DataSchema => self.dataschema().map(|u| u.as_str()),
            Attr::Subject => self.subject(),
            Attr::SpecVersion => return Text::Other,
            Attr::Time => {
                return match self.time() {
                    Some(_) => Text::Other,
                    None => Text::Missing,
                };
            }
            Attr::Extension(name) => match self.extension(name) {
                Some(ExtensionValue::String(s)) => Some(s.as_str()),
                Some(_) => return Text::Other,
                None => None,
            },
        };
        found.map_or(Text::Missing, Text::Str)
    }

    fn get(&self, attr: &Attr) -> Option<Value<'_>> {
        fn s(v: &str) -> Value<'_> {
            Value::Str(Cow::Borrowed(v))
        }
        Some(match attr {
            Attr::Id => s(self.id()),
            Attr::Source => s(self.source().as_str()),
            Attr::SpecVersion => Value::Str(Cow::Owned(self.specversion().to_string())),
            Attr::Type => s(self.ty()),
            Attr::DataContentType => s(self.datacontenttype()?),
            Attr::DataSchema => s(self.dataschema()?.as_str()),
            Attr::Subject => s(self.subject()?),
            Attr::Time => Value::Str(Cow::Owned(
                self.time()?
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            )),
            Attr::Extension(name) => match self.extension(name)? {
                ExtensionValue::String(v) => s(v),
                ExtensionValue::Boolean(b) => Value::Bool(*b),
                ExtensionValue::Integer(i) => match i32::try_from(*i) {
                    Ok(i) => Value::Int(i),
                    Err(_) => Value::Str(Cow::Owned(i.to_string())),
                },
            },
        })
    }
}

/// What an evaluation came to: a value, and the first error met on the way (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation<'a> {
    pub value: Value<'a>,
    pub error: Option<ErrorKind>,
}

/// A parsed, checked CESQL expression.
#[derive(Debug, Clone)]
pub struct Expression {
    source: String,
    root: eval::Node,
    /// The same expression as a filter predicate (the fast path of `matches`).
    pred: pred::Pred,
    /// Functions the expression calls that do not exist (name and arity): an error at every
    /// evaluation, and a reason to refuse a trigger at apply time.
    missing_functions: Vec<String>,
}

impl PartialEq for Expression {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Expression {
    /// Parses an expression.
    pub fn parse(source: &str) -> Result<Self, ParseError> {
        let mut missing = Vec::new();
        let root = parse::parse(source, &mut missing)?;
        Ok(Self {
            source: source.to_string(),
            pred: pred::Pred::compile(&root),
            root,
            missing_functions: missing,
        })
    }

    /// Parses an expression for a filter: also refuses calls of functions that do not exist.
    pub fn parse_filter(source: &str) -> Result<Self, String> {
        let e = Self::parse(source).map_err(|e| e.to_string())?;
        if let Some(f) = e.missing_functions.first() {
            return Err(format!(
                "CESQL: no function {f} (functions: ABS, BOOL, CONCAT, CONCAT_WS, INT, LEFT, LENGTH, LOWER, RIGHT, STRING, SUBSTRING, TRIM, UPPER)"
            ));
        }
        Ok(e)
    }

    /// The text it was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates it against `attrs` (complete evaluation: the value and the first error).
    pub fn evaluate<'a, A: Attributes + ?Sized>(&'a self, attrs: &'a A) -> Evaluation<'a> {
        eval::evaluate(&self.root, attrs)
    }

    /// The filter rule: `true`, and no error.
    pub fn matches<A: Attributes + ?Sized>(&self, attrs: &A) -> bool {
        matches!(self.pred.test(attrs), Ok(true))
    }
}

#[cfg(test)]
mod tests;
