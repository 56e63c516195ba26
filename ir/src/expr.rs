//! Index expressions: the scalar language of attention masks and score modifiers.
//!
//! An expression is evaluated once per element of a `[batch, head, query, key]` index space.
//! It reads the indices `q`, `k`, `h`, `b`, the attention score `score` (score modifiers only),
//! per-token integer side inputs indexed by `q` or `k` (`doc[q]`) and constant tables read at
//! a computed index (`[64, 256, 1024][h % 3]`: per-head windows, slopes or biases).
//!
//! Integer arithmetic wraps on overflow and never traps: `/` is floor division and `%` the
//! matching remainder (its sign follows the divisor, as in Python), with `x / 0 == 0` and
//! `x % 0 == x`, so that `x == (x / y) * y + x % y` always holds. Float arithmetic is IEEE 754.

use std::collections::BTreeSet;
use std::fmt;

/// An index variable of the attention index space, or the score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Var {
    /// Query position.
    Q,
    /// Key position.
    K,
    /// Query head.
    H,
    /// Batch row.
    B,
    /// The attention score (score modifiers only).
    Score,
}

impl Var {
    pub fn name(self) -> &'static str {
        match self {
            Var::Q => "q",
            Var::K => "k",
            Var::H => "h",
            Var::B => "b",
            Var::Score => "score",
        }
    }

    pub fn from_name(name: &str) -> Option<Var> {
        match name {
            "q" => Some(Var::Q),
            "k" => Some(Var::K),
            "h" => Some(Var::H),
            "b" => Some(Var::B),
            "score" => Some(Var::Score),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }

    /// Binding strength: higher binds tighter.
    pub fn precedence(self) -> u8 {
        match self {
            BinOp::Or => 1,
            BinOp::And => 2,
            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => 3,
            BinOp::Add | BinOp::Sub => 4,
            BinOp::Mul | BinOp::Div | BinOp::Rem => 5,
        }
    }

    pub fn is_comparison(self) -> bool {
        self.precedence() == 3
    }

    pub fn is_logical(self) -> bool {
        matches!(self, BinOp::And | BinOp::Or)
    }

    pub const ALL: [BinOp; 13] = [
        BinOp::Add,
        BinOp::Sub,
        BinOp::Mul,
        BinOp::Div,
        BinOp::Rem,
        BinOp::Eq,
        BinOp::Ne,
        BinOp::Lt,
        BinOp::Le,
        BinOp::Gt,
        BinOp::Ge,
        BinOp::And,
        BinOp::Or,
    ];
}

/// A built-in function of the expression language.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Func {
    Tanh,
    Exp,
    Exp2,
    Log,
    Sqrt,
    Abs,
    Min,
    Max,
}

impl Func {
    pub const ALL: [Func; 8] = [
        Func::Tanh,
        Func::Exp,
        Func::Exp2,
        Func::Log,
        Func::Sqrt,
        Func::Abs,
        Func::Min,
        Func::Max,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Func::Tanh => "tanh",
            Func::Exp => "exp",
            Func::Exp2 => "exp2",
            Func::Log => "log",
            Func::Sqrt => "sqrt",
            Func::Abs => "abs",
            Func::Min => "min",
            Func::Max => "max",
        }
    }

    pub fn from_name(name: &str) -> Option<Func> {
        Func::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn arity(self) -> usize {
        match self {
            Func::Min | Func::Max => 2,
            _ => 1,
        }
    }

    /// Whether the function always computes in floating point (`abs`, `min`, `max` keep integers).
    pub fn is_transcendental(self) -> bool {
        !matches!(self, Func::Abs | Func::Min | Func::Max)
    }
}

/// The type of a scalar expression.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScalarType {
    Int,
    Float,
    Bool,
}

impl ScalarType {
    pub fn name(self) -> &'static str {
        match self {
            ScalarType::Int => "int",
            ScalarType::Float => "float",
            ScalarType::Bool => "bool",
        }
    }

    pub fn is_numeric(self) -> bool {
        self != ScalarType::Bool
    }
}

/// A constant table of numbers (all integers or all floats), read at a computed index. The
/// index is clamped to the table: below 0 it reads the first entry, past the end the last
/// (so `bias[q - k]` holds its last value for every longer distance, as T5's buckets do).
#[derive(Clone, Debug, PartialEq)]
pub enum Table {
    Int(Vec<i64>),
    Float(Vec<f64>),
}

