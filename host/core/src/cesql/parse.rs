//! Tokens and a precedence-climbing parser that follows the reference grammar
//! (CESQLParser.g4), from the tightest binding to the loosest:
//!
//! 1. `NOT x`, `-x` (prefix; their operand is a primary or another prefix operation)
//! 2. `x [NOT] LIKE 'pattern'`, `x [NOT] IN (a, b, ...)`
//! 3. `*`, `/`, `%` (left associative)
//! 4. `+`, `-`
//! 5. `=`, `!=`, `<>`, `<`, `<=`, `>`, `>=`
//! 6. `AND`, `OR`, `XOR`, one level, right associative
//!
//! Keywords and function names are case-insensitive; identifiers are looked up in lower case.

use super::ParseError;
use super::eval::{BinOp, Func, Node};
use super::like::Pattern;
use crate::filter::Attr;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LParen,
    RParen,
    Comma,
    Star,
    Slash,
    Percent,
    Plus,
    Minus,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// Letters, digits and underscores: a keyword, an identifier or a function name.
    Word(String),
    /// Digits only, unsigned.
    Int(String),
    Str(String),
    Eof,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::Comma => "`,`".into(),
            Tok::Star => "`*`".into(),
            Tok::Slash => "`/`".into(),
            Tok::Percent => "`%`".into(),
            Tok::Plus => "`+`".into(),
            Tok::Minus => "`-`".into(),
            Tok::Eq => "`=`".into(),
            Tok::Ne => "`!=`".into(),
            Tok::Lt => "`<`".into(),
            Tok::Le => "`<=`".into(),
            Tok::Gt => "`>`".into(),
            Tok::Ge => "`>=`".into(),
            Tok::Word(w) => format!("`{w}`"),
            Tok::Int(i) => format!("`{i}`"),
            Tok::Str(_) => "a string literal".into(),
            Tok::Eof => "the end of the expression".into(),
        }
    }

    fn keyword(&self, k: &str) -> bool {
        matches!(self, Tok::Word(w) if w.eq_ignore_ascii_case(k))
    }
}

const KEYWORDS: &[&str] = &[
    "AND", "OR", "XOR", "NOT", "LIKE", "IN", "EXISTS", "TRUE", "FALSE",
];

fn err(column: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        column,
        message: message.into(),
    }
}

/// Splits the text into tokens, each with its 1-based column.
fn lex(text: &str) -> Result<Vec<(Tok, usize)>, ParseError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let two = chars.get(i + 1).copied();
        let (tok, len) = match c {
            '(' => (Tok::LParen, 1),
            ')' => (Tok::RParen, 1),
            ',' => (Tok::Comma, 1),
            '*' => (Tok::Star, 1),
            '/' => (Tok::Slash, 1),
            '%' => (Tok::Percent, 1),
            '+' => (Tok::Plus, 1),
            '-' => (Tok::Minus, 1),
            '=' => (Tok::Eq, 1),
            '!' if two == Some('=') => (Tok::Ne, 2),
            '<' if two == Some('>') => (Tok::Ne, 2),
            '<' if two == Some('=') => (Tok::Le, 2),
            '<' => (Tok::Lt, 1),
            '>' if two == Some('=') => (Tok::Ge, 2),
            '>' => (Tok::Gt, 1),
            '\'' | '"' => {
                // Escapes: a backslash or a doubled quote before the delimiter; any other
                // backslash stays (LIKE reads `\%` and `\_`).
                let mut s = String::new();
                let mut j = i + 1;
                loop {
                    match chars.get(j) {
                        None => return Err(err(col, "unterminated string literal")),
                        Some('\\') if chars.get(j + 1) == Some(&c) => {
                            s.push(c);
                            j += 2;
                        }
                        Some('\\') if chars.get(j + 1) == Some(&'\\') => {
                            s.push_str("\\\\");
                            j += 2;
                        }
                        Some(q) if *q == c && chars.get(j + 1) == Some(&c) => {
                            s.push(c);
                            j += 2;
                        }
                        Some(q) if *q == c => break,
                        Some(other) => {
                            s.push(*other);
                            j += 1;
                        }
                    }
                }
                (Tok::Str(s), j + 1 - i)
            }
            c if c.is_ascii_digit() || c.is_ascii_alphabetic() || c == '_' => {
                let mut j = i;
                while chars
                    .get(j)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
                {
                    j += 1;
                }
                let word: String = chars[i..j].iter().collect();
                if word.bytes().all(|b| b.is_ascii_digit()) {
                    (Tok::Int(word), j - i)
                } else {
                    (Tok::Word(word), j - i)
                }
            }
            other => return Err(err(col, format!("unexpected character `{other}`"))),
        };
        out.push((tok, col));
        i += len;
    }
    out.push((Tok::Eof, chars.len() + 1));
    Ok(out)
}

