//! The checker: names, types, model sizes, layer patterns and the claims attention variants
//! make about themselves. It reports every problem it finds and turns what is sound into a
//! [`Program`].

use std::collections::{BTreeSet, HashMap};

use zebra_ir::Loc;
use zebra_ir::expr::{self as ir, Env, Func, Scalar, ScalarType, Var};
use zebra_ir::rope::{self, Rope, RopeScaling, SCALINGS};

use crate::ast::{self, Causality, Expr, ExprKind, ParamType, UnOp};
use crate::diag::{Diagnostic, Span, line_col};
use crate::spec::{AttentionKind, Biases, ModelSpec, ParamValue, Program};

/// A layer pattern may hold at most this many layers.
pub const MAX_LAYERS: usize = 4096;

/// The largest head dim: the attention kernels are specialized to it, each vector of a head
/// written out in their code, so a head dim of a million (a typo in `dim`) would take minutes
/// to compile. The largest in use are 256 (Gemma) and 576 (DeepSeek's latent attention).
pub const MAX_HEAD_DIM: usize = 16384;

/// Mask claims are checked on every query and key position below this bound.
const SAMPLE_POSITIONS: i64 = 64;

/// The most entries a table (`let name = [...]`) may hold: each is compiled into the kernels.
const MAX_TABLE: usize = 1024;

/// Names with a fixed meaning inside attention bodies.
const INDEX_NAMES: [&str; 4] = ["q", "k", "h", "b"];

/// Checks a parsed file. Returns the models that checked cleanly and every diagnostic.
pub fn check(file: &ast::File, source: &str) -> (Program, Vec<Diagnostic>) {
    let mut checker = Checker {
        source,
        diagnostics: Vec::new(),
        lets: HashMap::new(),
        tables: HashMap::new(),
        attentions: HashMap::new(),
        attention_ok: HashMap::new(),
        models: HashMap::new(),
        bound: HashMap::new(),
    };
    let mut models = Vec::new();
    for item in &file.items {
        match item {
            ast::Item::Let(l) => checker.let_item(l),
            ast::Item::Attention(a) => checker.attention(a),
            ast::Item::Model(m) => {
                if checker.declare_model(m)
                    && let Some(spec) = checker.model(m)
                {
                    models.push(spec);
                }
            }
        }
    }
    (Program { models }, checker.diagnostics)
}

struct Checker<'a> {
    source: &'a str,
    diagnostics: Vec<Diagnostic>,
    lets: HashMap<String, (ParamValue, Span)>,
    /// `let name = [...]`: constant tables, read in attention bodies as `name[index]`.
    tables: HashMap<String, (ir::Table, Span)>,
    attentions: HashMap<String, &'a ast::Attention>,
    /// Whether each attention declaration type-checked.
    attention_ok: HashMap<String, bool>,
    models: HashMap<String, Span>,
    /// Bound arguments per use in a layer pattern (a repeated use is bound, and reported, once).
    bound: HashMap<Span, Option<Vec<(String, ParamValue)>>>,
}

/// What a name means inside an attention body.
#[derive(Clone, Copy)]
enum Meaning {
    Index,
    Bool,
    Score,
    NHeads,
    Param(ParamType),
    Let(ParamValue),
    Table(ScalarType),
}

/// The names visible in one attention body.
struct Scope<'a> {
    params: HashMap<&'a str, ParamType>,
    score_allowed: bool,
}

fn value_type(value: ParamValue) -> ScalarType {
    match value {
        ParamValue::Int(_) => ScalarType::Int,
        ParamValue::Float(_) => ScalarType::Float,
    }
}

/// Edit distance, for "did you mean" suggestions.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The closest candidate to `name`, if it is close enough to be a likely typo.
pub fn suggest<'c>(name: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| {
            // `vocab_size` for `vocab`: one name extends the other.
            let extends =
                name.len() > 2 && c.len() > 2 && (name.starts_with(c) || c.starts_with(name));
            (if extends { 1 } else { distance(name, c) }, c)
        })
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, c)| c)
}

fn with_suggestion(d: Diagnostic, suggestion: Option<&str>) -> Diagnostic {
    match suggestion {
        Some(s) => d.with_note(format!("did you mean `{s}`?")),
        None => d,
    }
}

impl<'a> Checker<'a> {
    fn error(&mut self, d: Diagnostic) {
        self.diagnostics.push(d);
    }

    fn loc(&self, span: Span) -> Loc {
        let (line, col) = line_col(self.source, span.start);
        Loc { line, col }
    }

    /// Records a top-level name; reports a second definition.
    fn declare(&mut self, name: &ast::Ident) -> bool {
        let earlier = self
            .lets
            .get(&name.name)
            .map(|(_, s)| *s)
            .or_else(|| self.tables.get(&name.name).map(|(_, s)| *s))
            .or_else(|| self.attentions.get(&name.name).map(|a| a.name.span))
            .or_else(|| self.models.get(&name.name).copied());
        if let Some(earlier) = earlier {
            self.error(
                Diagnostic::error(name.span, format!("`{}` is defined twice", name.name))
                    .label("second definition")
                    .with_secondary(earlier, "first defined here"),
            );
            return false;
        }
        let reserved = INDEX_NAMES.contains(&name.name.as_str())
            || matches!(name.name.as_str(), "score" | "n_heads" | "true" | "false")
            || Func::from_name(&name.name).is_some();
        if reserved {
            self.error(
                Diagnostic::error(name.span, format!("`{}` is a built-in name", name.name))
                    .label("pick another name"),
            );
            return false;
        }
        true
    }

    fn let_item(&mut self, item: &'a ast::Let) {
        if !self.declare(&item.name) {
            return;
        }
        if let ExprKind::List(entries) = &item.value.kind {
            if let Some(table) = self.table(entries, item.value.span) {
                self.tables
                    .insert(item.name.name.clone(), (table, item.name.span));
            }
            return;
        }
        if let Some(value) = self.constant(&item.value) {
            self.lets
                .insert(item.name.name.clone(), (value, item.name.span));
        }
    }