impl Table {
    pub fn len(&self) -> usize {
        match self {
            Table::Int(v) => v.len(),
            Table::Float(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The type of the entries.
    pub fn ty(&self) -> ScalarType {
        match self {
            Table::Int(_) => ScalarType::Int,
            Table::Float(_) => ScalarType::Float,
        }
    }

    /// The entry an index reads (clamped to the table); 0 for an empty table.
    pub fn clamp(&self, index: i64) -> usize {
        index.clamp(0, self.len().saturating_sub(1) as i64) as usize
    }

    /// Entry `i` (which must be below [`Table::len`]).
    pub fn entry(&self, i: usize) -> Scalar {
        match self {
            Table::Int(v) => Scalar::Int(v[i]),
            Table::Float(v) => Scalar::Float(v[i]),
        }
    }

    /// The entry that `index` reads.
    pub fn get(&self, index: i64) -> Scalar {
        if self.is_empty() {
            return Scalar::Int(0);
        }
        self.entry(self.clamp(index))
    }

    /// The entries as literal expressions.
    pub fn literals(&self) -> Vec<Expr> {
        match self {
            Table::Int(v) => v.iter().map(|x| Expr::Int(*x)).collect(),
            Table::Float(v) => v.iter().map(|x| Expr::Float(*x)).collect(),
        }
    }
}

/// A scalar expression over the attention index space.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Int(i64),
    Float(f64),
    Bool(bool),
    Var(Var),
    /// A per-token integer side input read at the query or key position: `doc[q]`.
    Side {
        name: String,
        index: Var,
    },
    /// Entry `index` of a constant table (clamped): `[64, 256][h % 2]`.
    Table {
        table: Table,
        index: Box<Expr>,
    },
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
}

/// A scalar value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar {
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    pub fn as_f64(self) -> f64 {
        match self {
            Scalar::Int(i) => i as f64,
            Scalar::Float(x) => x,
            Scalar::Bool(b) => f64::from(u8::from(b)),
        }
    }

    pub fn as_bool(self) -> bool {
        match self {
            Scalar::Bool(b) => b,
            Scalar::Int(i) => i != 0,
            Scalar::Float(x) => x != 0.0,
        }
    }

    pub fn as_int(self) -> i64 {
        match self {
            Scalar::Int(i) => i,
            Scalar::Float(x) => x as i64,
            Scalar::Bool(b) => i64::from(b),
        }
    }
}

/// Where an expression is evaluated: index values, the score and the side inputs.
pub trait Env {
    fn var(&self, var: Var) -> Scalar;
    fn side(&self, name: &str, index: Var) -> i64;
}

/// Floor division that never traps: `x / 0 == 0`.
pub fn floor_div(x: i64, y: i64) -> i64 {
    if y == 0 {
        return 0;
    }
    let q = x.wrapping_div(y);
    if (x.wrapping_rem(y) != 0) && ((x < 0) != (y < 0)) {
        q.wrapping_sub(1)
    } else {
        q
    }
}

/// The remainder matching [`floor_div`]: its sign follows the divisor, and `x % 0 == x`.
pub fn floor_rem(x: i64, y: i64) -> i64 {
    if y == 0 {
        return x;
    }
    x.wrapping_sub(floor_div(x, y).wrapping_mul(y))
}

impl Expr {
    pub fn int(v: i64) -> Expr {
        Expr::Int(v)
    }

    pub fn var(v: Var) -> Expr {
        Expr::Var(v)
    }

    pub fn binary(op: BinOp, lhs: Expr, rhs: Expr) -> Expr {
        Expr::Binary(op, Box::new(lhs), Box::new(rhs))
    }

    /// Evaluates the expression. Never panics.
    pub fn eval(&self, env: &dyn Env) -> Scalar {
        match self {
            Expr::Int(v) => Scalar::Int(*v),
            Expr::Float(v) => Scalar::Float(*v),
            Expr::Bool(v) => Scalar::Bool(*v),
            Expr::Var(v) => env.var(*v),
            Expr::Side { name, index } => Scalar::Int(env.side(name, *index)),
            Expr::Table { table, index } => table.get(index.eval(env).as_int()),
            Expr::Unary(UnOp::Neg, e) => match e.eval(env) {
                Scalar::Int(i) => Scalar::Int(i.wrapping_neg()),
                other => Scalar::Float(-other.as_f64()),
            },
            Expr::Unary(UnOp::Not, e) => Scalar::Bool(!e.eval(env).as_bool()),
            Expr::Binary(op, lhs, rhs) => {
                // `&&` and `||` short-circuit like everywhere else.
                match op {
                    BinOp::And => {
                        return Scalar::Bool(lhs.eval(env).as_bool() && rhs.eval(env).as_bool());
                    }
                    BinOp::Or => {
                        return Scalar::Bool(lhs.eval(env).as_bool() || rhs.eval(env).as_bool());
                    }
                    _ => {}
                }
                binary(*op, lhs.eval(env), rhs.eval(env))
            }
            Expr::Call(func, args) => {
                let values: Vec<Scalar> = args.iter().map(|a| a.eval(env)).collect();
                call(*func, &values)
            }
        }
    }

    /// Infers the type of the expression, given the types of its variables.
    pub fn ty(&self) -> Result<ScalarType, String> {
        match self {
            Expr::Int(_) => Ok(ScalarType::Int),
            Expr::Float(_) => Ok(ScalarType::Float),
            Expr::Bool(_) => Ok(ScalarType::Bool),
            Expr::Var(Var::Score) => Ok(ScalarType::Float),
            Expr::Var(_) => Ok(ScalarType::Int),
            Expr::Side { index, name } => {
                if matches!(index, Var::Q | Var::K) {
                    Ok(ScalarType::Int)
                } else {
                    Err(format!("side input `{name}` must be indexed by `q` or `k`"))
                }
            }
            Expr::Table { table, index } => match index.ty()? {
                _ if table.is_empty() => Err("a table needs at least one entry".into()),
                ScalarType::Int => Ok(table.ty()),
                t => Err(format!(
                    "a table index must be an integer, found {}",
                    t.name()
                )),
            },
            Expr::Unary(UnOp::Neg, e) => match e.ty()? {
                ScalarType::Bool => Err("`-` needs a number, found a bool".into()),
                t => Ok(t),
            },
            Expr::Unary(UnOp::Not, e) => match e.ty()? {
                ScalarType::Bool => Ok(ScalarType::Bool),
                t => Err(format!("`!` needs a bool, found {}", t.name())),
            },
            Expr::Binary(op, lhs, rhs) => binary_type(*op, lhs.ty()?, rhs.ty()?),
            Expr::Call(func, args) => {
                if args.len() != func.arity() {
                    return Err(format!(
                        "`{}` takes {} argument(s), found {}",
                        func.name(),
                        func.arity(),
                        args.len()
                    ));
                }
                let types = args.iter().map(Expr::ty).collect::<Result<Vec<_>, _>>()?;
                call_type(*func, &types)
            }
        }
    }

