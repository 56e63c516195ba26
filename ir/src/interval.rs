//! Value-range analysis of index expressions: given the range of every index over a tile of
//! the attention matrix, a sound range for the expression's value. A mask whose range over
//! a tile is `{false}` hides the whole tile; `{true}` shows all of it.
//!
//! Each variable ranges independently, so `q - k` over `q in [0, 63], k in [64, 127]` is
//! exactly `[-127, -1]`; an expression that reads a variable twice may get a wider range than
//! its true one, never a narrower one.

use crate::expr::{BinOp, Expr, Func, Table, UnOp, Var, floor_div, floor_rem};

/// A sound range of values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Range {
    Int {
        lo: i64,
        hi: i64,
    },
    Float {
        lo: f64,
        hi: f64,
    },
    Bool {
        can_be_true: bool,
        can_be_false: bool,
    },
}

impl Range {
    pub const TRUE: Range = Range::Bool {
        can_be_true: true,
        can_be_false: false,
    };
    pub const FALSE: Range = Range::Bool {
        can_be_true: false,
        can_be_false: true,
    };
    pub const MAYBE: Range = Range::Bool {
        can_be_true: true,
        can_be_false: true,
    };

    pub fn int(lo: i64, hi: i64) -> Range {
        Range::Int { lo, hi }
    }

    fn as_float(self) -> (f64, f64) {
        match self {
            Range::Int { lo, hi } => (lo as f64, hi as f64),
            Range::Float { lo, hi } => (lo, hi),
            Range::Bool {
                can_be_true,
                can_be_false,
            } => (
                if can_be_false { 0.0 } else { 1.0 },
                if can_be_true { 1.0 } else { 0.0 },
            ),
        }
    }

    fn truth(self) -> (bool, bool) {
        match self {
            Range::Bool {
                can_be_true,
                can_be_false,
            } => (can_be_true, can_be_false),
            Range::Int { lo, hi } => (lo != 0 || hi != 0, lo <= 0 && 0 <= hi),
            Range::Float { lo, hi } => (lo != 0.0 || hi != 0.0, lo <= 0.0 && 0.0 <= hi),
        }
    }

    /// Whether every value in the range is true.
    pub fn always(self) -> bool {
        self.truth() == (true, false)
    }

    /// Whether every value in the range is false.
    pub fn never(self) -> bool {
        !self.truth().0
    }
}

/// The ranges of the variables over one tile.
pub trait RangeEnv {
    fn var(&self, var: Var) -> Range;
    /// The range of side input `name` over the positions that `index` ranges over.
    fn side(&self, name: &str, index: Var) -> Range;
}

fn bool_range(can_be_true: bool, can_be_false: bool) -> Range {
    Range::Bool {
        can_be_true,
        can_be_false,
    }
}

/// A sound range for the expression over the environment. Never panics.
pub fn range(expr: &Expr, env: &dyn RangeEnv) -> Range {
    match expr {
        Expr::Int(v) => Range::int(*v, *v),
        Expr::Float(v) => Range::Float { lo: *v, hi: *v },
        Expr::Bool(v) => bool_range(*v, !*v),
        Expr::Var(v) => env.var(*v),
        Expr::Side { name, index } => env.side(name, *index),
        Expr::Table { table, index } => table_range(table, range(index, env)),
        Expr::Unary(UnOp::Not, e) => {
            let (t, f) = range(e, env).truth();
            bool_range(f, t)
        }
        Expr::Unary(UnOp::Neg, e) => match range(e, env) {
            Range::Int { lo, hi } => match (hi.checked_neg(), lo.checked_neg()) {
                (Some(a), Some(b)) => Range::int(a, b),
                _ => Range::int(i64::MIN, i64::MAX),
            },
            other => {
                let (lo, hi) = other.as_float();
                Range::Float { lo: -hi, hi: -lo }
            }
        },
        Expr::Binary(op, a, b) => binary(*op, range(a, env), range(b, env)),
        Expr::Call(func, args) => {
            let ranges: Vec<Range> = args.iter().map(|a| range(a, env)).collect();
            call(*func, &ranges)
        }
    }
}

