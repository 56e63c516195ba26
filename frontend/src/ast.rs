//! The syntax tree of a `.zb` file. Every node carries its span.

use std::fmt::Write;

use crate::diag::{Span, line_col};

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Let(Let),
    Attention(Attention),
    Model(Model),
}

/// `let name = value`: a named constant, or a constant table when `value` is a list.
#[derive(Clone, Debug, PartialEq)]
pub struct Let {
    pub name: Ident,
    pub value: Expr,
    pub span: Span,
}

/// Whether an attention variant may look at future keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causality {
    Causal,
    Bidirectional,
}

/// `attention name(params) causal { mask = ...  score = ... }`
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    pub name: Ident,
    pub params: Vec<Param>,
    pub causality: Option<(Causality, Span)>,
    pub fields: Vec<Field>,
    pub span: Span,
}

/// The type written for a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamType {
    Int,
    Float,
    /// `int[T]`: a per-token integer side input, given at run time.
    Side,
}

impl ParamType {
    pub fn name(self) -> &'static str {
        match self {
            ParamType::Int => "int",
            ParamType::Float => "float",
            ParamType::Side => "int[T]",
        }
    }
}

/// `name: type = default`; the type or the default may be left out (not both).
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: Ident,
    pub ty: Option<(ParamType, Span)>,
    pub default: Option<Expr>,
    pub span: Span,
}

/// `name = value` or `name.kind = value` inside an attention or a model.
#[derive(Clone, Debug, PartialEq)]
pub struct Field {
    pub name: Ident,
    /// The `kind` of `rope.kind = ...`.
    pub qualifier: Option<Ident>,
    pub value: Expr,
    pub span: Span,
}

/// `model name { field = value ... }`
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub name: Ident,
    pub fields: Vec<Field>,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        self.to_ir().symbol()
    }

    pub fn to_ir(self) -> zebra_ir::expr::BinOp {
        use zebra_ir::expr::BinOp as B;
        match self {
            BinOp::Add => B::Add,
            BinOp::Sub => B::Sub,
            BinOp::Mul => B::Mul,
            BinOp::Div => B::Div,
            BinOp::Rem => B::Rem,
            BinOp::Eq => B::Eq,
            BinOp::Ne => B::Ne,
            BinOp::Lt => B::Lt,
            BinOp::Le => B::Le,
            BinOp::Gt => B::Gt,
            BinOp::Ge => B::Ge,
            BinOp::And => B::And,
            BinOp::Or => B::Or,
        }
    }

    pub fn from_symbol(symbol: &str) -> Option<BinOp> {
        use BinOp::*;
        [Add, Sub, Mul, Div, Rem, Eq, Ne, Lt, Le, Gt, Ge, And, Or]
            .into_iter()
            .find(|op| op.symbol() == symbol)
    }

    pub fn precedence(self) -> u8 {
        self.to_ir().precedence()
    }
}

/// A call argument, positional or named (`hidden = 176`).
#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Name(String),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `f(args)`: a function, a constructor such as `swiglu(hidden = 176)`, or an attention
    /// kind with arguments in a layer pattern.
    Call(Ident, Vec<Arg>),
    /// `doc[q]`: a side input read at a position.
    Index(Ident, Box<Expr>),
    /// `[a, b, c]`: a group in a layer pattern.
    List(Vec<Expr>),
    /// Something that failed to parse; a diagnostic was already reported.
    Error,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

impl Expr {
    pub fn new(kind: ExprKind, span: Span) -> Expr {
        Expr { kind, span }
    }

    pub fn contains_error(&self) -> bool {
        match &self.kind {
            ExprKind::Error => true,
            ExprKind::Unary(_, e) | ExprKind::Index(_, e) => e.contains_error(),
            ExprKind::Binary(_, a, b) => a.contains_error() || b.contains_error(),
            ExprKind::Call(_, args) => args.iter().any(|a| a.value.contains_error()),
            ExprKind::List(items) => items.iter().any(Expr::contains_error),
            _ => false,
        }
    }
}