    /// Visits every sub-expression, parents before children.
    pub fn walk(&self, visit: &mut dyn FnMut(&Expr)) {
        visit(self);
        match self {
            Expr::Unary(_, e) | Expr::Table { index: e, .. } => e.walk(visit),
            Expr::Binary(_, l, r) => {
                l.walk(visit);
                r.walk(visit);
            }
            Expr::Call(_, args) => args.iter().for_each(|a| a.walk(visit)),
            _ => {}
        }
    }

    /// The index variables the expression reads (side inputs count as their index).
    pub fn vars(&self) -> BTreeSet<Var> {
        let mut vars = BTreeSet::new();
        self.walk(&mut |e| match e {
            Expr::Var(v) => {
                vars.insert(*v);
            }
            Expr::Side { index, .. } => {
                vars.insert(*index);
            }
            _ => {}
        });
        vars
    }

    /// The names of the side inputs the expression reads, sorted.
    pub fn sides(&self) -> BTreeSet<String> {
        let mut sides = BTreeSet::new();
        self.walk(&mut |e| {
            if let Expr::Side { name, .. } = e {
                sides.insert(name.clone());
            }
        });
        sides
    }

    /// Whether the value may differ between batch rows (reads `b` or a side input).
    pub fn depends_on_batch(&self) -> bool {
        let mut depends = false;
        self.walk(&mut |e| depends |= matches!(e, Expr::Var(Var::B) | Expr::Side { .. }));
        depends
    }

    /// Evaluates every sub-expression that reads no variable, so that `window * 2` with
    /// `window = 4` becomes `8`. Float results that are not finite are left unfolded.
    pub fn fold_constants(&self) -> Expr {
        struct NoVars;
        impl Env for NoVars {
            fn var(&self, _: Var) -> Scalar {
                Scalar::Int(0)
            }
            fn side(&self, _: &str, _: Var) -> i64 {
                0
            }
        }
        let folded = match self {
            Expr::Table { table, index } => Expr::Table {
                table: table.clone(),
                index: Box::new(index.fold_constants()),
            },
            Expr::Unary(op, e) => Expr::Unary(*op, Box::new(e.fold_constants())),
            Expr::Binary(op, l, r) => Expr::binary(*op, l.fold_constants(), r.fold_constants()),
            Expr::Call(func, args) => {
                Expr::Call(*func, args.iter().map(Expr::fold_constants).collect())
            }
            other => return other.clone(),
        };
        let literal = |e: &Expr| matches!(e, Expr::Int(_) | Expr::Float(_) | Expr::Bool(_));
        let all_literal = match &folded {
            Expr::Unary(_, e) | Expr::Table { index: e, .. } => literal(e),
            Expr::Binary(_, l, r) => literal(l) && literal(r),
            Expr::Call(_, args) => args.iter().all(literal),
            _ => false,
        };
        if !all_literal || folded.ty().is_err() {
            return folded;
        }
        match folded.eval(&NoVars) {
            Scalar::Int(v) => Expr::Int(v),
            Scalar::Bool(v) => Expr::Bool(v),
            Scalar::Float(v) if v.is_finite() => Expr::Float(v),
            Scalar::Float(_) => folded,
        }
    }

    /// The expression with every occurrence of `from` replaced by `to`.
    pub fn replace(&self, from: &Expr, to: &Expr) -> Expr {
        if self == from {
            return to.clone();
        }
        let r = |e: &Expr| Box::new(e.replace(from, to));
        match self {
            Expr::Table { table, index } => Expr::Table {
                table: table.clone(),
                index: r(index),
            },
            Expr::Unary(op, e) => Expr::Unary(*op, r(e)),
            Expr::Binary(op, a, b) => Expr::Binary(*op, r(a), r(b)),
            Expr::Call(func, args) => {
                Expr::Call(*func, args.iter().map(|a| a.replace(from, to)).collect())
            }
            other => other.clone(),
        }
    }

    /// The operands of a chain of `&&` (the expression itself when it is no `&&`).
    pub fn conjuncts(&self) -> Vec<&Expr> {
        match self {
            Expr::Binary(BinOp::And, l, r) => {
                let mut all = l.conjuncts();
                all.extend(r.conjuncts());
                all
            }
            other => vec![other],
        }
    }