/// The deepest expression tree accepted. Parsing, compiling, evaluating and dropping a tree
/// recurse once a level, so an expression from outside (`a + a + ...` a hundred thousand times,
/// or as many parentheses) must not overflow the stack of the thread that handles it.
pub(super) const MAX_DEPTH: usize = 64;

struct Parser<'m> {
    toks: Vec<(Tok, usize)>,
    at: usize,
    missing: &'m mut Vec<String>,
    /// Calls of `expr` and `prefix` in progress (parentheses and prefix operators nest them
    /// before any node is built).
    nesting: usize,
}

fn too_deep(column: usize) -> ParseError {
    err(
        column,
        format!(
            "the expression nests more than {MAX_DEPTH} levels deep (each AND, OR or operator \
             in a chain is a level: for a list of values use IN (...))"
        ),
    )
}

/// A node just built, refused when the tree under it is too deep (the walk goes no deeper
/// than the limit).
fn checked(node: Node, column: usize) -> Result<Node, ParseError> {
    if deeper_than(&node, MAX_DEPTH) {
        return Err(too_deep(column));
    }
    Ok(node)
}

/// Whether `node` is more than `limit` levels deep; recurses at most `limit` levels.
fn deeper_than(node: &Node, limit: usize) -> bool {
    if limit == 0 {
        return true;
    }
    let below = limit - 1;
    match node {
        Node::Not(x) | Node::Neg(x) | Node::Like { expr: x, .. } => deeper_than(x, below),
        Node::Binary(_, l, r) => deeper_than(l, below) || deeper_than(r, below),
        Node::In { expr, set, .. } => {
            deeper_than(expr, below) || set.iter().any(|n| deeper_than(n, below))
        }
        Node::Call(_, args) => args.iter().any(|n| deeper_than(n, below)),
        Node::Bool(_)
        | Node::Int(_)
        | Node::Str(_)
        | Node::Attr(_)
        | Node::Exists(_)
        | Node::MissingFunction => false,
    }
}

/// Parses `text`; calls of functions that do not exist are noted in `missing`.
pub(super) fn parse(text: &str, missing: &mut Vec<String>) -> Result<Node, ParseError> {
    let mut p = Parser {
        toks: lex(text)?,
        at: 0,
        missing,
        nesting: 0,
    };
    let node = p.expr(0)?;
    match p.peek() {
        Tok::Eof => Ok(node),
        other => Err(err(
            p.col(),
            format!(
                "expected an operator or the end of the expression, found {}",
                other.describe()
            ),
        )),
    }
}