/// The entries a table can give for indices in `index` (clamped to the table, as it reads).
fn table_range(table: &Table, index: Range) -> Range {
    if table.is_empty() {
        return Range::int(0, 0);
    }
    let (first, last) = match index {
        Range::Int { lo, hi } => (table.clamp(lo), table.clamp(hi)),
        _ => (0, table.len() - 1),
    };
    match table {
        Table::Int(v) => {
            let entries = &v[first..=last];
            let lo = entries.iter().copied().min().unwrap_or(0);
            let hi = entries.iter().copied().max().unwrap_or(0);
            Range::int(lo, hi)
        }
        Table::Float(v) => {
            let entries = &v[first..=last];
            if entries.iter().any(|x| x.is_nan()) {
                return FULL_FLOAT;
            }
            let lo = entries.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = entries.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            Range::Float { lo, hi }
        }
    }
}

const FULL_INT: Range = Range::Int {
    lo: i64::MIN,
    hi: i64::MAX,
};
const FULL_FLOAT: Range = Range::Float {
    lo: f64::NEG_INFINITY,
    hi: f64::INFINITY,
};

fn binary(op: BinOp, a: Range, b: Range) -> Range {
    if op.is_logical() {
        let ((at, af), (bt, bf)) = (a.truth(), b.truth());
        return match op {
            BinOp::And => bool_range(at && bt, af || bf),
            _ => bool_range(at || bt, af && bf),
        };
    }
    if op.is_comparison() {
        return compare(op, a, b);
    }
    match (a, b) {
        (Range::Int { lo: al, hi: ah }, Range::Int { lo: bl, hi: bh }) => {
            int_arith(op, (al, ah), (bl, bh))
        }
        _ => {
            let ((al, ah), (bl, bh)) = (a.as_float(), b.as_float());
            float_arith(op, (al, ah), (bl, bh))
        }
    }
}

fn compare(op: BinOp, a: Range, b: Range) -> Range {
    if let (Range::Bool { .. }, Range::Bool { .. }) = (a, b) {
        // Equality of booleans: only decided when both are decided.
        let ((at, af), (bt, bf)) = (a.truth(), b.truth());
        let decided = |t: bool, f: bool| t != f;
        if decided(at, af) && decided(bt, bf) {
            let equal = at == bt;
            return match op {
                BinOp::Eq => bool_range(equal, !equal),
                BinOp::Ne => bool_range(!equal, equal),
                _ => Range::MAYBE,
            };
        }
        return Range::MAYBE;
    }
    let ((al, ah), (bl, bh)) = match (a, b) {
        (Range::Int { lo: al, hi: ah }, Range::Int { lo: bl, hi: bh }) => {
            // Compare integers exactly, without rounding through f64.
            return int_compare(op, (al, ah), (bl, bh));
        }
        _ => (a.as_float(), b.as_float()),
    };
    if [al, ah, bl, bh].iter().any(|x| x.is_nan()) {
        return Range::MAYBE;
    }
    let (can_true, can_false) = match op {
        BinOp::Lt => (al < bh, ah >= bl),
        BinOp::Le => (al <= bh, ah > bl),
        BinOp::Gt => (ah > bl, al <= bh),
        BinOp::Ge => (ah >= bl, al < bh),
        BinOp::Eq => (al <= bh && bl <= ah, !(al == ah && bl == bh && al == bl)),
        _ => (!(al == ah && bl == bh && al == bl), al <= bh && bl <= ah),
    };
    bool_range(can_true, can_false)
}

fn int_compare(op: BinOp, (al, ah): (i64, i64), (bl, bh): (i64, i64)) -> Range {
    let (can_true, can_false) = match op {
        BinOp::Lt => (al < bh, ah >= bl),
        BinOp::Le => (al <= bh, ah > bl),
        BinOp::Gt => (ah > bl, al <= bh),
        BinOp::Ge => (ah >= bl, al < bh),
        BinOp::Eq => (al <= bh && bl <= ah, !(al == ah && bl == bh && al == bl)),
        _ => (!(al == ah && bl == bh && al == bl), al <= bh && bl <= ah),
    };
    bool_range(can_true, can_false)
}