    /// Whether `self` is `k <= q` written one of the plain ways (`q >= k`, `q - k >= 0`,
    /// `0 <= q - k`, or strictly: `k < q`, `q > k`).
    pub fn is_key_at_most_query(&self) -> bool {
        let (k, q) = (&Expr::Var(Var::K), &Expr::Var(Var::Q));
        match self {
            Expr::Binary(BinOp::Le | BinOp::Lt, a, b) => {
                (**a == *k && **b == *q) || (**a == Expr::Int(0) && b.is_query_minus_key())
            }
            Expr::Binary(BinOp::Ge | BinOp::Gt, a, b) => {
                (**a == *q && **b == *k) || (a.is_query_minus_key() && **b == Expr::Int(0))
            }
            _ => false,
        }
    }

    /// Whether `self` is `q - k`, the distance from a key back to its query.
    pub fn is_query_minus_key(&self) -> bool {
        matches!(self, Expr::Binary(BinOp::Sub, a, b)
            if **a == Expr::Var(Var::Q) && **b == Expr::Var(Var::K))
    }

    /// Whether a mask never lets a query see a later key: one of its conjuncts is
    /// [`Expr::is_key_at_most_query`]. Then keys past the sequence's end need no check of
    /// their own in the rows of the sequence.
    pub fn sees_no_later_key(&self) -> bool {
        self.conjuncts().iter().any(|c| c.is_key_at_most_query())
    }

    /// Whether the value may differ between heads (reads `h`).
    pub fn depends_on_head(&self) -> bool {
        self.vars().contains(&Var::H)
    }