    /// The entries of `let name = [...]`: constant numbers, all integers or, if any is a
    /// float, all floats.
    fn table(&mut self, entries: &[Expr], span: Span) -> Option<ir::Table> {
        if entries.is_empty() {
            self.error(
                Diagnostic::error(span, "a table needs at least one entry")
                    .label("write its numbers between the brackets"),
            );
            return None;
        }
        if entries.len() > MAX_TABLE {
            self.error(
                Diagnostic::error(
                    span,
                    format!(
                        "a table holds at most {MAX_TABLE} entries, this one {}",
                        entries.len()
                    ),
                )
                .label("every entry is compiled into the kernels"),
            );
            return None;
        }
        let mut values = Vec::with_capacity(entries.len());
        let mut ok = true;
        for entry in entries {
            if matches!(entry.kind, ExprKind::List(_)) {
                self.error(
                    Diagnostic::error(entry.span, "a table's entries must be numbers")
                        .label("tables do not nest"),
                );
                ok = false;
            } else if let Some(v) = self.constant(entry) {
                values.push(v);
            } else {
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        let ints: Option<Vec<i64>> = values
            .iter()
            .map(|v| match v {
                ParamValue::Int(i) => Some(*i),
                ParamValue::Float(_) => None,
            })
            .collect();
        Some(match ints {
            Some(ints) => ir::Table::Int(ints),
            None => ir::Table::Float(values.into_iter().map(as_f64).collect()),
        })
    }

    fn declare_model(&mut self, model: &'a ast::Model) -> bool {
        if !self.declare(&model.name) {
            return false;
        }
        self.models.insert(model.name.name.clone(), model.name.span);
        true
    }

    // ---------------------------------------------------------------- constants

    /// Evaluates a constant expression (model fields, `let`s, arguments).
    fn constant(&mut self, expr: &Expr) -> Option<ParamValue> {
        let overflow = |this: &mut Self| {
            this.error(Diagnostic::error(
                expr.span,
                "this constant overflows 64 bits",
            ));
            None
        };
        match &expr.kind {
            ExprKind::Int(v) => Some(ParamValue::Int(*v)),
            ExprKind::Float(v) => Some(ParamValue::Float(*v)),
            ExprKind::Error => None,
            ExprKind::Name(name) => {
                if let Some((value, _)) = self.lets.get(name) {
                    return Some(*value);
                }
                if self.tables.contains_key(name) {
                    self.error(
                        Diagnostic::error(expr.span, format!("`{name}` is a table, not a number"))
                            .label("tables are read in attention bodies, as `name[index]`"),
                    );
                    return None;
                }
                let d = Diagnostic::error(expr.span, format!("unknown constant `{name}`"))
                    .label("not defined by a `let` above");
                let suggestion = suggest(name, self.lets.keys().map(String::as_str));
                let d = with_suggestion(d, suggestion);
                self.error(d);
                None
            }
            ExprKind::Unary(UnOp::Neg, e) => match self.constant(e)? {
                ParamValue::Int(v) => match v.checked_neg() {
                    Some(v) => Some(ParamValue::Int(v)),
                    None => overflow(self),
                },
                ParamValue::Float(v) => Some(ParamValue::Float(-v)),
            },
            ExprKind::Binary(op, a, b)
                if !op.to_ir().is_comparison() && !op.to_ir().is_logical() =>
            {
                let (a, b) = (self.constant(a), self.constant(b));
                let (a, b) = (a?, b?);
                match (a, b) {
                    (ParamValue::Int(x), ParamValue::Int(y)) => {
                        let result = match op {
                            ast::BinOp::Add => x.checked_add(y),
                            ast::BinOp::Sub => x.checked_sub(y),
                            ast::BinOp::Mul => x.checked_mul(y),
                            ast::BinOp::Div | ast::BinOp::Rem if y == 0 => {
                                self.error(Diagnostic::error(expr.span, "division by zero"));
                                return None;
                            }
                            ast::BinOp::Div => Some(ir::floor_div(x, y)),
                            _ => Some(ir::floor_rem(x, y)),
                        };
                        match result {
                            Some(v) => Some(ParamValue::Int(v)),
                            None => overflow(self),
                        }
                    }
                    _ => {
                        if *op == ast::BinOp::Rem {
                            self.error(Diagnostic::error(
                                expr.span,
                                "`%` needs integers on both sides",
                            ));
                            return None;
                        }
                        let (x, y) = (as_f64(a), as_f64(b));
                        let v = match op {
                            ast::BinOp::Add => x + y,
                            ast::BinOp::Sub => x - y,
                            ast::BinOp::Mul => x * y,
                            _ => x / y,
                        };
                        if v.is_finite() {
                            Some(ParamValue::Float(v))
                        } else {
                            self.error(Diagnostic::error(
                                expr.span,
                                "this constant is not a finite number",
                            ));
                            None
                        }
                    }
                }
            }
            _ => {
                self.error(
                    Diagnostic::error(expr.span, "expected a number")
                        .label("not a constant number"),
                );
                None
            }
        }
    }

    /// A constant that must be a positive integer.
    fn positive_int(&mut self, expr: &Expr, what: &str) -> Option<usize> {
        match self.constant(expr)? {
            ParamValue::Int(v) if v > 0 => Some(v as usize),
            ParamValue::Int(v) => {
                self.error(
                    Diagnostic::error(expr.span, format!("`{what}` must be positive, found {v}"))
                        .label("must be at least 1"),
                );
                None
            }
            ParamValue::Float(_) => {
                self.error(
                    Diagnostic::error(
                        expr.span,
                        format!("`{what}` must be an integer, found a float"),
                    )
                    .label("expected an integer"),
                );
                None
            }
        }
    }

    /// A constant that must be a positive number.
    fn positive_float(&mut self, expr: &Expr, what: &str) -> Option<f64> {
        let v = as_f64(self.constant(expr)?);
        if v > 0.0 {
            Some(v)
        } else {
            self.error(
                Diagnostic::error(expr.span, format!("`{what}` must be positive, found {v}"))
                    .label("must be above 0"),
            );
            None
        }
    }

    // ---------------------------------------------------------------- attention declarations

    fn attention(&mut self, decl: &'a ast::Attention) {
        if !self.declare(&decl.name) {
            return;
        }
        self.attentions.insert(decl.name.name.clone(), decl);
        let mut ok = decl.causality.is_some();
        let mut params: HashMap<&str, ParamType> = HashMap::new();
        let mut param_spans: HashMap<&str, Span> = HashMap::new();
        for p in &decl.params {
            let name = p.name.name.as_str();
            if let Some(first) = param_spans.get(name) {
                self.error(
                    Diagnostic::error(p.name.span, format!("parameter `{name}` is declared twice"))
                        .with_secondary(*first, "first declared here"),
                );
                ok = false;
                continue;
            }
            if INDEX_NAMES.contains(&name)
                || matches!(name, "score" | "n_heads" | "true" | "false")
                || Func::from_name(name).is_some()
            {
                self.error(
                    Diagnostic::error(p.name.span, format!("`{name}` is a built-in name"))
                        .label("pick another parameter name"),
                );
                ok = false;
                continue;
            }
            if let Some((_, table)) = self.tables.get(name) {
                self.error(
                    Diagnostic::error(
                        p.name.span,
                        format!("parameter `{name}` would hide a table"),
                    )
                    .label("pick another parameter name")
                    .with_secondary(*table, "the table"),
                );
                ok = false;
                continue;
            }
            let ty = self.param_type(p);
            if ty.is_none() {
                ok = false;
            }
            // A parameter whose default is wrong keeps its declared type, so the body does
            // not also report it unknown.
            if let Some(ty) = ty.or(p.ty.map(|t| t.0)) {
                params.insert(name, ty);
                param_spans.insert(name, p.name.span);
            }
        }
        let scope_params = params;
        let mut mask = None;
        let mut score = None;
        for field in &decl.fields {
            let slot = match field.name.name.as_str() {
                "mask" => &mut mask,
                "score" => &mut score,
                other => {
                    let d = Diagnostic::error(
                        field.name.span,
                        format!("unknown attention field `{other}`"),
                    )
                    .label("expected `mask` or `score`");
                    self.error(with_suggestion(d, suggest(other, ["mask", "score"])));
                    ok = false;
                    continue;
                }
            };
            if let Some(q) = &field.qualifier {
                self.error(Diagnostic::error(
                    q.span,
                    format!("`{}` takes no qualifier", field.name.name),
                ));
                ok = false;
            }
            if let Some(first) = slot.replace(field) {
                self.error(
                    Diagnostic::error(
                        field.name.span,
                        format!("`{}` is given twice", field.name.name),
                    )
                    .with_secondary(first.name.span, "first given here"),
                );
                ok = false;
            }
        }
        match mask {
            None => {
                self.error(
                    Diagnostic::error(
                        decl.name.span,
                        format!("attention `{}` has no `mask`", decl.name.name),
                    )
                    .label("add `mask = ...`")
                    .with_note("for full causal attention write `mask = k <= q`"),
                );
                ok = false;
            }
            Some(field) => {
                let scope = Scope {
                    params: scope_params.clone(),
                    score_allowed: false,
                };
                match self.typecheck(&field.value, &scope) {
                    Some(ScalarType::Bool) => {}
                    Some(other) => {
                        self.error(
                            Diagnostic::error(
                                field.value.span,
                                format!("a mask must be a bool, found {}", other.name()),
                            )
                            .label("expected a condition such as `k <= q`"),
                        );
                        ok = false;
                    }
                    None => ok = false,
                }
            }
        }
        if let Some(field) = score {
            let scope = Scope {
                params: scope_params,
                score_allowed: true,
            };
            match self.typecheck(&field.value, &scope) {
                Some(ScalarType::Bool) => {
                    self.error(
                        Diagnostic::error(
                            field.value.span,
                            "a score modifier must be a number, found bool",
                        )
                        .label("expected a number such as `score - (q - k)`"),
                    );
                    ok = false;
                }
                Some(_) => {}
                None => ok = false,
            }
        }
        self.attention_ok.insert(decl.name.name.clone(), ok);
    }

    fn param_type(&mut self, p: &ast::Param) -> Option<ParamType> {
        let default = match &p.default {
            Some(d) => Some((self.constant(d)?, d.span)),
            None => None,
        };
        match (p.ty, default) {
            (Some((ParamType::Side, span)), Some((_, dspan))) => {
                self.error(
                    Diagnostic::error(
                        dspan,
                        format!("side input `{}` takes no default", p.name.name),
                    )
                    .label("side inputs are given at run time")
                    .with_secondary(span, "declared a side input here"),
                );
                None
            }
            (Some((ParamType::Int, _)), Some((ParamValue::Float(_), dspan))) => {
                self.error(
                    Diagnostic::error(
                        dspan,
                        format!(
                            "parameter `{}` is an int, but its default is a float",
                            p.name.name
                        ),
                    )
                    .label("expected an integer"),
                );
                None
            }
            (Some((ty, _)), _) => Some(ty),
            (None, Some((ParamValue::Int(_), _))) => Some(ParamType::Int),
            (None, Some((ParamValue::Float(_), _))) => Some(ParamType::Float),
            (None, None) => None,
        }
    }

    fn meaning(&self, name: &str, scope: &Scope) -> Option<Meaning> {
        if INDEX_NAMES.contains(&name) {
            return Some(Meaning::Index);
        }
        if name == "score" {
            return Some(Meaning::Score);
        }
        if name == "true" || name == "false" {
            return Some(Meaning::Bool);
        }
        if name == "n_heads" {
            return Some(Meaning::NHeads);
        }
        if let Some(ty) = scope.params.get(name) {
            return Some(Meaning::Param(*ty));
        }
        if let Some((table, _)) = self.tables.get(name) {
            return Some(Meaning::Table(table.ty()));
        }
        self.lets.get(name).map(|(v, _)| Meaning::Let(*v))
    }

    fn unknown_name(&mut self, span: Span, name: &str, scope: &Scope) {
        let mut candidates: Vec<&str> = INDEX_NAMES.to_vec();
        candidates.extend(["score", "n_heads", "true", "false"]);
        candidates.extend(scope.params.keys().copied());
        candidates.extend(self.lets.keys().map(String::as_str));
        candidates.extend(self.tables.keys().map(String::as_str));
        let suggestion = suggest(name, candidates).map(str::to_string);
        let d = Diagnostic::error(span, format!("unknown name `{name}`"))
            .label("not a parameter, a constant or one of q, k, h, b, score, n_heads, true, false");
        self.error(with_suggestion(d, suggestion.as_deref()));
    }

    /// Type-checks an expression of an attention body. `None` means an error was reported.
    fn typecheck(&mut self, expr: &Expr, scope: &Scope) -> Option<ScalarType> {
        match &expr.kind {
            ExprKind::Int(_) => Some(ScalarType::Int),
            ExprKind::Float(_) => Some(ScalarType::Float),
            ExprKind::Error => None,
            ExprKind::Name(name) => {
                match self.meaning(name, scope) {
                    Some(Meaning::Index) | Some(Meaning::NHeads) => Some(ScalarType::Int),
                    Some(Meaning::Bool) => Some(ScalarType::Bool),
                    Some(Meaning::Score) if scope.score_allowed => Some(ScalarType::Float),
                    Some(Meaning::Score) => {
                        self.error(
                            Diagnostic::error(
                                expr.span,
                                "`score` is only available in `score = ...`",
                            )
                            .label("a mask cannot read the score"),
                        );
                        None
                    }
                    Some(Meaning::Param(ParamType::Int)) => Some(ScalarType::Int),
                    Some(Meaning::Param(ParamType::Float)) => Some(ScalarType::Float),
                    Some(Meaning::Param(ParamType::Side)) => {
                        self.error(
                        Diagnostic::error(expr.span, format!("`{name}` is a side input: read it as `{name}[q]` or `{name}[k]`"))
                            .label("a per-token input needs a position"),
                    );
                        None
                    }
                    Some(Meaning::Let(v)) => Some(value_type(v)),
                    Some(Meaning::Table(_)) => {
                        self.error(
                            Diagnostic::error(
                                expr.span,
                                format!("`{name}` is a table: read an entry as `{name}[index]`"),
                            )
                            .label("a table is not a number"),
                        );
                        None
                    }
                    None => {
                        self.unknown_name(expr.span, name, scope);
                        None
                    }
                }
            }
            ExprKind::Unary(op, e) => {
                let t = self.typecheck(e, scope)?;
                match (op, t) {
                    (UnOp::Neg, ScalarType::Bool) => {
                        self.error(
                            Diagnostic::error(e.span, "`-` needs a number, found a bool")
                                .label("this is a condition"),
                        );
                        None
                    }
                    (UnOp::Not, t) if t != ScalarType::Bool => {
                        self.error(
                            Diagnostic::error(
                                e.span,
                                format!("`!` needs a bool, found {}", t.name()),
                            )
                            .label("expected a condition"),
                        );
                        None
                    }
                    _ => Some(t),
                }
            }
            ExprKind::Binary(op, a, b) => {
                let (ta, tb) = (self.typecheck(a, scope), self.typecheck(b, scope));
                let (ta, tb) = (ta?, tb?);
                let ir_op = op.to_ir();
                let sym = op.symbol();
                if ir_op.is_logical() {
                    for (t, side) in [(ta, a), (tb, b)] {
                        if t != ScalarType::Bool {
                            self.error(
                                Diagnostic::error(
                                    side.span,
                                    format!("`{sym}` needs a bool, found {}", t.name()),
                                )
                                .label("expected a condition")
                                .with_note("compare it with something, e.g. `x != 0`"),
                            );
                            return None;
                        }
                    }
                    return Some(ScalarType::Bool);
                }
                for (t, side) in [(ta, a), (tb, b)] {
                    if t == ScalarType::Bool {
                        self.error(
                            Diagnostic::error(
                                side.span,
                                format!("`{sym}` needs a number, found a bool"),
                            )
                            .label("this is a condition, not a number"),
                        );
                        return None;
                    }
                }
                if ir_op == ir::BinOp::Rem && (ta == ScalarType::Float || tb == ScalarType::Float) {
                    self.error(
                        Diagnostic::error(expr.span, "`%` needs integers on both sides")
                            .label("a float is involved"),
                    );
                    return None;
                }
                if matches!(ir_op, ir::BinOp::Div | ir::BinOp::Rem)
                    && ta == ScalarType::Int
                    && tb == ScalarType::Int
                    && matches!(b.kind, ExprKind::Int(0))
                {
                    self.error(Diagnostic::error(b.span, "division by zero").label("this is 0"));
                    return None;
                }
                Some(if ir_op.is_comparison() {
                    ScalarType::Bool
                } else if ta == ScalarType::Float || tb == ScalarType::Float {
                    ScalarType::Float
                } else {
                    ScalarType::Int
                })
            }
            ExprKind::Call(callee, args) => {
                let Some(func) = Func::from_name(&callee.name) else {
                    let names = Func::ALL.map(Func::name);
                    let d = Diagnostic::error(
                        callee.span,
                        format!("unknown function `{}`", callee.name),
                    )
                    .label("not a built-in function")
                    .with_note(format!("the functions are {}", names.join(", ")));
                    self.error(with_suggestion(d, suggest(&callee.name, names)));
                    return None;
                };
                if args.len() != func.arity() {
                    let plural = if func.arity() == 1 { "" } else { "s" };
                    self.error(
                        Diagnostic::error(
                            expr.span,
                            format!(
                                "`{}` takes {} argument{plural}, found {}",
                                func.name(),
                                func.arity(),
                                args.len()
                            ),
                        )
                        .label(format!("wrong number of arguments to `{}`", func.name())),
                    );
                    return None;
                }
                let mut types = Vec::new();
                for arg in args {
                    if let Some(name) = &arg.name {
                        self.error(Diagnostic::error(
                            name.span,
                            format!("`{}` takes no named arguments", func.name()),
                        ));
                        return None;
                    }
                    let t = self.typecheck(&arg.value, scope)?;
                    if t == ScalarType::Bool {
                        self.error(
                            Diagnostic::error(
                                arg.value.span,
                                format!("`{}` needs a number, found a bool", func.name()),
                            )
                            .label("this is a condition"),
                        );
                        return None;
                    }
                    types.push(t);
                }
                Some(
                    if func.is_transcendental() || types.contains(&ScalarType::Float) {
                        ScalarType::Float
                    } else {
                        ScalarType::Int
                    },
                )
            }
            ExprKind::Index(base, index) => {
                match self.meaning(&base.name, scope) {
                    Some(Meaning::Param(ParamType::Side)) => {}
                    Some(Meaning::Table(ty)) => {
                        return match self.typecheck(index, scope)? {
                            ScalarType::Int => Some(ty),
                            other => {
                                self.error(
                                    Diagnostic::error(
                                        index.span,
                                        format!(
                                            "a table index must be an integer, found {}",
                                            other.name()
                                        ),
                                    )
                                    .label("the entry to read"),
                                );
                                None
                            }
                        };
                    }
                    Some(_) => {
                        self.error(
                            Diagnostic::error(
                                base.span,
                                format!("`{}` cannot be indexed", base.name),
                            )
                            .label(
                                "only side inputs (`name: int[T]`) and tables (`let name = [...]`) are indexed",
                            ),
                        );
                        return None;
                    }
                    None => {
                        self.unknown_name(base.span, &base.name, scope);
                        return None;
                    }
                }
                let position = matches!(&index.kind, ExprKind::Name(n) if n == "q" || n == "k");
                if !position {
                    self.error(
                        Diagnostic::error(
                            index.span,
                            format!("side input `{}` can only be read at `q` or `k`", base.name),
                        )
                        .label("expected `q` or `k`"),
                    );
                    return None;
                }
                Some(ScalarType::Int)
            }
            ExprKind::List(_) => {
                self.error(
                    Diagnostic::error(expr.span, "a list is not a number or a condition")
                        .label("lists only appear in layer patterns"),
                );
                None
            }
        }
    }

    /// Translates a type-checked attention body to an index expression with values bound.
    fn translate(
        &self,
        expr: &Expr,
        values: &HashMap<&str, ParamValue>,
        n_heads: usize,
    ) -> ir::Expr {
        match &expr.kind {
            ExprKind::Int(v) => ir::Expr::Int(*v),
            ExprKind::Float(v) => ir::Expr::Float(*v),
            ExprKind::Error | ExprKind::List(_) => ir::Expr::Int(0),
            ExprKind::Name(name) => {
                if let Some(i) = INDEX_NAMES.iter().position(|n| n == name) {
                    return ir::Expr::Var([Var::Q, Var::K, Var::H, Var::B][i]);
                }
                match name.as_str() {
                    "score" => ir::Expr::Var(Var::Score),
                    "true" => ir::Expr::Bool(true),
                    "false" => ir::Expr::Bool(false),
                    "n_heads" => ir::Expr::Int(n_heads as i64),
                    _ => match values
                        .get(name.as_str())
                        .or_else(|| self.lets.get(name).map(|(v, _)| v))
                    {
                        Some(ParamValue::Int(v)) => ir::Expr::Int(*v),
                        Some(ParamValue::Float(v)) => ir::Expr::Float(*v),
                        None => ir::Expr::Int(0),
                    },
                }
            }
            ExprKind::Unary(op, e) => {
                let op = if *op == UnOp::Neg {
                    ir::UnOp::Neg
                } else {
                    ir::UnOp::Not
                };
                ir::Expr::Unary(op, Box::new(self.translate(e, values, n_heads)))
            }
            ExprKind::Binary(op, a, b) => ir::Expr::binary(
                op.to_ir(),
                self.translate(a, values, n_heads),
                self.translate(b, values, n_heads),
            ),
            ExprKind::Call(callee, args) => ir::Expr::Call(
                Func::from_name(&callee.name).unwrap_or(Func::Abs),
                args.iter()
                    .map(|a| self.translate(&a.value, values, n_heads))
                    .collect(),
            ),
            ExprKind::Index(base, index) => match self.tables.get(&base.name) {
                Some((table, _)) => ir::Expr::Table {
                    table: table.clone(),
                    index: Box::new(self.translate(index, values, n_heads)),
                },
                None => ir::Expr::Side {
                    name: base.name.clone(),
                    index: if matches!(&index.kind, ExprKind::Name(n) if n == "q") {
                        Var::Q
                    } else {
                        Var::K
                    },
                },
            },
        }
    }

    // ---------------------------------------------------------------- models

    fn model(&mut self, model: &'a ast::Model) -> Option<ModelSpec> {
        let mut fields: HashMap<String, &'a ast::Field> = HashMap::new();
        let mut rope_overrides: Vec<&'a ast::Field> = Vec::new();
        const KNOWN: [&str; 12] = [
            "vocab",
            "dim",
            "heads",
            "kv_heads",
            "head_dim",
            "ffn",
            "norm",
            "rope",
            "embeddings",
            "bias",
            "qk_norm",
            "layers",
        ];
        let mut ok = true;
        for field in &model.fields {
            let name = field.name.name.as_str();
            if !KNOWN.contains(&name) {
                let d = Diagnostic::error(field.name.span, format!("unknown model field `{name}`"))
                    .label("not a model field")
                    .with_note(format!("the fields are {}", KNOWN.join(", ")));
                self.error(with_suggestion(d, suggest(name, KNOWN)));
                ok = false;
                continue;
            }
            if field.qualifier.is_some() {
                if name == "rope" {
                    rope_overrides.push(field);
                } else {
                    self.error(
                        Diagnostic::error(
                            field.span,
                            format!("only `rope` can be set per attention kind, not `{name}`"),
                        )
                        .label("remove the `.kind` part"),
                    );
                    ok = false;
                }
                continue;
            }
            if let Some(first) = fields.insert(name.to_string(), field) {
                self.error(
                    Diagnostic::error(field.name.span, format!("field `{name}` is given twice"))
                        .label("second value")
                        .with_secondary(first.name.span, "first given here"),
                );
                ok = false;
            }
        }
        let mut missing = Vec::new();
        for required in ["vocab", "dim", "heads", "ffn", "norm", "rope", "layers"] {
            if !fields.contains_key(required) {
                missing.push(required);
            }
        }
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().map(|m| format!("`{m}`")).collect();
            let mut d = Diagnostic::error(
                model.name.span,
                format!("model `{}` is missing {}", model.name.name, list.join(", ")),
            )
            .label("incomplete model");
            if missing.contains(&"rope") {
                d = d.with_note("write `rope = none` for a model without position embeddings");
            }
            self.error(d);
            ok = false;
        }
        let int_field = |this: &mut Self, name: &str| -> Option<usize> {
            let field = fields.get(name)?;
            this.positive_int(&field.value, name)
        };
        let vocab = int_field(self, "vocab");
        let dim = int_field(self, "dim");
        let heads = int_field(self, "heads");
        let kv_heads = if fields.contains_key("kv_heads") {
            int_field(self, "kv_heads")
        } else {
            heads
        };
        let explicit_head_dim = if fields.contains_key("head_dim") {
            Some(int_field(self, "head_dim"))
        } else {
            None
        };
        let ffn_hidden = fields
            .get("ffn")
            .and_then(|f| self.constructor(&f.value, "ffn", "swiglu", "hidden"))
            .and_then(|e| self.positive_int(e, "hidden"));
        let norm_eps = fields
            .get("norm")
            .and_then(|f| self.constructor(&f.value, "norm", "rmsnorm", "eps"))
            .and_then(|e| self.positive_float(e, "eps"));
        let rope = fields.get("rope").map(|f| self.rope(&f.value));
        let biases = match fields.get("bias") {
            None => Some(Biases::default()),
            Some(f) => self.biases(&f.value),
        };
        let qk_norm = match fields.get("qk_norm") {
            None => Some(None),
            Some(f) if matches!(&f.value.kind, ExprKind::Name(n) if n == "none") => Some(None),
            Some(f) => self
                .constructor(&f.value, "qk_norm", "rmsnorm", "eps")
                .and_then(|e| self.positive_float(e, "eps"))
                .map(Some),
        };
        let tied = match fields.get("embeddings") {
            None => Some(false),
            Some(f) => match &f.value.kind {
                ExprKind::Name(n) if n == "tied" => Some(true),
                ExprKind::Name(n) if n == "untied" => Some(false),
                _ => {
                    self.error(
                        Diagnostic::error(f.value.span, "`embeddings` is `tied` or `untied`")
                            .label("expected `tied` or `untied`"),
                    );
                    None
                }
            },
        };

        // Sizes that must agree with each other.
        let mut head_dim = None;
        if let (Some(dim), Some(heads)) = (dim, heads) {
            match explicit_head_dim {
                Some(hd) => head_dim = hd,
                None if dim % heads != 0 => {
                    let span = fields["heads"].value.span;
                    self.error(
                        Diagnostic::error(
                            span,
                            format!("heads = {heads} does not divide dim = {dim}"),
                        )
                        .label("the head dim would not be a whole number")
                        .with_secondary(fields["dim"].value.span, "the model dim")
                        .with_note(
                            "pick a head count that divides dim, or set `head_dim` explicitly",
                        ),
                    );
                    ok = false;
                }
                None => head_dim = Some(dim / heads),
            }
        }
        if let (Some(heads), Some(kv)) = (heads, kv_heads)
            && heads % kv != 0
        {
            let span = fields
                .get("kv_heads")
                .map_or(model.name.span, |f| f.value.span);
            self.error(
                Diagnostic::error(
                    span,
                    format!("kv_heads = {kv} does not divide heads = {heads}"),
                )
                .label("each KV head must serve the same number of query heads")
                .with_secondary(fields["heads"].value.span, "the query heads"),
            );
            ok = false;
        }

        // The layer pattern and its attention kinds.
        let pattern = match fields.get("layers") {
            Some(f) => self.pattern(&f.value),
            None => None,
        };
        let n_heads = heads.unwrap_or(1);
        let mut kinds: Vec<AttentionKind> = Vec::new();
        let mut kind_keys: Vec<(String, Vec<(String, ParamValue)>)> = Vec::new();
        let mut layers = Vec::new();
        let mut kinds_ok = true;
        if let Some(pattern) = &pattern {
            if pattern.is_empty() {
                let span = fields["layers"].value.span;
                self.error(
                    Diagnostic::error(span, "the layer pattern is empty")
                        .label("a model needs at least one layer"),
                );
                ok = false;
            }
            for use_ in pattern {
                let Some(args) = self.bind_args(use_) else {
                    kinds_ok = false;
                    continue;
                };
                let key = (use_.attention.name.name.clone(), args.clone());
                let index = match kind_keys.iter().position(|k| *k == key) {
                    Some(i) => i,
                    None => {
                        let Some(kind) = self.instantiate(use_, args, n_heads) else {
                            kinds_ok = false;
                            kind_keys.push(key);
                            kinds.push(placeholder_kind());
                            layers.push(kinds.len() - 1);
                            continue;
                        };
                        kind_keys.push(key);
                        kinds.push(kind);
                        kinds.len() - 1
                    }
                };
                layers.push(index);
            }
        } else {
            ok = false;
        }

        // RoPE per kind: the model's default, overridden by `rope.kind = ...`.
        let default_rope = rope.flatten();
        let mut rope_ok = rope.is_some_and(|r| r.is_some());
        for kind in &mut kinds {
            kind.rope = default_rope.flatten();
        }
        for field in rope_overrides {
            let Some(qualifier) = &field.qualifier else {
                continue;
            };
            let rope = self.rope(&field.value);
            let matching: Vec<&mut AttentionKind> = kinds
                .iter_mut()
                .filter(|k| k.attention == qualifier.name)
                .collect();
            if matching.is_empty() {
                let used: Vec<String> = kind_keys.iter().map(|(n, _)| n.clone()).collect();
                let d = Diagnostic::error(
                    qualifier.span,
                    format!("no layer of this model uses attention `{}`", qualifier.name),
                )
                .label("not in the layer pattern");
                self.error(with_suggestion(
                    d,
                    suggest(&qualifier.name, used.iter().map(String::as_str)),
                ));
                rope_ok = false;
                continue;
            }
            match rope {
                Some(rope) => matching.into_iter().for_each(|k| k.rope = rope),
                None => rope_ok = false,
            }
        }
        if let Some(hd) = head_dim
            && hd % 2 == 1
            && kinds.iter().any(|k| k.rope.is_some())
        {
            let span = fields
                .get("head_dim")
                .or(fields.get("heads"))
                .map_or(model.name.span, |f| f.value.span);
            self.error(
                Diagnostic::error(span, format!("RoPE needs an even head dim, found {hd}"))
                    .label("rotate-half pairs the two halves of each head")
                    .with_secondary(fields["rope"].value.span, "RoPE is used here"),
            );
            ok = false;
        }

        if let Some(hd) = head_dim
            && hd > MAX_HEAD_DIM
        {
            let span = fields
                .get("head_dim")
                .or(fields.get("heads"))
                .map_or(model.name.span, |f| f.value.span);
            let mut diagnostic = Diagnostic::error(
                span,
                format!("a head dim of {hd} is more than the {MAX_HEAD_DIM} Zebra compiles"),
            )
            .label("the attention kernels are specialized to the head dim");
            if !fields.contains_key("head_dim") {
                diagnostic = diagnostic.with_secondary(fields["dim"].value.span, "dim / heads");
            }
            self.error(diagnostic);
            ok = false;
        }

        let mut side_inputs = BTreeSet::new();
        for kind in &kinds {
            side_inputs.extend(kind.sides.iter().cloned());
        }
        Some(ModelSpec {
            name: model.name.name.clone(),
            span: model.name.span,
            vocab: vocab?,
            dim: dim?,
            n_heads: heads?,
            n_kv_heads: kv_heads?,
            head_dim: head_dim?,
            ffn_hidden: ffn_hidden?,
            norm_eps: norm_eps?,
            tied_embeddings: tied?,
            biases: biases?,
            qk_norm: qk_norm?,
            kinds,
            layers,
            side_inputs: side_inputs.into_iter().collect(),
        })
        .filter(|_| ok && kinds_ok && rope_ok)
    }

    /// Reads `bias = [q, k, v]` (the projections with a bias, any of `q`, `k`, `v`, `o`) or
    /// `bias = none`.
    fn biases(&mut self, expr: &'a Expr) -> Option<Biases> {
        let usage = "write the projections with a bias as a list, e.g. `bias = [q, k, v]` \
                     (Qwen2), or `bias = none`";
        let items = match &expr.kind {
            ExprKind::Name(n) if n == "none" => return Some(Biases::default()),
            ExprKind::List(items) => items,
            _ => {
                self.error(
                    Diagnostic::error(expr.span, "expected a list of projections")
                        .label("not a list")
                        .with_note(usage),
                );
                return None;
            }
        };
        let mut biases = Biases::default();
        let mut ok = true;
        let mut seen: Vec<(&str, Span)> = Vec::new();
        for item in items {
            let name = match &item.kind {
                ExprKind::Name(n) if Biases::NAMES.contains(&n.as_str()) => n.as_str(),
                _ => {
                    let found = match &item.kind {
                        ExprKind::Name(n) => format!("`{n}`"),
                        _ => "this".to_string(),
                    };
                    let d = Diagnostic::error(
                        item.span,
                        format!("{found} is not an attention projection"),
                    )
                    .label("expected `q`, `k`, `v` or `o`");
                    let d = match &item.kind {
                        ExprKind::Name(n) => with_suggestion(d, suggest(n, Biases::NAMES)),
                        _ => d,
                    };
                    self.error(d);
                    ok = false;
                    continue;
                }
            };
            if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
                self.error(
                    Diagnostic::error(item.span, format!("`{name}` is listed twice"))
                        .label("second time")
                        .with_secondary(*first, "first listed here"),
                );
                ok = false;
                continue;
            }
            seen.push((name, item.span));
            biases.set(name);
        }
        ok.then_some(biases)
    }

