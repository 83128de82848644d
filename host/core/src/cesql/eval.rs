//! Values, the casting rules, operators and built-in functions (CESQL v1, sections 3.4-3.7).
//!
//! Casts: to Integer from a Boolean (1, 0) or a String (decimal; otherwise a cast error and 0);
//! to Boolean from a String (`true`/`false`, any case; otherwise a cast error and false), from
//! an Integer only through `BOOL()`; to String from anything. A failed cast gives the target
//! type's zero value, and the operation goes on with it.
//!
//! An operand whose evaluation raised an error (a missing attribute, a division by zero, a
//! failed function) makes the operator or function that receives it give the zero value of its
//! result, raising nothing more; `AND` and `OR` still short-circuit on their left operand.

use std::borrow::Cow;

use super::like::Pattern;
use super::{Attributes, ErrorKind, Evaluation, Value};
use crate::filter::Attr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BinOp {
    And,
    Or,
    Xor,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

/// The built-in functions, resolved by name and arity when parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Func {
    Length,
    Concat,
    ConcatWs,
    Lower,
    Upper,
    Trim,
    Left,
    Right,
    Substring,
    Abs,
    Int,
    Bool,
    String,
}

impl Func {
    pub(super) fn resolve(name: &str, arity: usize) -> Option<Func> {
        Some(match (name, arity) {
            ("LENGTH", 1) => Func::Length,
            ("CONCAT", _) => Func::Concat,
            ("CONCAT_WS", n) if n >= 1 => Func::ConcatWs,
            ("LOWER", 1) => Func::Lower,
            ("UPPER", 1) => Func::Upper,
            ("TRIM", 1) => Func::Trim,
            ("LEFT", 2) => Func::Left,
            ("RIGHT", 2) => Func::Right,
            ("SUBSTRING", 2 | 3) => Func::Substring,
            ("ABS", 1) => Func::Abs,
            ("INT", 1) => Func::Int,
            ("BOOL", 1) => Func::Bool,
            ("STRING", 1) => Func::String,
            _ => return None,
        })
    }

    /// The zero value of what it returns.
    fn zero(self) -> Value<'static> {
        match self {
            Func::Length | Func::Abs | Func::Int => Value::Int(0),
            Func::Bool => Value::Bool(false),
            _ => Value::Str(Cow::Borrowed("")),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) enum Node {
    Bool(bool),
    Int(i32),
    Str(Box<str>),
    Attr(Attr),
    Exists(Attr),
    Not(Box<Node>),
    Neg(Box<Node>),
    Binary(BinOp, Box<Node>, Box<Node>),
    Like {
        expr: Box<Node>,
        pattern: Pattern,
        negated: bool,
    },
    In {
        expr: Box<Node>,
        set: Vec<Node>,
        negated: bool,
    },
    Call(Func, Vec<Node>),
    /// A call of a function that does not exist.
    MissingFunction,
}

struct Ctx {
    error: Option<ErrorKind>,
    errors: u32,
}

impl Ctx {
    fn fail(&mut self, kind: ErrorKind) {
        self.errors += 1;
        if self.error.is_none() {
            self.error = Some(kind);
        }
    }

    fn int(&mut self, v: &Value<'_>) -> i32 {
        match v {
            Value::Int(i) => *i,
            Value::Bool(b) => i32::from(*b),
            Value::Str(s) => s.parse().unwrap_or_else(|_| {
                self.fail(ErrorKind::Cast);
                0
            }),
        }
    }

    fn bool(&mut self, v: &Value<'_>) -> bool {
        match v {
            Value::Bool(b) => *b,
            Value::Str(s) if s.eq_ignore_ascii_case("true") => true,
            Value::Str(s) if s.eq_ignore_ascii_case("false") => false,
            _ => {
                self.fail(ErrorKind::Cast);
                false
            }
        }
    }
}

pub(super) fn string<'a>(v: Value<'a>) -> Cow<'a, str> {
    match v {
        Value::Str(s) => s,
        Value::Bool(true) => Cow::Borrowed("true"),
        Value::Bool(false) => Cow::Borrowed("false"),
        Value::Int(i) => Cow::Owned(i.to_string()),
    }
}

pub(super) fn evaluate<'a, A: Attributes + ?Sized>(node: &'a Node, attrs: &'a A) -> Evaluation<'a> {
    let mut cx = Ctx {
        error: None,
        errors: 0,
    };
    let value = eval(node, attrs, &mut cx);
    Evaluation {
        value,
        error: cx.error,
    }
}

fn b<'a>(x: bool) -> Value<'a> {
    Value::Bool(x)
}

fn i<'a>(x: i32) -> Value<'a> {
    Value::Int(x)
}

/// An operand's value; `None` when evaluating it raised an error (a missing attribute, a
/// division by zero below it, ...): the operator then gives its zero value.
fn operand<'a, A: Attributes + ?Sized>(
    n: &'a Node,
    attrs: &'a A,
    cx: &mut Ctx,
) -> Option<Value<'a>> {
    let before = cx.errors;
    let v = eval(n, attrs, cx);
    (cx.errors == before).then_some(v)
}