/// Writes the tree as indented text with `line:col` positions, for `zebra compile --emit ast`.
pub fn dump(file: &File, source: &str) -> String {
    let mut out = String::new();
    let at = |span: Span| {
        let (line, col) = line_col(source, span.start);
        format!("@{line}:{col}")
    };
    for item in &file.items {
        match item {
            Item::Let(l) => {
                let _ = writeln!(out, "let {} {}", l.name.name, at(l.span));
                dump_expr(&mut out, &l.value, 1, &at);
            }
            Item::Attention(a) => {
                let causality = match a.causality {
                    Some((Causality::Causal, _)) => "causal",
                    Some((Causality::Bidirectional, _)) => "bidirectional",
                    None => "?",
                };
                let _ = writeln!(out, "attention {} {causality} {}", a.name.name, at(a.span));
                for p in &a.params {
                    let ty = p.ty.map_or("?", |(t, _)| t.name());
                    let _ = writeln!(out, "  param {}: {ty} {}", p.name.name, at(p.span));
                    if let Some(d) = &p.default {
                        dump_expr(&mut out, d, 2, &at);
                    }
                }
                dump_fields(&mut out, &a.fields, &at);
            }
            Item::Model(m) => {
                let _ = writeln!(out, "model {} {}", m.name.name, at(m.span));
                dump_fields(&mut out, &m.fields, &at);
            }
        }
    }
    out
}

fn dump_fields(out: &mut String, fields: &[Field], at: &dyn Fn(Span) -> String) {
    for f in fields {
        let name = match &f.qualifier {
            Some(q) => format!("{}.{}", f.name.name, q.name),
            None => f.name.name.clone(),
        };
        let _ = writeln!(out, "  field {name} {}", at(f.span));
        dump_expr(out, &f.value, 2, at);
    }
}

fn dump_expr(out: &mut String, expr: &Expr, depth: usize, at: &dyn Fn(Span) -> String) {
    let pad = "  ".repeat(depth);
    let here = at(expr.span);
    match &expr.kind {
        ExprKind::Int(v) => {
            let _ = writeln!(out, "{pad}int {v} {here}");
        }
        ExprKind::Float(v) => {
            let _ = writeln!(out, "{pad}float {} {here}", zebra_ir::expr::fmt_float(*v));
        }
        ExprKind::Name(n) => {
            let _ = writeln!(out, "{pad}name {n} {here}");
        }
        ExprKind::Unary(op, e) => {
            let sym = if *op == UnOp::Neg { "-" } else { "!" };
            let _ = writeln!(out, "{pad}unary {sym} {here}");
            dump_expr(out, e, depth + 1, at);
        }
        ExprKind::Binary(op, a, b) => {
            let _ = writeln!(out, "{pad}binary {} {here}", op.symbol());
            dump_expr(out, a, depth + 1, at);
            dump_expr(out, b, depth + 1, at);
        }
        ExprKind::Call(f, args) => {
            let _ = writeln!(out, "{pad}call {} {here}", f.name);
            for a in args {
                match &a.name {
                    Some(n) => {
                        let _ = writeln!(out, "{pad}  arg {}", n.name);
                        dump_expr(out, &a.value, depth + 2, at);
                    }
                    None => dump_expr(out, &a.value, depth + 1, at),
                }
            }
        }
        ExprKind::Index(base, index) => {
            let _ = writeln!(out, "{pad}index {} {here}", base.name);
            dump_expr(out, index, depth + 1, at);
        }
        ExprKind::List(items) => {
            let _ = writeln!(out, "{pad}list {here}");
            for e in items {
                dump_expr(out, e, depth + 1, at);
            }
        }
        ExprKind::Error => {
            let _ = writeln!(out, "{pad}error {here}");
        }
    }
}