    /// The derivative of a score modifier with respect to `score`, as an expression in the
    /// same language (what the attention's backward multiplies the gradient by). At the kinks
    /// of `abs`, `min` and `max` it takes the average of the one-sided derivatives. `%` on the
    /// score has no derivative here: an error says so.
    pub fn score_derivative(&self) -> Result<Expr, String> {
        Ok(derivative(self)?.fold_constants())
    }
}

fn depends_on_score(e: &Expr) -> bool {
    e.vars().contains(&Var::Score)
}

fn float(v: f64) -> Expr {
    Expr::Float(v)
}

fn add(a: Expr, b: Expr) -> Expr {
    match (&a, &b) {
        (Expr::Float(x), _) if *x == 0.0 => b,
        (_, Expr::Float(y)) if *y == 0.0 => a,
        _ => Expr::binary(BinOp::Add, a, b),
    }
}

fn sub(a: Expr, b: Expr) -> Expr {
    match &b {
        Expr::Float(y) if *y == 0.0 => a,
        _ => Expr::binary(BinOp::Sub, a, b),
    }
}

fn mul(a: Expr, b: Expr) -> Expr {
    match (&a, &b) {
        (Expr::Float(x), _) | (_, Expr::Float(x)) if *x == 0.0 => float(0.0),
        (Expr::Float(x), _) if *x == 1.0 => b,
        (_, Expr::Float(y)) if *y == 1.0 => a,
        _ => Expr::binary(BinOp::Mul, a, b),
    }
}

fn div(a: Expr, b: Expr) -> Expr {
    match &a {
        Expr::Float(x) if *x == 0.0 => float(0.0),
        _ => Expr::binary(BinOp::Div, a, b),
    }
}

fn call_expr(func: Func, args: Vec<Expr>) -> Expr {
    Expr::Call(func, args)
}

/// `sign(x)` without branches: `x / max(|x|, 1e-30)` is exactly -1, 0 or 1 (for |x| > 1e-30).
fn sign(x: Expr) -> Expr {
    div(
        x.clone(),
        call_expr(Func::Max, vec![call_expr(Func::Abs, vec![x]), float(1e-30)]),
    )
}

fn derivative(e: &Expr) -> Result<Expr, String> {
    if !depends_on_score(e) {
        return Ok(float(0.0));
    }
    Ok(match e {
        Expr::Var(Var::Score) => float(1.0),
        Expr::Unary(UnOp::Neg, x) => mul(float(-1.0), derivative(x)?),
        Expr::Binary(op, l, r) => {
            let (l, r) = (&**l, &**r);
            match op {
                BinOp::Add => add(derivative(l)?, derivative(r)?),
                BinOp::Sub => sub(derivative(l)?, derivative(r)?),
                BinOp::Mul => add(
                    mul(derivative(l)?, r.clone()),
                    mul(l.clone(), derivative(r)?),
                ),
                BinOp::Div => div(
                    sub(
                        mul(derivative(l)?, r.clone()),
                        mul(l.clone(), derivative(r)?),
                    ),
                    mul(r.clone(), r.clone()),
                ),
                BinOp::Rem => return Err("`%` of the score has no derivative".into()),
                // Comparisons and logic are piecewise constant.
                _ => float(0.0),
            }
        }
        Expr::Call(func, args) => {
            let x = args[0].clone();
            let dx = derivative(&args[0])?;
            match func {
                Func::Tanh => {
                    let t = call_expr(Func::Tanh, vec![x]);
                    mul(sub(float(1.0), mul(t.clone(), t)), dx)
                }
                Func::Exp => mul(call_expr(Func::Exp, vec![x]), dx),
                Func::Exp2 => mul(
                    mul(
                        call_expr(Func::Exp2, vec![x]),
                        float(std::f64::consts::LN_2),
                    ),
                    dx,
                ),
                Func::Log => div(dx, x),
                Func::Sqrt => div(dx, mul(float(2.0), call_expr(Func::Sqrt, vec![x]))),
                Func::Abs => mul(sign(x), dx),
                Func::Min | Func::Max => {
                    let y = args[1].clone();
                    let dy = derivative(&args[1])?;
                    // The weight of x: 1 where x wins, 0 where y wins, 1/2 on ties.
                    let lead = if *func == Func::Min {
                        sub(y, x)
                    } else {
                        sub(x, y)
                    };
                    let weight = mul(add(sign(lead), float(1.0)), float(0.5));
                    add(dy.clone(), mul(sub(dx, dy), weight))
                }
            }
        }
        _ => float(0.0),
    })
}

fn binary_type(op: BinOp, lhs: ScalarType, rhs: ScalarType) -> Result<ScalarType, String> {
    use ScalarType::*;
    let sym = op.symbol();
    if op.is_logical() {
        return match (lhs, rhs) {
            (Bool, Bool) => Ok(Bool),
            (l, r) => Err(format!(
                "`{sym}` needs bools on both sides, found {} and {}",
                l.name(),
                r.name()
            )),
        };
    }
    if lhs == Bool || rhs == Bool {
        return Err(format!(
            "`{sym}` needs numbers on both sides, found {} and {}",
            lhs.name(),
            rhs.name()
        ));
    }
    if op.is_comparison() {
        return Ok(Bool);
    }
    if op == BinOp::Rem && (lhs == Float || rhs == Float) {
        return Err("`%` needs integers on both sides".into());
    }
    Ok(if lhs == Float || rhs == Float {
        Float
    } else {
        Int
    })
}

fn call_type(func: Func, args: &[ScalarType]) -> Result<ScalarType, String> {
    if let Some(bad) = args.iter().find(|t| **t == ScalarType::Bool) {
        return Err(format!(
            "`{}` needs numbers, found a {}",
            func.name(),
            bad.name()
        ));
    }
    if func.is_transcendental() || args.contains(&ScalarType::Float) {
        Ok(ScalarType::Float)
    } else {
        Ok(ScalarType::Int)
    }
}

fn binary(op: BinOp, lhs: Scalar, rhs: Scalar) -> Scalar {
    use Scalar::*;
    match (lhs, rhs) {
        (Int(a), Int(b)) => match op {
            BinOp::Add => Int(a.wrapping_add(b)),
            BinOp::Sub => Int(a.wrapping_sub(b)),
            BinOp::Mul => Int(a.wrapping_mul(b)),
            BinOp::Div => Int(floor_div(a, b)),
            BinOp::Rem => Int(floor_rem(a, b)),
            BinOp::Eq => Bool(a == b),
            BinOp::Ne => Bool(a != b),
            BinOp::Lt => Bool(a < b),
            BinOp::Le => Bool(a <= b),
            BinOp::Gt => Bool(a > b),
            BinOp::Ge => Bool(a >= b),
            BinOp::And => Bool(a != 0 && b != 0),
            BinOp::Or => Bool(a != 0 || b != 0),
        },
        (Bool(a), Bool(b)) if matches!(op, BinOp::And | BinOp::Or | BinOp::Eq | BinOp::Ne) => {
            match op {
                BinOp::And => Bool(a && b),
                BinOp::Or => Bool(a || b),
                BinOp::Eq => Bool(a == b),
                _ => Bool(a != b),
            }
        }
        (a, b) => {
            let (a, b) = (a.as_f64(), b.as_f64());
            match op {
                BinOp::Add => Float(a + b),
                BinOp::Sub => Float(a - b),
                BinOp::Mul => Float(a * b),
                BinOp::Div => Float(a / b),
                BinOp::Rem => Float(a % b),
                BinOp::Eq => Bool(a == b),
                BinOp::Ne => Bool(a != b),
                BinOp::Lt => Bool(a < b),
                BinOp::Le => Bool(a <= b),
                BinOp::Gt => Bool(a > b),
                BinOp::Ge => Bool(a >= b),
                BinOp::And => Bool(a != 0.0 && b != 0.0),
                BinOp::Or => Bool(a != 0.0 || b != 0.0),
            }
        }
    }
}

fn call(func: Func, args: &[Scalar]) -> Scalar {
    let arg = |i: usize| args.get(i).copied().unwrap_or(Scalar::Int(0));
    match func {
        Func::Tanh => Scalar::Float(arg(0).as_f64().tanh()),
        Func::Exp => Scalar::Float(arg(0).as_f64().exp()),
        Func::Exp2 => Scalar::Float(arg(0).as_f64().exp2()),
        Func::Log => Scalar::Float(arg(0).as_f64().ln()),
        Func::Sqrt => Scalar::Float(arg(0).as_f64().sqrt()),
        Func::Abs => match arg(0) {
            Scalar::Int(i) => Scalar::Int(i.wrapping_abs()),
            other => Scalar::Float(other.as_f64().abs()),
        },
        Func::Min | Func::Max => {
            let pick_min = func == Func::Min;
            match (arg(0), arg(1)) {
                (Scalar::Int(a), Scalar::Int(b)) => {
                    Scalar::Int(if pick_min { a.min(b) } else { a.max(b) })
                }
                (a, b) => {
                    let (a, b) = (a.as_f64(), b.as_f64());
                    Scalar::Float(if pick_min { a.min(b) } else { a.max(b) })
                }
            }
        }
    }
}

/// Writes a float so that parsing it back gives the same value.
pub fn fmt_float(value: f64) -> String {
    if value.is_nan() {
        "nan".to_string()
    } else if value.is_infinite() {
        if value > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        let text = format!("{value:?}");
        if text.contains(['.', 'e', 'E']) {
            text
        } else {
            format!("{text}.0")
        }
    }
}

const UNARY_PRECEDENCE: u8 = 6;

impl Expr {
    fn precedence(&self) -> u8 {
        match self {
            Expr::Binary(op, ..) => op.precedence(),
            Expr::Unary(..) => UNARY_PRECEDENCE,
            Expr::Int(v) if *v < 0 => UNARY_PRECEDENCE,
            Expr::Float(v) if v.is_sign_negative() => UNARY_PRECEDENCE,
            _ => 7,
        }
    }