/// An operand read as a Boolean (`None`: it raised an error).
fn bool_operand<'a, A: Attributes + ?Sized>(
    n: &'a Node,
    attrs: &'a A,
    cx: &mut Ctx,
) -> Option<bool> {
    let v = operand(n, attrs, cx)?;
    Some(cx.bool(&v))
}

fn eval<'a, A: Attributes + ?Sized>(node: &'a Node, attrs: &'a A, cx: &mut Ctx) -> Value<'a> {
    match node {
        Node::Bool(x) => b(*x),
        Node::Int(x) => i(*x),
        Node::Str(s) => Value::Str(Cow::Borrowed(s)),
        Node::Attr(a) => attrs.get(a).unwrap_or_else(|| {
            cx.fail(ErrorKind::MissingAttribute);
            b(false)
        }),
        Node::Exists(a) => b(attrs.get(a).is_some()),
        Node::Not(n) => match operand(n, attrs, cx) {
            Some(v) => b(!cx.bool(&v)),
            None => b(false),
        },
        Node::Neg(n) => match operand(n, attrs, cx) {
            Some(v) => {
                let x = cx.int(&v);
                i(x.checked_neg().unwrap_or_else(|| {
                    cx.fail(ErrorKind::Math);
                    i32::MAX
                }))
            }
            None => i(0),
        },
        Node::Binary(BinOp::And, l, r) => b(match bool_operand(l, attrs, cx) {
            Some(true) => bool_operand(r, attrs, cx).unwrap_or(false),
            _ => false,
        }),
        Node::Binary(BinOp::Or, l, r) => b(match bool_operand(l, attrs, cx) {
            Some(true) => true,
            Some(false) => bool_operand(r, attrs, cx).unwrap_or(false),
            None => false,
        }),
        Node::Binary(op, l, r) => {
            let x = operand(l, attrs, cx);
            let y = operand(r, attrs, cx);
            match (x, y) {
                (Some(x), Some(y)) => binary(*op, x, y, cx),
                _ => match op {
                    BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Mod => i(0),
                    _ => b(false),
                },
            }
        }
        Node::Like {
            expr,
            pattern,
            negated,
        } => match operand(expr, attrs, cx) {
            Some(v) => b(pattern.matches(&string(v)) != *negated),
            None => b(false),
        },
        Node::In { expr, set, negated } => {
            let Some(x) = operand(expr, attrs, cx) else {
                return b(false);
            };
            let mut found = false;
            for n in set {
                let Some(y) = operand(n, attrs, cx) else {
                    return b(false);
                };
                if equal_as_left(&x, y, cx) {
                    found = true;
                    break;
                }
            }
            b(found != *negated)
        }
        Node::Call(f, args) => call(*f, args, attrs, cx),
        Node::MissingFunction => {
            cx.fail(ErrorKind::MissingFunction);
            b(false)
        }
    }
}

/// `x = y` with `y` cast to `x`'s type (the IN rule).
fn equal_as_left(x: &Value<'_>, y: Value<'_>, cx: &mut Ctx) -> bool {
    match x {
        Value::Int(a) => *a == cx.int(&y),
        Value::Bool(a) => *a == cx.bool(&y),
        Value::Str(a) => *a == string(y),
    }
}

fn binary<'a>(op: BinOp, x: Value<'a>, y: Value<'a>, cx: &mut Ctx) -> Value<'a> {
    match op {
        BinOp::Xor => {
            let (p, q) = (cx.bool(&x), cx.bool(&y));
            b(p ^ q)
        }
        // `=` is defined for each type: the right operand's type picks the definition, and
        // the left operand is cast to it (spec 3.7).
        BinOp::Eq | BinOp::Ne => {
            let eq = match &y {
                Value::Int(q) => cx.int(&x) == *q,
                Value::Bool(q) => cx.bool(&x) == *q,
                Value::Str(q) => string(x) == *q,
            };
            b(eq == (op == BinOp::Eq))
        }
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            let (p, q) = (cx.int(&x), cx.int(&y));
            b(match op {
                BinOp::Lt => p < q,
                BinOp::Le => p <= q,
                BinOp::Gt => p > q,
                _ => p >= q,
            })
        }
        _ => {
            let (p, q) = (cx.int(&x), cx.int(&y));
            let r = match op {
                BinOp::Add => p.checked_add(q),
                BinOp::Sub => p.checked_sub(q),
                BinOp::Mul => p.checked_mul(q),
                BinOp::Div => p.checked_div(q),
                _ => p.checked_rem(q),
            };
            i(r.unwrap_or_else(|| {
                cx.fail(ErrorKind::Math);
                0
            }))
        }
    }
}

