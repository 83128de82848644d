//! The filter fast path: an expression compiled into a predicate that answers only what a
//! filter asks (is the value `true`, with no error?). The common shapes (`x LIKE 'p'`,
//! `EXISTS attr`, `x = 'text'`, `attr IN ('a', 'b')` and `AND`/`OR`/`NOT` of them, where `x` is
//! an attribute or string functions of one with constant arguments) are tested on the
//! attribute's text directly; anything else goes through the full evaluator. Any error met on
//! the way fails the filter, which is exactly the filter rule, so errors short-circuit as `Err`.
//! The TCK test checks this path against the evaluator on every case.

use std::borrow::Cow;

use super::eval::{self, BinOp, Func, Node};
use super::like::Pattern;
use super::{Attributes, Value};
use crate::filter::Attr;

/// An expression whose value is a String, computed on borrowed text where it can be: an
/// attribute (cast to String), a literal, and the string functions with constant integer
/// arguments.
#[derive(Debug, Clone)]
pub(super) enum Text {
    Attr(Attr),
    Lit(Box<str>),
    Left(Box<Text>, usize),
    Right(Box<Text>, usize),
    Lower(Box<Text>),
    Upper(Box<Text>),
    Trim(Box<Text>),
    Substring(Box<Text>, i32, Option<i32>),
}

impl Text {
    fn compile(node: &Node) -> Option<Text> {
        let int = |n: &Node| match n {
            Node::Int(i) => Some(*i),
            _ => None,
        };
        Some(match node {
            Node::Attr(a) => Text::Attr(a.clone()),
            Node::Str(s) => Text::Lit(s.clone()),
            Node::Call(f, args) => match (f, args.as_slice()) {
                (Func::Left, [x, n]) => {
                    Text::Left(Box::new(Text::compile(x)?), usize::try_from(int(n)?).ok()?)
                }
                (Func::Right, [x, n]) => {
                    Text::Right(Box::new(Text::compile(x)?), usize::try_from(int(n)?).ok()?)
                }
                (Func::Lower, [x]) => Text::Lower(Box::new(Text::compile(x)?)),
                (Func::Upper, [x]) => Text::Upper(Box::new(Text::compile(x)?)),
                (Func::Trim, [x]) => Text::Trim(Box::new(Text::compile(x)?)),
                (Func::Substring, [x, p]) => {
                    Text::Substring(Box::new(Text::compile(x)?), int(p)?, None)
                }
                (Func::Substring, [x, p, l]) => {
                    Text::Substring(Box::new(Text::compile(x)?), int(p)?, Some(int(l)?))
                }
                _ => return None,
            },
            _ => return None,
        })
    }

    /// The value when it is a slice of the event's text (no allocation, no decoding of ASCII);
    /// `Ok(None)` when it is not (then [`Text::eval`] computes it).
    fn borrowed<'a, A: Attributes + ?Sized>(
        &'a self,
        attrs: &'a A,
    ) -> Result<Option<&'a str>, Failed> {
        Ok(match self {
            Text::Attr(a) => match attrs.text(a) {
                super::Text::Str(s) => Some(s),
                super::Text::Other => None,
                super::Text::Missing => return Err(Failed),
            },
            Text::Lit(s) => Some(s),
            Text::Left(x, n) => x.borrowed(attrs)?.map(|s| eval::take_str(s, *n)),
            Text::Right(x, n) => x.borrowed(attrs)?.map(|s| {
                let len = s.chars().count();
                eval::skip_str(s, len.saturating_sub(*n))
            }),
            Text::Trim(x) => x.borrowed(attrs)?.map(str::trim),
            Text::Lower(_) | Text::Upper(_) | Text::Substring(..) => None,
        })
    }

    /// The value, with the evaluator's semantics; `Err` where it would raise an error.
    fn eval<'a, A: Attributes + ?Sized>(&'a self, attrs: &'a A) -> Result<Cow<'a, str>, Failed> {
        if let Some(s) = self.borrowed(attrs)? {
            return Ok(Cow::Borrowed(s));
        }
        Ok(match self {
            Text::Attr(a) => eval::string(attrs.get(a).ok_or(Failed)?),
            Text::Lit(s) => Cow::Borrowed(s),
            Text::Left(x, n) => eval::take_chars(x.eval(attrs)?, *n),
            Text::Right(x, n) => {
                let s = x.eval(attrs)?;
                let len = s.chars().count();
                eval::skip_chars(s, len.saturating_sub(*n))
            }
            Text::Lower(x) => Cow::Owned(x.eval(attrs)?.to_lowercase()),
            Text::Upper(x) => Cow::Owned(x.eval(attrs)?.to_uppercase()),
            Text::Trim(x) => match x.eval(attrs)? {
                Cow::Borrowed(s) => Cow::Borrowed(s.trim()),
                Cow::Owned(s) => Cow::Owned(s.trim().to_string()),
            },
            Text::Substring(x, pos, len) => {
                let s = x.eval(attrs)?;
                let count = i64::try_from(s.chars().count()).unwrap_or(i64::MAX);
                let p = i64::from(*pos);
                if p > count || p < -count || len.is_some_and(|l| l < 0) {
                    return Err(Failed);
                }
                if *pos == 0 {
                    return Ok(Cow::Borrowed(""));
                }
                let start = if p > 0 { p - 1 } else { count + p };
                let rest = eval::skip_chars(s, usize::try_from(start).unwrap_or(0));
                match len {
                    Some(l) => eval::take_chars(rest, usize::try_from(*l).unwrap_or(0)),
                    None => rest,
                }
            }
        })
    }
}