    /// Reads `name(arg = value)` and returns the argument's expression.
    fn constructor(
        &mut self,
        expr: &'a Expr,
        field: &str,
        name: &str,
        arg: &str,
    ) -> Option<&'a Expr> {
        let found = self.constructor_args(expr, field, name, &[arg])?[0];
        if found.is_none() {
            self.needs(expr, field, name, arg);
        }
        found
    }

    /// Reports that `name(...)` lacks its argument `arg`.
    fn needs(&mut self, expr: &Expr, field: &str, name: &str, arg: &str) {
        let usage = format!("write `{field} = {name}({arg} = ...)`");
        self.error(Diagnostic::error(expr.span, format!("`{name}` needs `{arg}`")).label(usage));
    }

    /// Reads `name(param = value, ...)`: the expression given for each of `params`, in their
    /// order (`None` where one is not given). The first argument may be given unnamed.
    fn constructor_args(
        &mut self,
        expr: &'a Expr,
        field: &str,
        name: &str,
        params: &[&str],
    ) -> Option<Vec<Option<&'a Expr>>> {
        let usage = format!("write `{field} = {name}({} = ...)`", params[0]);
        let expected = match params {
            [one] => format!("expected `{one}`"),
            _ => format!("expected one of `{}`", params.join("`, `")),
        };
        match &expr.kind {
            ExprKind::Call(callee, args) if callee.name == name => {
                let mut found = vec![None; params.len()];
                for (i, a) in args.iter().enumerate() {
                    let slot = match &a.name {
                        Some(n) => match params.iter().position(|p| *p == n.name) {
                            Some(slot) => slot,
                            None => {
                                self.error(
                                    Diagnostic::error(
                                        n.span,
                                        format!("`{name}` has no argument `{}`", n.name),
                                    )
                                    .label(expected),
                                );
                                return None;
                            }
                        },
                        None if i == 0 || params.len() == 1 => 0,
                        None => {
                            self.error(
                                Diagnostic::error(
                                    a.value.span,
                                    format!("`{name}` takes arguments after the first by name"),
                                )
                                .label(expected),
                            );
                            return None;
                        }
                    };
                    if found[slot].replace(&a.value).is_some() {
                        let message = match params {
                            [one] => format!("`{name}` takes one argument, `{one}`"),
                            _ => format!("`{name}` has `{}` twice", params[slot]),
                        };
                        self.error(Diagnostic::error(a.value.span, message));
                        return None;
                    }
                }
                Some(found)
            }
            ExprKind::Call(callee, _) | ExprKind::Index(callee, _) => {
                self.error(
                    Diagnostic::error(callee.span, format!("unknown {field} `{}`", callee.name))
                        .label(format!("the only {field} is `{name}`"))
                        .with_note(usage),
                );
                None
            }
            ExprKind::Name(other) => {
                self.error(
                    Diagnostic::error(expr.span, format!("unknown {field} `{other}`"))
                        .label(format!("the only {field} is `{name}`"))
                        .with_note(usage),
                );
                None
            }
            _ => {
                self.error(
                    Diagnostic::error(expr.span, format!("expected `{name}(...)`")).label(usage),
                );
                None
            }
        }
    }

    /// Reads `rope(base = ...)`, optionally with `scaling = linear(...)|llama3(...)|yarn(...)`,
    /// or `none`: `Some(None)` is no RoPE, `None` an error.
    fn rope(&mut self, expr: &'a Expr) -> Option<Option<Rope>> {
        if matches!(&expr.kind, ExprKind::Name(n) if n == "none") {
            return Some(None);
        }
        let args = self.constructor_args(expr, "rope", "rope", &["base", "scaling"])?;
        let Some(base_expr) = args[0] else {
            self.needs(expr, "rope", "rope", "base");
            return None;
        };
        let base = as_f64(self.constant(base_expr)?);
        if base <= 1.0 || !base.is_finite() {
            self.error(
                Diagnostic::error(
                    base_expr.span,
                    format!("the RoPE base must be above 1, found {base}"),
                )
                .label("typical bases are 10000.0 and 1000000.0"),
            );
            return None;
        }
        let scaling = match args[1] {
            None => RopeScaling::None,
            Some(e) => self.rope_scaling(e)?,
        };
        Some(Some(Rope { base, scaling }))
    }

    /// Reads a RoPE scaling: `linear(factor = ...)`, `llama3(factor = ..., low_freq_factor =
    /// ..., high_freq_factor = ..., original_max_position = ...)` or `yarn(factor = ...,
    /// original_max_position = ...[, beta_fast = 32.0, beta_slow = 1.0, attention_factor =
    /// 0.1 ln(factor) + 1, truncate = true])`.
    fn rope_scaling(&mut self, expr: &'a Expr) -> Option<RopeScaling> {
        let usage = "the scalings are `linear(factor = ...)`, `llama3(...)` and `yarn(...)`";
        let kind = match &expr.kind {
            ExprKind::Call(callee, _) => callee.name.as_str(),
            ExprKind::Name(name) => name,
            _ => "",
        };
        let found = rope::parameters(kind);
        let (Some(params), ExprKind::Call(..)) = (found, &expr.kind) else {
            let d = Diagnostic::error(expr.span, "expected a RoPE scaling").label(usage);
            let d = match found {
                Some(params) => d.with_note(format!(
                    "write `{kind}({} = ...)` with its parameters",
                    params.join(" = ..., ")
                )),
                None => with_suggestion(d, suggest(kind, SCALINGS.iter().map(|(k, _)| *k))),
            };
            self.error(d);
            return None;
        };
        let given = self.constructor_args(expr, "scaling", kind, params)?;
        let mut values = Vec::new();
        for (param, e) in params.iter().zip(&given) {
            let value = match (*param, e) {
                (_, None) => None,
                ("truncate", Some(e)) => match &e.kind {
                    ExprKind::Name(b) if b == "true" => Some(1.0),
                    ExprKind::Name(b) if b == "false" => Some(0.0),
                    _ => {
                        self.error(
                            Diagnostic::error(e.span, "`truncate` is `true` or `false`")
                                .label("expected `true` or `false`"),
                        );
                        return None;
                    }
                },
                (_, Some(e)) => Some(as_f64(self.constant(e)?)),
            };
            values.push(value);
        }
        let value = |name: &str| {
            params
                .iter()
                .position(|p| *p == name)
                .and_then(|i| values[i])
        };
        match RopeScaling::from_values(kind, value) {
            Ok(scaling) => Some(scaling),
            Err(message) => {
                let takes = format!("`{kind}` takes `{}`", params.join("`, `"));
                self.error(Diagnostic::error(expr.span, message).label(takes));
                None
            }
        }
    }

    // ---------------------------------------------------------------- layer patterns

    /// Expands a layer pattern into one attention use per layer.
    fn pattern(&mut self, expr: &'a Expr) -> Option<Vec<Use<'a>>> {
        let mut out = Vec::new();
        self.pattern_into(expr, &mut out)?;
        Some(out)
    }

    fn pattern_into(&mut self, expr: &'a Expr, out: &mut Vec<Use<'a>>) -> Option<()> {
        match &expr.kind {
            ExprKind::Name(name) => {
                let attention = self.attention_named(name, expr.span)?;
                out.push(Use {
                    attention,
                    args: &[],
                    span: expr.span,
                });
            }
            ExprKind::Call(callee, args) => {
                let attention = self.attention_named(&callee.name, callee.span)?;
                out.push(Use {
                    attention,
                    args,
                    span: expr.span,
                });
            }
            ExprKind::List(items) => {
                let mut ok = true;
                for item in items {
                    ok &= self.pattern_into(item, out).is_some();
                }
                ok.then_some(())?;
            }
            ExprKind::Binary(ast::BinOp::Add, a, b) => {
                let first = self.pattern_into(a, out);
                let second = self.pattern_into(b, out);
                first.and(second)?;
            }
            ExprKind::Binary(ast::BinOp::Mul, a, b) => {
                // `3 * local` or `local * 3`: the count is the side that holds no layers.
                let (count, body) = if self.holds_layers(a) && !self.holds_layers(b) {
                    (b, a)
                } else {
                    (a, b)
                };
                let n = match self.constant(count)? {
                    ParamValue::Int(n) if n >= 0 => n as usize,
                    _ => {
                        self.error(
                            Diagnostic::error(
                                count.span,
                                "a repeat count must be a non-negative integer",
                            )
                            .label("expected a count such as `8`"),
                        );
                        return None;
                    }
                };
                let mut body_layers = Vec::new();
                self.pattern_into(body, &mut body_layers)?;
                if n.saturating_mul(body_layers.len())
                    .saturating_add(out.len())
                    > MAX_LAYERS
                {
                    self.error(
                        Diagnostic::error(
                            expr.span,
                            format!("the pattern has more than {MAX_LAYERS} layers"),
                        )
                        .label("too many layers"),
                    );
                    return None;
                }
                for _ in 0..n {
                    out.extend(body_layers.iter().cloned());
                }
            }
            ExprKind::Error => return None,
            _ => {
                self.error(
                    Diagnostic::error(expr.span, "expected a layer pattern")
                        .label("not a layer pattern")
                        .with_note("write attention kinds in lists, repeated with `*` and joined with `+`, e.g. `8 * [global, 3 * local]`"),
                );
                return None;
            }
        }
        if out.len() > MAX_LAYERS {
            self.error(
                Diagnostic::error(
                    expr.span,
                    format!("the pattern has more than {MAX_LAYERS} layers"),
                )
                .label("too many layers"),
            );
            return None;
        }
        Some(())
    }

    /// Whether an expression names attention kinds, so is a pattern rather than a count.
    fn holds_layers(&self, expr: &Expr) -> bool {
        match &expr.kind {
            ExprKind::Name(name) => !self.lets.contains_key(name),
            ExprKind::Call(..) | ExprKind::List(_) => true,
            ExprKind::Binary(_, a, b) => self.holds_layers(a) || self.holds_layers(b),
            ExprKind::Unary(_, e) => self.holds_layers(e),
            _ => false,
        }
    }

    fn attention_named(&mut self, name: &str, span: Span) -> Option<&'a ast::Attention> {
        if let Some(decl) = self.attentions.get(name) {
            return Some(*decl);
        }
        let d = Diagnostic::error(span, format!("unknown attention `{name}`"))
            .label("no `attention` of this name is declared above");
        let suggestion =
            suggest(name, self.attentions.keys().map(String::as_str)).map(str::to_string);
        self.error(with_suggestion(d, suggestion.as_deref()));
        None
    }

    /// Binds a use's arguments to the declaration's parameters, once per use.
    fn bind_args(&mut self, use_: &Use<'a>) -> Option<Vec<(String, ParamValue)>> {
        if let Some(bound) = self.bound.get(&use_.span) {
            return bound.clone();
        }
        let bound = self.bind_args_once(use_);
        self.bound.insert(use_.span, bound.clone());
        bound
    }

    fn bind_args_once(&mut self, use_: &Use<'a>) -> Option<Vec<(String, ParamValue)>> {
        let decl = use_.attention;
        if !self
            .attention_ok
            .get(&decl.name.name)
            .copied()
            .unwrap_or(false)
        {
            // The declaration's own errors were reported.
            return None;
        }
        let mut given: HashMap<&str, (ParamValue, Span)> = HashMap::new();
        let mut ok = true;
        let mut positional = decl
            .params
            .iter()
            .filter(|p| p.ty.map(|t| t.0) != Some(ParamType::Side));
        for arg in use_.args {
            let param = match &arg.name {
                Some(name) => match decl.params.iter().find(|p| p.name.name == name.name) {
                    Some(p) => p,
                    None => {
                        let names = decl.params.iter().map(|p| p.name.name.as_str());
                        let d = Diagnostic::error(
                            name.span,
                            format!(
                                "attention `{}` has no parameter `{}`",
                                decl.name.name, name.name
                            ),
                        )
                        .label("unknown parameter")
                        .with_secondary(decl.name.span, "declared here");
                        self.error(with_suggestion(d, suggest(&name.name, names)));
                        ok = false;
                        continue;
                    }
                },
                None => match positional.next() {
                    Some(p) => p,
                    None => {
                        self.error(
                            Diagnostic::error(
                                arg.value.span,
                                format!("attention `{}` takes no more arguments", decl.name.name),
                            )
                            .label("one argument too many")
                            .with_secondary(decl.name.span, "declared here"),
                        );
                        ok = false;
                        continue;
                    }
                },
            };
            let Some(value) = self.constant(&arg.value) else {
                ok = false;
                continue;
            };
            match param.ty.map(|t| t.0) {
                Some(ParamType::Side) => {
                    self.error(
                        Diagnostic::error(
                            arg.value.span,
                            format!("`{}` is a side input, given at run time", param.name.name),
                        )
                        .label("side inputs take no value here")
                        .with_note(format!(
                            "pass it with `zebra run --side {}=FILE.npy`",
                            param.name.name
                        )),
                    );
                    ok = false;
                    continue;
                }
                Some(ParamType::Int) if matches!(value, ParamValue::Float(_)) => {
                    self.error(
                        Diagnostic::error(
                            arg.value.span,
                            format!("`{}` is an int, found a float", param.name.name),
                        )
                        .label("expected an integer"),
                    );
                    ok = false;
                    continue;
                }
                _ => {}
            }
            if let Some((_, first)) =
                given.insert(param.name.name.as_str(), (value, arg.value.span))
            {
                self.error(
                    Diagnostic::error(
                        arg.value.span,
                        format!("`{}` is given twice", param.name.name),
                    )
                    .with_secondary(first, "first given here"),
                );
                ok = false;
            }
        }
        let mut values = Vec::new();
        for p in &decl.params {
            let ty = p.ty.map(|t| t.0);
            if ty == Some(ParamType::Side) {
                continue;
            }
            let value = match (given.get(p.name.name.as_str()), &p.default) {
                (Some((v, _)), _) => Some(*v),
                (None, Some(default)) => self.constant(default),
                (None, None) => {
                    self.error(
                        Diagnostic::error(
                            use_.span,
                            format!(
                                "attention `{}` needs a value for `{}`",
                                decl.name.name, p.name.name
                            ),
                        )
                        .label(format!("write `{}({} = ...)`", decl.name.name, p.name.name))
                        .with_secondary(p.name.span, "the parameter has no default"),
                    );
                    ok = false;
                    continue;
                }
            };
            let Some(value) = value else {
                ok = false;
                continue;
            };
            // Float parameters accept integer values.
            let value = match (ty, value) {
                (Some(ParamType::Float), ParamValue::Int(v)) => ParamValue::Float(v as f64),
                (_, v) => v,
            };
            values.push((p.name.name.clone(), value));
        }
        ok.then_some(values)
    }

    /// Builds an attention kind from a declaration and bound values, and checks the claims
    /// the declaration makes (causality, a query seeing itself, some key being visible).
    fn instantiate(
        &mut self,
        use_: &Use<'a>,
        args: Vec<(String, ParamValue)>,
        n_heads: usize,
    ) -> Option<AttentionKind> {
        let decl = use_.attention;
        let values: HashMap<&str, ParamValue> =
            args.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        let mask_field = decl.fields.iter().find(|f| f.name.name == "mask")?;
        let score_field = decl.fields.iter().find(|f| f.name.name == "score");
        let mask = self
            .translate(&mask_field.value, &values, n_heads)
            .fold_constants();
        let score =
            score_field.map(|f| self.translate(&f.value, &values, n_heads).fold_constants());
        let causal = matches!(decl.causality, Some((Causality::Causal, _)));
        let mut sides: BTreeSet<String> = mask.sides();
        if let Some(s) = &score {
            sides.extend(s.sides());
        }
        let mut defaults: Vec<(String, ParamValue)> = Vec::new();
        for p in &decl.params {
            if let Some(d) = &p.default
                && let Some(v) = self.constant(d)
            {
                defaults.push((p.name.name.clone(), v));
            }
        }
        let differing: Vec<String> = args
            .iter()
            .filter(|(n, v)| {
                !defaults.iter().any(|(dn, dv)| dn == n && (dv == v || matches!((dv, v), (ParamValue::Int(a), ParamValue::Float(b)) if *a as f64 == *b)))
            })
            .map(|(n, v)| format!("{n} = {v}"))
            .collect();
        let label = if differing.is_empty() {
            decl.name.name.clone()
        } else {
            format!("{}({})", decl.name.name, differing.join(", "))
        };
        let kind = AttentionKind {
            label,
            attention: decl.name.name.clone(),
            args,
            causal,
            mask,
            score,
            sides: sides.into_iter().collect(),
            rope: None,
            mask_loc: self.loc(mask_field.value.span),
            score_loc: score_field.map(|f| self.loc(f.value.span)),
            mask_span: mask_field.value.span,
            score_span: score_field.map(|f| f.value.span),
        };
        self.check_claims(&kind, use_, n_heads).then_some(kind)
    }

    fn check_claims(&mut self, kind: &AttentionKind, use_: &Use<'a>, n_heads: usize) -> bool {
        let heads = n_heads.min(16) as i64;
        let visible = |q: i64, k: i64, h: i64| kind.mask.eval(&SampleEnv { q, k, h }).as_bool();
        let here =
            |d: Diagnostic| d.with_secondary(use_.span, format!("`{}` is used here", kind.label));
        if kind.causal {
            let blind = (0..SAMPLE_POSITIONS)
                .flat_map(|q| (0..heads).map(move |h| (q, h)))
                .find(|&(q, h)| !visible(q, q, h));
            if let Some((q, h)) = blind {
                let head = if kind.mask.depends_on_head() {
                    format!(" in head {h}")
                } else {
                    String::new()
                };
                self.error(here(
                    Diagnostic::error(kind.mask_span, format!("`{}` is declared causal, but query {q}{head} cannot see its own key", kind.label))
                        .label(format!("false at q = k = {q}"))
                        .with_note("a causal attention must let every query see itself; a window of W keys keeps the W most recent, the query included (`q - k < W`), so W must be at least 1"),
                ));
                return false;
            }
            let future = (0..SAMPLE_POSITIONS)
                .flat_map(|q| {
                    (q + 1..SAMPLE_POSITIONS).flat_map(move |k| (0..heads).map(move |h| (q, k, h)))
                })
                .find(|&(q, k, h)| visible(q, k, h));
            if let Some((q, k, _)) = future {
                self.error(here(
                    Diagnostic::error(
                        kind.mask_span,
                        format!(
                            "`{}` is declared causal, but query {q} can see the later key {k}",
                            kind.label
                        ),
                    )
                    .label("true for a future key")
                    .with_note(
                        "add `k <= q` to the mask, or declare the attention `bidirectional`",
                    ),
                ));
                return false;
            }
        } else {
            let any = (0..SAMPLE_POSITIONS)
                .any(|q| (0..SAMPLE_POSITIONS).any(|k| (0..heads).any(|h| visible(q, k, h))));
            if !any {
                self.error(here(
                    Diagnostic::error(
                        kind.mask_span,
                        format!(
                            "the mask of `{}` hides every key from every query",
                            kind.label
                        ),
                    )
                    .label(format!("false for all positions below {SAMPLE_POSITIONS}")),
                ));
                return false;
            }
        }
        true
    }
}