/// The byte offset after the first `n` characters of `s`, `None` when `s` is shorter. ASCII
/// text is sliced without decoding.
fn char_offset(s: &str, n: usize) -> Option<usize> {
    let b = s.as_bytes();
    // Never more characters than bytes.
    if n >= b.len() {
        return None;
    }
    if b[..n].is_ascii() {
        return Some(n);
    }
    s.char_indices().nth(n).map(|(at, _)| at)
}

/// The first `n` characters of `s` (all of it when shorter).
pub(super) fn take_str(s: &str, n: usize) -> &str {
    char_offset(s, n).map_or(s, |end| &s[..end])
}

/// `s` without its first `n` characters.
pub(super) fn skip_str(s: &str, n: usize) -> &str {
    char_offset(s, n).map_or("", |start| &s[start..])
}

/// [`take_str`] on a `Cow`, borrowing when it borrows.
pub(super) fn take_chars(s: Cow<'_, str>, n: usize) -> Cow<'_, str> {
    match s {
        Cow::Borrowed(b) => Cow::Borrowed(take_str(b, n)),
        Cow::Owned(o) => Cow::Owned(take_str(&o, n).to_string()),
    }
}

/// [`skip_str`] on a `Cow`, borrowing when it borrows.
pub(super) fn skip_chars(s: Cow<'_, str>, n: usize) -> Cow<'_, str> {
    match s {
        Cow::Borrowed(b) => Cow::Borrowed(skip_str(b, n)),
        Cow::Owned(o) => Cow::Owned(skip_str(&o, n).to_string()),
    }
}

fn call<'a, A: Attributes + ?Sized>(
    f: Func,
    args: &'a [Node],
    attrs: &'a A,
    cx: &mut Ctx,
) -> Value<'a> {
    // Arguments are evaluated in order, each when its turn comes; one that raised an error
    // makes the function give its zero value.
    macro_rules! arg {
        ($k:expr) => {
            match operand(&args[$k], attrs, cx) {
                Some(v) => v,
                None => return f.zero(),
            }
        };
    }
    match f {
        Func::Length => {
            let n = string(arg!(0)).chars().count();
            Value::Int(i32::try_from(n).unwrap_or(i32::MAX))
        }
        Func::Concat | Func::ConcatWs => {
            let first = usize::from(f == Func::ConcatWs);
            let sep = if first == 1 {
                string(arg!(0)).into_owned()
            } else {
                String::new()
            };
            let mut out = String::new();
            for (k, a) in args.iter().enumerate().skip(first) {
                if k > first {
                    out.push_str(&sep);
                }
                match operand(a, attrs, cx) {
                    Some(v) => out.push_str(&string(v)),
                    None => return f.zero(),
                }
            }
            Value::Str(Cow::Owned(out))
        }
        Func::Lower => Value::Str(Cow::Owned(string(arg!(0)).to_lowercase())),
        Func::Upper => Value::Str(Cow::Owned(string(arg!(0)).to_uppercase())),
        Func::Trim => Value::Str(match string(arg!(0)) {
            Cow::Borrowed(s) => Cow::Borrowed(s.trim()),
            Cow::Owned(s) => Cow::Owned(s.trim().to_string()),
        }),
        Func::Left | Func::Right => {
            let s = string(arg!(0));
            let n = arg!(1);
            let n = cx.int(&n);
            if n < 0 {
                cx.fail(ErrorKind::FunctionEvaluation);
                return Value::Str(s);
            }
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if f == Func::Left {
                Value::Str(take_chars(s, n))
            } else {
                let len = s.chars().count();
                Value::Str(skip_chars(s, len.saturating_sub(n)))
            }
        }
        Func::Substring => {
            let s = string(arg!(0));
            let pos = arg!(1);
            let pos = cx.int(&pos);
            let len = if args.len() == 3 {
                let l = arg!(2);
                Some(cx.int(&l))
            } else {
                None
            };
            let count = i64::try_from(s.chars().count()).unwrap_or(i64::MAX);
            let p = i64::from(pos);
            if p > count || p < -count || len.is_some_and(|l| l < 0) {
                cx.fail(ErrorKind::FunctionEvaluation);
                return Value::Str(Cow::Borrowed(""));
            }
            if pos == 0 {
                return Value::Str(Cow::Borrowed(""));
            }
            let start = if p > 0 { p - 1 } else { count + p };
            let rest = skip_chars(s, usize::try_from(start).unwrap_or(0));
            Value::Str(match len {
                Some(l) => take_chars(rest, usize::try_from(l).unwrap_or(0)),
                None => rest,
            })
        }
        Func::Abs => {
            let x = arg!(0);
            let x = cx.int(&x);
            Value::Int(x.checked_abs().unwrap_or_else(|| {
                cx.fail(ErrorKind::Math);
                i32::MAX
            }))
        }
        Func::Int => {
            let x = arg!(0);
            Value::Int(cx.int(&x))
        }
        Func::Bool => match arg!(0) {
            Value::Int(x) => Value::Bool(x != 0),
            other => Value::Bool(cx.bool(&other)),
        },
        Func::String => Value::Str(string(arg!(0))),
    }
}