fn int_arith(op: BinOp, (al, ah): (i64, i64), (bl, bh): (i64, i64)) -> Range {
    let checked = |values: [Option<i64>; 4]| -> Range {
        if values.iter().any(Option::is_none) {
            return FULL_INT;
        }
        let values = values.map(|v| v.unwrap_or_default());
        Range::int(
            *values.iter().min().unwrap_or(&0),
            *values.iter().max().unwrap_or(&0),
        )
    };
    match op {
        BinOp::Add => match (al.checked_add(bl), ah.checked_add(bh)) {
            (Some(lo), Some(hi)) => Range::int(lo, hi),
            _ => FULL_INT,
        },
        BinOp::Sub => match (al.checked_sub(bh), ah.checked_sub(bl)) {
            (Some(lo), Some(hi)) => Range::int(lo, hi),
            _ => FULL_INT,
        },
        BinOp::Mul => checked([
            al.checked_mul(bl),
            al.checked_mul(bh),
            ah.checked_mul(bl),
            ah.checked_mul(bh),
        ]),
        BinOp::Div => {
            if bl > 0 || bh < 0 {
                // Floor division is monotone in each argument when the divisor keeps its sign.
                let candidates = [
                    floor_div(al, bl),
                    floor_div(al, bh),
                    floor_div(ah, bl),
                    floor_div(ah, bh),
                ];
                Range::int(
                    *candidates.iter().min().unwrap_or(&0),
                    *candidates.iter().max().unwrap_or(&0),
                )
            } else {
                // The divisor may be 0, where `x / 0 == 0`.
                let m = al
                    .unsigned_abs()
                    .max(ah.unsigned_abs())
                    .min(i64::MAX as u64) as i64;
                Range::int(-m, m)
            }
        }
        BinOp::Rem => {
            if bl == bh && bl > 0 {
                let c = bl;
                if ah.checked_sub(al).is_some_and(|w| w < c) && floor_div(al, c) == floor_div(ah, c)
                {
                    Range::int(floor_rem(al, c), floor_rem(ah, c))
                } else {
                    Range::int(0, c - 1)
                }
            } else if bl > 0 {
                Range::int(0, bh - 1)
            } else {
                FULL_INT
            }
        }
        _ => FULL_INT,
    }
}

fn float_arith(op: BinOp, (al, ah): (f64, f64), (bl, bh): (f64, f64)) -> Range {
    let span = |values: [f64; 4]| {
        if values.iter().any(|v| v.is_nan()) {
            return FULL_FLOAT;
        }
        Range::Float {
            lo: values.iter().copied().fold(f64::INFINITY, f64::min),
            hi: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    };
    match op {
        BinOp::Add => span([al + bl, ah + bh, al + bl, ah + bh]),
        BinOp::Sub => span([al - bh, ah - bl, al - bh, ah - bl]),
        BinOp::Mul => span([al * bl, al * bh, ah * bl, ah * bh]),
        BinOp::Div if bl > 0.0 || bh < 0.0 => span([al / bl, al / bh, ah / bl, ah / bh]),
        _ => FULL_FLOAT,
    }
}

fn call(func: Func, args: &[Range]) -> Range {
    let arg = |i: usize| args.get(i).copied().unwrap_or(Range::int(0, 0));
    let monotone = |f: fn(f64) -> f64| {
        let (lo, hi) = arg(0).as_float();
        let (a, b) = (f(lo), f(hi));
        if a.is_nan() || b.is_nan() {
            FULL_FLOAT
        } else {
            Range::Float {
                lo: a.min(b),
                hi: a.max(b),
            }
        }
    };
    match func {
        Func::Tanh => monotone(f64::tanh),
        Func::Exp => monotone(f64::exp),
        Func::Exp2 => monotone(f64::exp2),
        Func::Log => monotone(f64::ln),
        Func::Sqrt => monotone(f64::sqrt),
        Func::Abs => match arg(0) {
            Range::Int { lo, hi } => {
                let (a, b) = (lo.unsigned_abs(), hi.unsigned_abs());
                let top = a.max(b).min(i64::MAX as u64) as i64;
                if lo <= 0 && 0 <= hi {
                    Range::int(0, top)
                } else {
                    Range::int(a.min(b).min(i64::MAX as u64) as i64, top)
                }
            }
            other => {
                let (lo, hi) = other.as_float();
                let (a, b) = (lo.abs(), hi.abs());
                if lo <= 0.0 && 0.0 <= hi {
                    Range::Float {
                        lo: 0.0,
                        hi: a.max(b),
                    }
                } else {
                    Range::Float {
                        lo: a.min(b),
                        hi: a.max(b),
                    }
                }
            }
        },
        Func::Min | Func::Max => match (arg(0), arg(1)) {
            (Range::Int { lo: al, hi: ah }, Range::Int { lo: bl, hi: bh }) => {
                if func == Func::Min {
                    Range::int(al.min(bl), ah.min(bh))
                } else {
                    Range::int(al.max(bl), ah.max(bh))
                }
            }
            (a, b) => {
                let ((al, ah), (bl, bh)) = (a.as_float(), b.as_float());
                if func == Func::Min {
                    Range::Float {
                        lo: al.min(bl),
                        hi: ah.min(bh),
                    }
                } else {
                    Range::Float {
                        lo: al.max(bl),
                        hi: ah.max(bh),
                    }
                }
            }
        },
    }
}

/// A side input's range over a query tile and over a key tile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SideRange {
    pub name: String,
    pub over_q: (i64, i64),
    pub over_k: (i64, i64),
}