/// One layer's attention in a pattern: the declaration, the arguments written, where.
#[derive(Clone)]
struct Use<'a> {
    attention: &'a ast::Attention,
    args: &'a [ast::Arg],
    span: Span,
}

fn as_f64(value: ParamValue) -> f64 {
    match value {
        ParamValue::Int(v) => v as f64,
        ParamValue::Float(v) => v,
    }
}

fn placeholder_kind() -> AttentionKind {
    AttentionKind {
        label: String::new(),
        attention: String::new(),
        args: Vec::new(),
        causal: true,
        mask: ir::Expr::Bool(true),
        score: None,
        sides: Vec::new(),
        rope: None,
        mask_loc: Loc { line: 0, col: 0 },
        score_loc: None,
        mask_span: Span::default(),
        score_span: None,
    }
}

/// Mask sampling positions: side inputs read as 0 everywhere (one document), batch row 0.
struct SampleEnv {
    q: i64,
    k: i64,
    h: i64,
}

impl Env for SampleEnv {
    fn var(&self, var: Var) -> Scalar {
        Scalar::Int(match var {
            Var::Q => self.q,
            Var::K => self.k,
            Var::H => self.h,
            Var::B | Var::Score => 0,
        })
    }

    fn side(&self, _name: &str, _index: Var) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_find_close_names() {
        assert_eq!(suggest("locl", ["local", "global"]), Some("local"));
        assert_eq!(suggest("xyz", ["local", "global"]), None);
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