impl Parser<'_> {
    fn peek(&self) -> &Tok {
        &self.toks[self.at].0
    }

    fn peek2(&self) -> &Tok {
        self.toks.get(self.at + 1).map_or(&Tok::Eof, |t| &t.0)
    }

    fn col(&self) -> usize {
        self.toks[self.at].1
    }

    fn next(&mut self) -> Tok {
        let t = self.toks[self.at].0.clone();
        if self.at + 1 < self.toks.len() {
            self.at += 1;
        }
        t
    }

    fn expect(&mut self, want: &Tok, what: &str) -> Result<(), ParseError> {
        if self.peek() == want {
            self.next();
            Ok(())
        } else {
            Err(err(
                self.col(),
                format!("expected {what}, found {}", self.peek().describe()),
            ))
        }
    }

    /// Guards a recursive step: refuses to nest deeper than the tree may be (each level of
    /// tree is at most three calls: `prefix`, `expr` and `prefix` again for parentheses).
    fn enter(&mut self) -> Result<(), ParseError> {
        self.nesting += 1;
        if self.nesting > 3 * MAX_DEPTH {
            return Err(too_deep(self.col()));
        }
        Ok(())
    }

    fn expr(&mut self, min_bp: u8) -> Result<Node, ParseError> {
        self.enter()?;
        let result = self.expr_in(min_bp);
        self.nesting -= 1;
        result
    }

    fn expr_in(&mut self, min_bp: u8) -> Result<Node, ParseError> {
        let mut lhs = self.prefix()?;
        loop {
            let t = self.peek().clone();
            let (bp, right_assoc) = match &t {
                Tok::Word(_) if t.keyword("AND") || t.keyword("OR") || t.keyword("XOR") => {
                    (1, true)
                }
                Tok::Eq | Tok::Ne | Tok::Lt | Tok::Le | Tok::Gt | Tok::Ge => (2, false),
                Tok::Plus | Tok::Minus => (3, false),
                Tok::Star | Tok::Slash | Tok::Percent => (4, false),
                Tok::Word(_) if t.keyword("LIKE") || t.keyword("IN") => (5, false),
                Tok::Word(_)
                    if t.keyword("NOT")
                        && (self.peek2().keyword("LIKE") || self.peek2().keyword("IN")) =>
                {
                    (5, false)
                }
                _ => break,
            };
            if bp < min_bp {
                break;
            }
            let col = self.col();
            if bp == 5 {
                lhs = checked(self.postfix(lhs)?, col)?;
                continue;
            }
            self.next();
            let rhs = self.expr(if right_assoc { bp } else { bp + 1 })?;
            let op = match &t {
                Tok::Eq => BinOp::Eq,
                Tok::Ne => BinOp::Ne,
                Tok::Lt => BinOp::Lt,
                Tok::Le => BinOp::Le,
                Tok::Gt => BinOp::Gt,
                Tok::Ge => BinOp::Ge,
                Tok::Plus => BinOp::Add,
                Tok::Minus => BinOp::Sub,
                Tok::Star => BinOp::Mul,
                Tok::Slash => BinOp::Div,
                Tok::Percent => BinOp::Mod,
                _ if t.keyword("AND") => BinOp::And,
                _ if t.keyword("OR") => BinOp::Or,
                _ => BinOp::Xor,
            };
            lhs = checked(Node::Binary(op, Box::new(lhs), Box::new(rhs)), col)?;
        }
        Ok(lhs)
    }

    /// `[NOT] LIKE 'pattern'` or `[NOT] IN (...)` after `lhs`.
    fn postfix(&mut self, lhs: Node) -> Result<Node, ParseError> {
        let negated = self.peek().keyword("NOT");
        if negated {
            self.next();
        }
        if self.peek().keyword("LIKE") {
            self.next();
            let col = self.col();
            let Tok::Str(pattern) = self.next() else {
                return Err(err(col, "expected a string literal pattern after LIKE"));
            };
            return Ok(Node::Like {
                expr: Box::new(lhs),
                pattern: Pattern::compile(&pattern),
                negated,
            });
        }
        self.next(); // IN
        self.expect(&Tok::LParen, "`(` to open the set after IN")?;
        let mut set = vec![self.expr(0)?];
        while self.peek() == &Tok::Comma {
            self.next();
            set.push(self.expr(0)?);
        }
        self.expect(&Tok::RParen, "`,` or `)` in the set after IN")?;
        Ok(Node::In {
            expr: Box::new(lhs),
            set,
            negated,
        })
    }

    fn int_literal(&self, digits: &str, negative: bool, col: usize) -> Result<Node, ParseError> {
        let v: i64 = digits
            .parse()
            .map_err(|_| err(col, format!("integer literal `{digits}` is out of range")))?;
        let v = if negative { -v } else { v };
        i32::try_from(v).map(Node::Int).map_err(|_| {
            err(
                col,
                format!("integer literal `{v}` is out of the 32-bit signed range"),
            )
        })
    }

    fn prefix(&mut self) -> Result<Node, ParseError> {
        let col = self.col();
        self.enter()?;
        let result = self.prefix_in();
        self.nesting -= 1;
        checked(result?, col)
    }

    fn prefix_in(&mut self) -> Result<Node, ParseError> {
        let col = self.col();
        let t = self.next();
        match t {
            Tok::Minus | Tok::Plus => {
                // A sign directly before digits is part of the literal (so that
                // -2147483648 is one), as in the reference lexer.
                if let Tok::Int(digits) = self.peek().clone() {
                    self.next();
                    return self.int_literal(&digits, t == Tok::Minus, col);
                }
                if t == Tok::Plus {
                    return Err(err(col, "`+` is only a sign before digits"));
                }
                Ok(Node::Neg(Box::new(self.prefix()?)))
            }
            Tok::Int(digits) => self.int_literal(&digits, false, col),
            Tok::Str(s) => Ok(Node::Str(s.into_boxed_str())),
            Tok::LParen => {
                let e = self.expr(0)?;
                self.expect(&Tok::RParen, "`)`")?;
                Ok(e)
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("NOT") => {
                Ok(Node::Not(Box::new(self.prefix()?)))
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("TRUE") => Ok(Node::Bool(true)),
            Tok::Word(w) if w.eq_ignore_ascii_case("FALSE") => Ok(Node::Bool(false)),
            Tok::Word(w) if w.eq_ignore_ascii_case("EXISTS") => {
                let col = self.col();
                match self.next() {
                    Tok::Word(name) if is_identifier(&name) => {
                        Ok(Node::Exists(Attr::new(&name.to_ascii_lowercase())))
                    }
                    other => Err(err(
                        col,
                        format!(
                            "expected an attribute name after EXISTS, found {}",
                            other.describe()
                        ),
                    )),
                }
            }
            Tok::Word(w) if self.peek() == &Tok::LParen => self.call(&w, col),
            Tok::Word(w) if KEYWORDS.iter().any(|k| w.eq_ignore_ascii_case(k)) => Err(err(
                col,
                format!(
                    "expected an expression, found the keyword {}",
                    w.to_ascii_uppercase()
                ),
            )),
            Tok::Word(w) if is_identifier(&w) => Ok(Node::Attr(Attr::new(&w.to_ascii_lowercase()))),
            Tok::Word(w) => Err(err(
                col,
                format!("`{w}` is not an attribute name (letters and digits only)"),
            )),
            other => Err(err(
                col,
                format!("expected an expression, found {}", other.describe()),
            )),
        }
    }

    fn call(&mut self, name: &str, col: usize) -> Result<Node, ParseError> {
        if !name.starts_with(|c: char| c.is_ascii_alphabetic())
            || !name.chars().all(|c| c.is_ascii_alphabetic() || c == '_')
        {
            return Err(err(col, format!("`{name}` is not a function name")));
        }
        self.next(); // (
        let mut args = Vec::new();
        if self.peek() != &Tok::RParen {
            args.push(self.expr(0)?);
            while self.peek() == &Tok::Comma {
                self.next();
                args.push(self.expr(0)?);
            }
        }
        self.expect(&Tok::RParen, "`,` or `)` in the argument list")?;
        let upper = name.to_ascii_uppercase();
        match Func::resolve(&upper, args.len()) {
            Some(func) => Ok(Node::Call(func, args)),
            None => {
                let sig = format!("{upper} with {} argument(s)", args.len());
                self.missing.push(sig);
                Ok(Node::MissingFunction)
            }
        }
    }
}

fn is_identifier(w: &str) -> bool {
    !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric())
}