    fn fmt_with(&self, f: &mut fmt::Formatter<'_>, min_precedence: u8) -> fmt::Result {
        let parens = self.precedence() < min_precedence;
        if parens {
            f.write_str("(")?;
        }
        match self {
            Expr::Int(v) => write!(f, "{v}")?,
            Expr::Float(v) => f.write_str(&fmt_float(*v))?,
            Expr::Bool(v) => write!(f, "{v}")?,
            Expr::Var(v) => f.write_str(v.name())?,
            Expr::Side { name, index } => write!(f, "{name}[{}]", index.name())?,
            Expr::Table { table, index } => {
                f.write_str("[")?;
                for (i, entry) in table.literals().iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    entry.fmt_with(f, 0)?;
                }
                f.write_str("][")?;
                index.fmt_with(f, 0)?;
                f.write_str("]")?;
            }
            Expr::Unary(op, e) => {
                f.write_str(if *op == UnOp::Neg { "-" } else { "!" })?;
                // `-(-1)` keeps its parentheses, and so does `-(1)`, which would
                // otherwise read back as the literal `-1`.
                let literal = matches!(**e, Expr::Int(_) | Expr::Float(_));
                if literal && e.precedence() > UNARY_PRECEDENCE {
                    write!(f, "({e})")?;
                } else {
                    e.fmt_with(f, UNARY_PRECEDENCE + 1)?;
                }
            }
            Expr::Binary(op, lhs, rhs) => {
                let p = op.precedence();
                let (left_min, right_min) = if op.is_comparison() {
                    (p + 1, p + 1)
                } else {
                    (p, p + 1)
                };
                lhs.fmt_with(f, left_min)?;
                write!(f, " {} ", op.symbol())?;
                rhs.fmt_with(f, right_min)?;
            }
            Expr::Call(func, args) => {
                write!(f, "{}(", func.name())?;
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    a.fmt_with(f, 0)?;
                }
                f.write_str(")")?;
            }
        }
        if parens {
            f.write_str(")")?;
        }
        Ok(())
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_with(f, 0)
    }
}

/// Parses the text form that `Display` writes. Used by the IR text parser.
pub fn parse_expr(text: &str) -> Result<Expr, String> {
    let tokens = tokenize(text)?;
    let mut parser = ExprParser { tokens, pos: 0 };
    let expr = parser.expr(0)?;
    if parser.pos != parser.tokens.len() {
        return Err(format!(
            "unexpected `{}` after the expression",
            parser.tokens[parser.pos]
        ));
    }
    Ok(expr)
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Int(i64),
    Float(f64),
    Ident(String),
    Punct(&'static str),
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Int(v) => write!(f, "{v}"),
            Tok::Float(v) => write!(f, "{}", fmt_float(*v)),
            Tok::Ident(s) => f.write_str(s),
            Tok::Punct(p) => f.write_str(p),
        }
    }
}

const PUNCTS: [&str; 19] = [
    "&&", "||", "==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/", "%", "!", "(", ")", "[", "]",
    ",",
];

fn tokenize(text: &str) -> Result<Vec<Tok>, String> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.') {
                // Exponent signs: `1e-5`.
                if (bytes[i] == b'e' || bytes[i] == b'E')
                    && i + 1 < bytes.len()
                    && (bytes[i + 1] == b'-' || bytes[i + 1] == b'+')
                {
                    i += 1;
                }
                i += 1;
            }
            let word = &text[start..i];
            if word.contains(['.', 'e', 'E']) {
                tokens.push(Tok::Float(
                    word.parse().map_err(|_| format!("bad number `{word}`"))?,
                ));
            } else {
                tokens.push(Tok::Int(
                    word.parse().map_err(|_| format!("bad integer `{word}`"))?,
                ));
            }
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            tokens.push(Tok::Ident(text[start..i].to_string()));
        } else if let Some(p) = PUNCTS.iter().find(|p| text[i..].starts_with(**p)) {
            tokens.push(Tok::Punct(p));
            i += p.len();
        } else {
            let ch = text[i..].chars().next().unwrap_or('?');
            return Err(format!("unexpected character `{ch}`"));
        }
    }
    Ok(tokens)
}

struct ExprParser {
    tokens: Vec<Tok>,
    pos: usize,
}