/// The ranges of one tile: query positions `[q_lo, q_hi]`, key positions `[k_lo, k_hi]`, every
/// head and batch row, and side inputs given per tile.
pub struct TileEnv<'a> {
    pub q: (i64, i64),
    pub k: (i64, i64),
    pub heads: i64,
    pub batch: i64,
    /// For each side input: its range over the query tile and over the key tile. A side
    /// input missing here may take any value.
    pub sides: &'a [SideRange],
}

impl RangeEnv for TileEnv<'_> {
    fn var(&self, var: Var) -> Range {
        match var {
            Var::Q => Range::int(self.q.0, self.q.1),
            Var::K => Range::int(self.k.0, self.k.1),
            Var::H => Range::int(0, (self.heads - 1).max(0)),
            Var::B => Range::int(0, (self.batch - 1).max(0)),
            Var::Score => FULL_FLOAT,
        }
    }

    fn side(&self, name: &str, index: Var) -> Range {
        match self.sides.iter().find(|s| s.name == name) {
            Some(s) => {
                let (lo, hi) = if index == Var::Q { s.over_q } else { s.over_k };
                Range::int(lo, hi)
            }
            None => FULL_INT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::parse_expr;

    fn over(mask: &str, q: (i64, i64), k: (i64, i64)) -> Range {
        let env = TileEnv {
            q,
            k,
            heads: 4,
            batch: 1,
            sides: &[],
        };
        range(&parse_expr(mask).unwrap(), &env)
    }

    #[test]
    fn causal_tiles() {
        assert!(over("k <= q", (64, 127), (0, 63)).always());
        assert!(over("k <= q", (0, 63), (64, 127)).never());
        assert_eq!(over("k <= q", (0, 63), (0, 63)), Range::MAYBE);
    }

    #[test]
    fn window_tiles() {
        let w = "k <= q && q - k < 32";
        assert!(over(w, (128, 191), (0, 63)).never());
        assert_eq!(over(w, (128, 191), (64, 127)), Range::MAYBE);
        assert!(over("k <= q && q - k < 200", (128, 191), (64, 127)).always());
    }

    #[test]
    fn table_tiles_take_the_entries_the_indices_reach() {
        // Heads 0..3 read windows 16, 32, 8 and 64.
        let w = "k <= q && q - k < [16, 32, 8, 64][h]";
        assert!(over(w, (128, 191), (0, 63)).never());
        assert_eq!(over(w, (128, 191), (96, 127)), Range::MAYBE);
        assert!(over("k <= q && q - k < [70, 80][h / 4]", (64, 127), (60, 63)).always());
        assert_eq!(
            over("[0.5, -2.0, 3.0][q - k]", (10, 20), (0, 5)),
            Range::Float { lo: 3.0, hi: 3.0 }
        );
        // Distances -5..1: the first two entries (negative indices read the first).
        assert_eq!(over("[5, 1, 7][q - k]", (0, 5), (4, 5)), Range::int(1, 5));
    }

    #[test]
    fn chunk_and_remainder_tiles() {
        let c = "k <= q && q / 64 == k / 64";
        assert!(over(c, (64, 127), (0, 63)).never());
        assert_eq!(over(c, (64, 127), (64, 127)), Range::MAYBE);
        assert_eq!(over("(q - k) % 2 == 0", (0, 63), (0, 63)), Range::MAYBE);
        assert!(over("(q - k) % 64 == 0", (5, 5), (0, 3)).never());
    }

    #[test]
    fn documents_by_tile_ranges() {
        let sides = vec![SideRange {
            name: "doc".to_string(),
            over_q: (0, 0),
            over_k: (1, 2),
        }];
        let env = TileEnv {
            q: (64, 127),
            k: (0, 63),
            heads: 1,
            batch: 1,
            sides: &sides,
        };
        assert!(range(&parse_expr("k <= q && doc[q] == doc[k]").unwrap(), &env).never());
    }
}