#[derive(Debug, Clone)]
pub(super) enum Pred {
    /// `text LIKE 'pattern'`.
    Like {
        text: Text,
        pattern: Pattern,
        negated: bool,
    },
    Exists(Attr),
    /// `text = 'literal'` (or `!=`): the left side, as a string, against the literal.
    EqText {
        left: Text,
        text: Box<str>,
        negated: bool,
    },
    /// `attr IN ('a', ...)` with string literals; an attribute that is not a string falls back
    /// to the evaluator (the set is cast to its type).
    InText {
        attr: Attr,
        set: Vec<Box<str>>,
        negated: bool,
        node: Node,
    },
    And(Box<Pred>, Box<Pred>),
    Or(Box<Pred>, Box<Pred>),
    Not(Box<Pred>),
    /// Any other expression used as a Boolean operand: evaluated, then cast to Boolean.
    Operand(Node),
    /// Any other expression at the top: passes only when its value is the Boolean `true`.
    Top(Node),
}

/// An error was met: the filter fails.
pub(super) struct Failed;

impl Pred {
    pub(super) fn compile(node: &Node) -> Pred {
        match Self::operand(node) {
            Pred::Operand(n) => Pred::Top(n),
            p => p,
        }
    }

    fn operand(node: &Node) -> Pred {
        match node {
            Node::Like {
                expr,
                pattern,
                negated,
            } => match Text::compile(expr) {
                Some(text) => Pred::Like {
                    text,
                    pattern: pattern.clone(),
                    negated: *negated,
                },
                None => Pred::Operand(node.clone()),
            },
            Node::Exists(a) => Pred::Exists(a.clone()),
            Node::Binary(op @ (BinOp::Eq | BinOp::Ne), l, r) => match (Text::compile(l), &**r) {
                (Some(left), Node::Str(t)) => Pred::EqText {
                    left,
                    text: t.clone(),
                    negated: *op == BinOp::Ne,
                },
                _ => Pred::Operand(node.clone()),
            },
            Node::In { expr, set, negated } => match &**expr {
                Node::Attr(a) if set.iter().all(|n| matches!(n, Node::Str(_))) => Pred::InText {
                    attr: a.clone(),
                    set: set
                        .iter()
                        .filter_map(|n| match n {
                            Node::Str(s) => Some(s.clone()),
                            _ => None,
                        })
                        .collect(),
                    negated: *negated,
                    node: node.clone(),
                },
                _ => Pred::Operand(node.clone()),
            },
            Node::Binary(BinOp::And, l, r) => {
                Pred::And(Box::new(Self::operand(l)), Box::new(Self::operand(r)))
            }
            Node::Binary(BinOp::Or, l, r) => {
                Pred::Or(Box::new(Self::operand(l)), Box::new(Self::operand(r)))
            }
            Node::Not(n) => Pred::Not(Box::new(Self::operand(n))),
            other => Pred::Operand(other.clone()),
        }
    }

    pub(super) fn test<A: Attributes + ?Sized>(&self, attrs: &A) -> Result<bool, Failed> {
        match self {
            Pred::Like {
                text,
                pattern,
                negated,
            } => Ok(match text.borrowed(attrs)? {
                Some(s) => pattern.matches(s),
                None => pattern.matches(&text.eval(attrs)?),
            } != *negated),
            Pred::Exists(attr) => Ok(attrs.text(attr) != super::Text::Missing),
            Pred::EqText {
                left,
                text: want,
                negated,
            } => Ok(match left.borrowed(attrs)? {
                Some(s) => s == &**want,
                None => *left.eval(attrs)? == **want,
            } != *negated),
            Pred::InText {
                attr,
                set,
                negated,
                node,
            } => match attrs.text(attr) {
                super::Text::Str(s) => Ok(set.iter().any(|t| &**t == s) != *negated),
                super::Text::Missing => Err(Failed),
                super::Text::Other => {
                    let e = eval::evaluate(node, attrs);
                    match (e.error, e.value) {
                        (None, Value::Bool(b)) => Ok(b),
                        _ => Err(Failed),
                    }
                }
            },
            Pred::And(l, r) => Ok(l.test(attrs)? && r.test(attrs)?),
            Pred::Or(l, r) => Ok(l.test(attrs)? || r.test(attrs)?),
            Pred::Not(p) => Ok(!p.test(attrs)?),
            Pred::Operand(node) => {
                let e = eval::evaluate(node, attrs);
                if e.error.is_some() {
                    return Err(Failed);
                }
                match e.value {
                    Value::Bool(b) => Ok(b),
                    Value::Str(s) if s.eq_ignore_ascii_case("true") => Ok(true),
                    Value::Str(s) if s.eq_ignore_ascii_case("false") => Ok(false),
                    // A cast error.
                    _ => Err(Failed),
                }
            }
            Pred::Top(node) => {
                let e = eval::evaluate(node, attrs);
                match (e.error, e.value) {
                    (None, Value::Bool(b)) => Ok(b),
                    (None, _) => Ok(false),
                    _ => Err(Failed),
                }
            }
        }
    }
}