impl ExprParser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos)
    }

    fn eat(&mut self, punct: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Punct(p)) if *p == punct) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, punct: &str) -> Result<(), String> {
        if self.eat(punct) {
            Ok(())
        } else {
            Err(match self.peek() {
                Some(t) => format!("expected `{punct}`, found `{t}`"),
                None => format!("expected `{punct}`, found the end"),
            })
        }
    }

    fn binop(&self) -> Option<BinOp> {
        match self.peek() {
            Some(Tok::Punct(p)) => BinOp::ALL.into_iter().find(|op| op.symbol() == *p),
            _ => None,
        }
    }

    fn expr(&mut self, min_precedence: u8) -> Result<Expr, String> {
        let mut lhs = self.unary()?;
        while let Some(op) = self.binop() {
            let p = op.precedence();
            if p < min_precedence.max(1) {
                break;
            }
            self.pos += 1;
            let rhs = self.expr(p + 1)?;
            if op.is_comparison() && self.binop().is_some_and(BinOp::is_comparison) {
                return Err("comparisons do not chain; add parentheses".into());
            }
            lhs = Expr::binary(op, lhs, rhs);
        }
        Ok(lhs)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat("-") {
            return match self.peek() {
                Some(Tok::Int(v)) => {
                    let v = *v;
                    self.pos += 1;
                    Ok(Expr::Int(v.wrapping_neg()))
                }
                Some(Tok::Float(v)) => {
                    let v = *v;
                    self.pos += 1;
                    Ok(Expr::Float(-v))
                }
                Some(Tok::Ident(name)) if name == "inf" => {
                    self.pos += 1;
                    Ok(Expr::Float(f64::NEG_INFINITY))
                }
                _ => Ok(Expr::Unary(UnOp::Neg, Box::new(self.unary()?))),
            };
        }
        if self.eat("!") {
            return Ok(Expr::Unary(UnOp::Not, Box::new(self.unary()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let token = self.peek().cloned().ok_or("expected an expression")?;
        self.pos += 1;
        match token {
            Tok::Int(v) => Ok(Expr::Int(v)),
            Tok::Float(v) => Ok(Expr::Float(v)),
            Tok::Punct("(") => {
                let e = self.expr(0)?;
                self.expect(")")?;
                Ok(e)
            }
            Tok::Punct("[") => {
                let mut entries = Vec::new();
                loop {
                    entries.push(self.unary()?);
                    if self.eat("]") {
                        break;
                    }
                    self.expect(",")?;
                }
                let ints: Option<Vec<i64>> = entries
                    .iter()
                    .map(|e| match e {
                        Expr::Int(v) => Some(*v),
                        _ => None,
                    })
                    .collect();
                let floats: Option<Vec<f64>> = entries
                    .iter()
                    .map(|e| match e {
                        Expr::Float(v) => Some(*v),
                        _ => None,
                    })
                    .collect();
                let table = match (ints, floats) {
                    (Some(v), _) => Table::Int(v),
                    (_, Some(v)) => Table::Float(v),
                    _ => {
                        return Err(
                            "a table's entries must be all integer or all float literals".into(),
                        );
                    }
                };
                self.expect("[")?;
                let index = self.expr(0)?;
                self.expect("]")?;
                Ok(Expr::Table {
                    table,
                    index: Box::new(index),
                })
            }
            Tok::Ident(name) => match name.as_str() {
                "true" => Ok(Expr::Bool(true)),
                "false" => Ok(Expr::Bool(false)),
                "inf" => Ok(Expr::Float(f64::INFINITY)),
                "nan" => Ok(Expr::Float(f64::NAN)),
                _ => {
                    if self.eat("(") {
                        let func = Func::from_name(&name)
                            .ok_or_else(|| format!("unknown function `{name}`"))?;
                        let mut args = Vec::new();
                        if !self.eat(")") {
                            loop {
                                args.push(self.expr(0)?);
                                if self.eat(")") {
                                    break;
                                }
                                self.expect(",")?;
                            }
                        }
                        Ok(Expr::Call(func, args))
                    } else if self.eat("[") {
                        let index = match self.peek() {
                            Some(Tok::Ident(i)) => Var::from_name(i),
                            _ => None,
                        }
                        .filter(|v| matches!(v, Var::Q | Var::K))
                        .ok_or_else(|| format!("side input `{name}` must be indexed by q or k"))?;
                        self.pos += 1;
                        self.expect("]")?;
                        Ok(Expr::Side { name, index })
                    } else {
                        Var::from_name(&name)
                            .map(Expr::Var)
                            .ok_or_else(|| format!("unknown name `{name}`"))
                    }
                }
            },
            other => Err(format!("expected an expression, found `{other}`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_that_sees_no_later_key_is_recognized_and_holds() {
        let cases = [
            ("k <= q", true),
            ("q >= k && q - k < 8", true),
            ("q - k < 8 && k <= q", true),
            ("0 <= q - k && q - k < 8", true),
            ("k < 2 || (k <= q && q - k < 8)", false),
            ("k <= q && (k < 2 || q - k < 8)", true),
            ("q - k >= 0", true),
            ("k > q", false),
            ("q - k < 8", false),
            ("k <= q || k < 4", false),
        ];
        for (text, expected) in cases {
            let e = parse_expr(text).unwrap();
            assert_eq!(e.sees_no_later_key(), expected, "{text}");
            if expected {
                for q in 0..12 {
                    for k in q + 1..16 {
                        let at = At { q, k, doc: vec![] };
                        assert!(!e.eval(&at).as_bool(), "{text} sees key {k} from {q}");
                    }
                }
            }
        }
    }

    struct At {
        q: i64,
        k: i64,
        doc: Vec<i64>,
    }

    impl Env for At {
        fn var(&self, var: Var) -> Scalar {
            match var {
                Var::Q => Scalar::Int(self.q),
                Var::K => Scalar::Int(self.k),
                Var::Score => Scalar::Float(2.0),
                _ => Scalar::Int(0),
            }
        }
        fn side(&self, _name: &str, index: Var) -> i64 {
            let pos = if index == Var::Q { self.q } else { self.k };
            self.doc[pos as usize]
        }
    }

    fn eval(text: &str, q: i64, k: i64) -> Scalar {
        let env = At {
            q,
            k,
            doc: vec![0, 0, 1, 1, 1],
        };
        parse_expr(text).unwrap().eval(&env)
    }

    #[test]
    fn evaluates_masks() {
        assert_eq!(eval("k <= q && q - k < 2", 3, 2), Scalar::Bool(true));
        assert_eq!(eval("k <= q && q - k < 2", 3, 1), Scalar::Bool(false));
        assert_eq!(eval("doc[q] == doc[k]", 4, 2), Scalar::Bool(true));
        assert_eq!(eval("doc[q] == doc[k]", 4, 1), Scalar::Bool(false));
        assert_eq!(
            eval("50.0 * tanh(score / 50.0)", 0, 0),
            Scalar::Float(50.0 * (0.04f64).tanh())
        );
    }

    #[test]
    fn integer_division_floors_and_never_traps() {
        assert_eq!(floor_div(-7, 2), -4);
        assert_eq!(floor_rem(-7, 2), 1);
        assert_eq!(floor_div(7, -2), -4);
        assert_eq!(floor_rem(7, -2), -1);
        assert_eq!(floor_div(5, 0), 0);
        assert_eq!(floor_rem(5, 0), 5);
        assert_eq!(floor_div(i64::MIN, -1), i64::MIN);
    }

    #[test]
    fn printing_round_trips() {
        for text in [
            "k <= q && q - k < 4096",
            "(q - k) % 2 == 0",
            "-(-1)",
            "- -q",
            "-(1)",
            "!(k > q) || doc[q] == doc[k]",
            "score - exp2(-8.0 * (h + 1) / 8) * (q - k)",
            "q - (k - 1)",
            "min(q, k) * -2",
            "1e-5 + score",
        ] {
            let expr = parse_expr(text).unwrap();
            let printed = expr.to_string();
            assert_eq!(
                parse_expr(&printed).unwrap(),
                expr,
                "{text} printed as {printed}"
            );
        }
        assert_eq!(
            parse_expr("q - (k - 1)").unwrap().to_string(),
            "q - (k - 1)"
        );
        assert_eq!(parse_expr("(q - k) - 1").unwrap().to_string(), "q - k - 1");
    }

    #[test]
    fn constants_fold() {
        let e = parse_expr("k <= q && q - k < 4 * 2 + 1")
            .unwrap()
            .fold_constants();
        assert_eq!(e.to_string(), "k <= q && q - k < 9");
        let e = parse_expr("score - exp2(-8.0 * 2 / 8) * (q - k)")
            .unwrap()
            .fold_constants();
        assert_eq!(e.to_string(), "score - 0.25 * (q - k)");
    }

    #[test]
    fn types_are_checked() {
        assert_eq!(parse_expr("q + 1").unwrap().ty(), Ok(ScalarType::Int));
        assert_eq!(parse_expr("q + 1.0").unwrap().ty(), Ok(ScalarType::Float));
        assert!(parse_expr("q + (k < q)").unwrap().ty().is_err());
        assert!(parse_expr("!q").unwrap().ty().is_err());
        assert!(parse_expr("q % 2.0").unwrap().ty().is_err());
    }

    #[test]
    fn tables_read_a_clamped_entry_and_round_trip() {
        let text = "k <= q && q - k < [4, 8, -2][q - k - 1]";
        let e = parse_expr(text).unwrap();
        assert_eq!(e.to_string(), text);
        assert_eq!(e.ty(), Ok(ScalarType::Bool));
        // Distance 0 reads index -1, the first entry; 2 the second; 6 past the end, the last.
        let sees = |q: i64, k: i64| eval(text, q, k) == Scalar::Bool(true);
        assert!(sees(3, 3) && sees(4, 2) && !sees(9, 3) && !sees(4, 0));
        let biased = parse_expr("score + [0.5, -1.25][h]").unwrap();
        assert_eq!(biased.to_string(), "score + [0.5, -1.25][h]");
        assert_eq!(biased.ty(), Ok(ScalarType::Float));
        assert_eq!(eval("score + [0.5, -1.25][h]", 0, 0), Scalar::Float(2.5));
        assert_eq!(
            parse_expr("[1, 2, 3][4 - 3]").unwrap().fold_constants(),
            Expr::Int(2)
        );
        assert_eq!(
            parse_expr("[1.5, 2.5][h]").unwrap().score_derivative(),
            Ok(Expr::Float(0.0))
        );
        assert!(parse_expr("[1, 2][q < k]").unwrap().ty().is_err());
        assert!(parse_expr("[1, 2.0][q]").is_err());
        assert!(parse_expr("[1, 2]").is_err());
        let replaced = e.replace(&Expr::Var(Var::K), &Expr::Int(0));
        assert_eq!(
            replaced.to_string(),
            "0 <= q && q - 0 < [4, 8, -2][q - 0 - 1]"
        );
    }
}
