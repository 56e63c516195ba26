//! Vector math for kernels: a polynomial `exp` (LLVM would call libm per lane), and the
//! compilation of index expressions (masks, score modifiers) into vector code over a run of
//! consecutive keys. Specialized means compiled: the mask is not interpreted at run time.

use zebra_ir::expr::{BinOp, Expr, Func, Table, UnOp, Var};

use crate::mlir::{Builder, I64, Val, vf32, vi1, vi64};

/// `exp` on a vector of f32, after Cephes' `expf` (relative error about 1e-7); `-inf` and
/// anything below -87.3 give exactly 0.
pub fn exp(b: &mut Builder, x: &Val, n: usize) -> Val {
    let ty = vf32(n);
    let hi = b.splat_f32(88.376_26, n);
    let lo = b.splat_f32(-88.376_26, n);
    let clamped_hi = b.bin("minnumf", x, &hi, &ty);
    let xc = b.bin("maxnumf", &clamped_hi, &lo, &ty);
    let log2e = b.splat_f32(std::f32::consts::LOG2_E, n);
    let half = b.splat_f32(0.5, n);
    let t = b.fma(&xc, &log2e, &half, &ty);
    let fx = b.op(format!("math.floor {t} : {ty}"));
    let c1 = b.splat_f32(-0.693_359_4, n);
    let c2 = b.splat_f32(2.121_944_4e-4, n);
    let r1 = b.fma(&fx, &c1, &xc, &ty);
    let r = b.fma(&fx, &c2, &r1, &ty);
    let z = b.bin("mulf", &r, &r, &ty);
    let mut y = b.splat_f32(1.987_569_1e-4, n);
    for c in [
        1.398_199_9e-3f32,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        let cv = b.splat_f32(c, n);
        y = b.fma(&y, &r, &cv, &ty);
    }
    let y2 = b.fma(&y, &z, &r, &ty);
    let one = b.splat_f32(1.0, n);
    let y3 = b.bin("addf", &y2, &one, &ty);
    let ity = format!("vector<{n}xi32>");
    let ni = b.op(format!("arith.fptosi {fx} : {ty} to {ity}"));
    let bias = b.op(format!("arith.constant dense<127> : {ity}"));
    let nb = b.bin("addi", &ni, &bias, &ity);
    let shift = b.op(format!("arith.constant dense<23> : {ity}"));
    let bits = b.bin("shli", &nb, &shift, &ity);
    let pow2 = b.op(format!("arith.bitcast {bits} : {ity} to {ty}"));
    let value = b.bin("mulf", &y3, &pow2, &ty);
    let floor = b.splat_f32(-87.3, n);
    let tiny = b.cmpf("olt", x, &floor, &ty);
    let zero = b.splat_f32(0.0, n);
    b.select(&tiny, &zero, &value, &ty)
}

/// `2^x` on a vector of f32 for `x <= 0` (`-inf` included; no NaN), as the online softmax
/// needs it: `2^n * p(f)` with `n` the nearest integer to `x` and `p` a degree-5 minimax
/// polynomial of `2^f` on `[-0.5, 0.5]` (relative error about 1.5e-7, as good as the
/// degree-6 Taylor polynomial); anything below -126.5 gives exactly 0.
pub fn exp2_nonpositive(b: &mut Builder, x: &Val, n: usize) -> Val {
    let ty = vf32(n);
    let lo = b.splat_f32(-127.0, n);
    // `nnan`: x86's `max` is then one instruction, not a NaN-handling blend.
    let y = b.op(format!("arith.maxnumf {x}, {lo} fastmath<nnan> : {ty}"));
    let whole = b.op(format!("math.roundeven {y} : {ty}"));
    let f = b.bin("subf", &y, &whole, &ty);
    const COEFFICIENTS: [f32; 6] = [
        1.000_000_1,
        0.693_146_97,
        0.240_221_2,
        0.055_507_134,
        0.009_675_541,
        0.001_327_645_7,
    ];
    let mut p = b.splat_f32(COEFFICIENTS[5], n);
    for &c in COEFFICIENTS[..5].iter().rev() {
        let cv = b.splat_f32(c, n);
        p = b.fma(&p, &f, &cv, &ty);
    }
    let ity = format!("vector<{n}xi32>");
    let ni = b.op(format!("arith.fptosi {whole} : {ty} to {ity}"));
    let bias = b.op(format!("arith.constant dense<127> : {ity}"));
    let nb = b.bin("addi", &ni, &bias, &ity);
    let shift = b.op(format!("arith.constant dense<23> : {ity}"));
    let bits = b.bin("shli", &nb, &shift, &ity);
    let pow2 = b.op(format!("arith.bitcast {bits} : {ity} to {ty}"));
    let value = b.bin("mulf", &p, &pow2, &ty);
    let floor = b.splat_f32(-126.5, n);
    let tiny = b.cmpf("olt", x, &floor, &ty);
    let zero = b.splat_f32(0.0, n);
    b.select(&tiny, &zero, &value, &ty)
}

/// A compiled value: `n` lanes of one type.
#[derive(Clone, Debug)]
pub enum Lanes {
    Int(Val),
    Float(Val),
    Bool(Val),
}

/// The inputs of a vectorized expression: scalar query position, head and batch row,
/// `n` consecutive key positions, the scores, and the side inputs.
pub struct VecEnv<'a> {
    pub n: usize,
    /// The query position (i64).
    pub q: Val,
    /// The first key position (i64); lane `l` is `k0 + l`.
    pub k0: Val,
    pub h: Val,
    pub b: Val,
    /// The scores (`vector<n x f32>`), for score modifiers.
    pub score: Option<Val>,
    /// For each side input: its name and a pointer to its row `b` (i64 values; padded so
    /// that reading `n` lanes past the end is safe).
    pub sides: &'a [(String, Val)],
    /// Integer lanes in 32 bits (twice as many per register), for expressions that
    /// [`fits_in_32_bits`] shows never need more; else 64.
    pub narrow: bool,
    /// Key positions per lane (`vector<n x i64>`, with `narrow` off) instead of `k0 + lane`:
    /// the slots of a KV cache hold keys in any order.
    pub keys: Option<Val>,
}

/// The longest sequence kernels are built for: index expressions are checked to fit their
/// integer lanes for every position below it.
pub const MAX_SEQ_LEN: i64 = 1 << 24;

impl VecEnv<'_> {
    /// The type of the integer lanes.
    pub fn int_ty(&self) -> String {
        if self.narrow {
            format!("vector<{}xi32>", self.n)
        } else {
            vi64(self.n)
        }
    }

    fn splat_int(&self, b: &mut Builder, value: i64) -> Val {
        b.op(format!("arith.constant dense<{value}> : {}", self.int_ty()))
    }

    /// An i64 scalar (a position, head or batch row) in every lane.
    fn splat_index(&self, b: &mut Builder, scalar: &Val) -> Val {
        if self.narrow {
            let x = b.op(format!("arith.trunci {scalar} : i64 to i32"));
            b.splat(&x, "i32", self.n)
        } else {
            b.splat(scalar, I64, self.n)
        }
    }

    /// Lanes whose key `k0 + lane` is below `t` (an i64 scalar).
    pub fn keys_below(&self, b: &mut Builder, t: &Val) -> Val {
        let end = self.splat_index(b, t);
        let base = self.splat_index(b, &self.k0);
        let iota = self.iota(b);
        let ty = self.int_ty();
        let keys = b.bin("addi", &base, &iota, &ty);
        b.cmpi("slt", &keys, &end, &ty)
    }

    fn iota(&self, b: &mut Builder) -> Val {
        let items: Vec<String> = (0..self.n).map(|i| i.to_string()).collect();
        b.op(format!(
            "arith.constant dense<[{}]> : {}",
            items.join(", "),
            self.int_ty()
        ))
    }
}

/// Whether every integer `expr` computes lies in 32 bits, for positions below
/// [`MAX_SEQ_LEN`], heads below `heads` and batch rows below 2^20, by value-range analysis
/// of each subexpression. Side inputs hold arbitrary 64-bit values: never.
pub fn fits_in_32_bits(expr: &Expr, heads: i64) -> bool {
    use zebra_ir::interval::{Range, TileEnv, range};
    let env = TileEnv {
        q: (0, MAX_SEQ_LEN - 1),
        k: (0, MAX_SEQ_LEN - 1),
        heads,
        batch: 1 << 20,
        sides: &[],
    };
    let mut fits = true;
    expr.walk(&mut |e| {
        if matches!(e, Expr::Side { .. }) {
            fits = false;
        }
        if let Range::Int { lo, hi } = range(e, &env)
            && (lo < i64::from(i32::MIN) || hi > i64::from(i32::MAX))
        {
            fits = false;
        }
    });
    fits
}

fn as_float(b: &mut Builder, v: Lanes, env: &VecEnv) -> Val {
    let n = env.n;
    match v {
        Lanes::Float(f) => f,
        Lanes::Int(i) => b.sitofp(&i, &env.int_ty(), &vf32(n)),
        Lanes::Bool(x) => {
            let one = b.splat_f32(1.0, n);
            let zero = b.splat_f32(0.0, n);
            b.select(&x, &one, &zero, &vf32(n))
        }
    }
}

fn as_bool(b: &mut Builder, v: Lanes, env: &VecEnv) -> Val {
    let n = env.n;
    match v {
        Lanes::Bool(x) => x,
        Lanes::Int(i) => {
            let zero = env.splat_int(b, 0);
            b.cmpi("ne", &i, &zero, &env.int_ty())
        }
        Lanes::Float(f) => {
            let zero = b.splat_f32(0.0, n);
            b.cmpf("une", &f, &zero, &vf32(n))
        }
    }
}

fn int(b: &mut Builder, v: Lanes, env: &VecEnv) -> Val {
    let n = env.n;
    match v {
        Lanes::Int(i) => i,
        Lanes::Float(f) => b.fptosi(&f, &vf32(n), &env.int_ty()),
        Lanes::Bool(x) => {
            let one = env.splat_int(b, 1);
            let zero = env.splat_int(b, 0);
            b.select(&x, &one, &zero, &env.int_ty())
        }
    }
}

/// Floor division that never traps: `x / 0 == 0`.
fn floor_div(b: &mut Builder, x: &Val, y: &Val, env: &VecEnv, divisor: &Expr) -> Val {
    let ty = env.int_ty();
    if matches!(divisor, Expr::Int(c) if *c != 0) {
        return b.bin("floordivsi", x, y, &ty);
    }
    let zero = env.splat_int(b, 0);
    let one = env.splat_int(b, 1);
    let is_zero = b.cmpi("eq", y, &zero, &ty);
    let safe = b.select(&is_zero, &one, y, &ty);
    let q = b.bin("floordivsi", x, &safe, &ty);
    b.select(&is_zero, &zero, &q, &ty)
}

/// Compiles `expr` to `n`-lane vector code.
pub fn compile(b: &mut Builder, expr: &Expr, env: &VecEnv) -> Lanes {
    let n = env.n;
    match expr {
        Expr::Int(v) => Lanes::Int(env.splat_int(b, *v)),
        Expr::Float(v) => Lanes::Float(b.splat_f32(*v as f32, n)),
        Expr::Bool(v) => Lanes::Bool(b.op(format!("arith.constant dense<{v}> : {}", vi1(n)))),
        Expr::Var(Var::Q) => Lanes::Int(env.splat_index(b, &env.q)),
        Expr::Var(Var::H) => Lanes::Int(env.splat_index(b, &env.h)),
        Expr::Var(Var::B) => Lanes::Int(env.splat_index(b, &env.b)),
        Expr::Var(Var::K) if env.keys.is_some() => Lanes::Int(env.keys.clone().expect("checked")),
        Expr::Var(Var::K) => {
            let base = env.splat_index(b, &env.k0);
            let iota = env.iota(b);
            Lanes::Int(b.bin("addi", &base, &iota, &env.int_ty()))
        }
        Expr::Var(Var::Score) => match &env.score {
            Some(s) => Lanes::Float(s.clone()),
            None => Lanes::Float(b.splat_f32(0.0, n)),
        },
        Expr::Side { name, index } => {
            let row = env
                .sides
                .iter()
                .find(|(s, _)| s == name)
                .map(|(_, p)| p.clone());
            let Some(row) = row else {
                return Lanes::Int(env.splat_int(b, 0));
            };
            if *index == Var::Q {
                let v = b.load(&row, &env.q, I64, I64);
                Lanes::Int(b.splat(&v, I64, n))
            } else {
                Lanes::Int(b.load(&row, &env.k0, I64, &env.int_ty()))
            }
        }
        Expr::Table { table, index } => {
            let i = compile(b, index, env);
            let i = int(b, i, env);
            lookup(b, table, &i, env)
        }
        Expr::Unary(UnOp::Not, e) => {
            let v = compile(b, e, env);
            let x = as_bool(b, v, env);
            let t = b.op(format!("arith.constant dense<true> : {}", vi1(n)));
            Lanes::Bool(b.bin("xori", &x, &t, &vi1(n)))
        }
        Expr::Unary(UnOp::Neg, e) => match compile(b, e, env) {
            Lanes::Float(f) => Lanes::Float(b.op(format!("arith.negf {f} : {}", vf32(n)))),
            other => {
                let i = int(b, other, env);
                let zero = env.splat_int(b, 0);
                Lanes::Int(b.bin("subi", &zero, &i, &env.int_ty()))
            }
        },
        Expr::Binary(op, x, y) => match window_band(expr) {
            Some(band) => window(b, expr, band, env),
            None => binary(b, *op, x, y, env),
        },
        Expr::Call(func, args) => call(b, *func, args, env),
    }
}

/// Entry `i` of a constant table in each lane, the index clamped to the table: a chain of
/// selects (the first entry below index 1, the last from the last index on), so that no
/// memory is read and the same code serves every target.
fn lookup(b: &mut Builder, table: &Table, i: &Val, env: &VecEnv) -> Lanes {
    let n = env.n;
    let ity = env.int_ty();
    let (ty, entries): (String, Vec<Val>) = match table {
        Table::Int(v) => (
            ity.clone(),
            v.iter().map(|x| env.splat_int(b, *x)).collect(),
        ),
        Table::Float(v) => (
            vf32(n),
            v.iter().map(|x| b.splat_f32(*x as f32, n)).collect(),
        ),
    };
    let Some((first, rest)) = entries.split_first() else {
        return Lanes::Int(env.splat_int(b, 0));
    };
    let mut value = first.clone();
    let last = rest.len();
    for (k, entry) in rest.iter().enumerate() {
        let at = env.splat_int(b, k as i64 + 1);
        let pred = if k + 1 == last { "sge" } else { "eq" };
        let hit = b.cmpi(pred, i, &at, &ity);
        value = b.select(&hit, entry, &value, &ty);
    }
    match table {
        Table::Int(_) => Lanes::Int(value),
        Table::Float(_) => Lanes::Float(value),
    }
}

/// In a chain of `&&`, the conjunct that says `k <= q`, the one that says `q - k < bound`
/// (a sliding window's two sides) and the bound, a non-negative literal.
fn window_band(expr: &Expr) -> Option<(usize, usize, i64)> {
    if !matches!(expr, Expr::Binary(BinOp::And, ..)) {
        return None;
    }
    let conjuncts = expr.conjuncts();
    let lower = conjuncts.iter().position(|c| {
        c.is_key_at_most_query() && !matches!(c, Expr::Binary(BinOp::Lt | BinOp::Gt, ..))
    })?;
    let upper = conjuncts.iter().enumerate().find_map(|(i, c)| match c {
        Expr::Binary(BinOp::Lt, d, w) | Expr::Binary(BinOp::Gt, w, d) if d.is_query_minus_key() => {
            match **w {
                Expr::Int(bound) if bound >= 0 => Some((i, bound)),
                _ => None,
            }
        }
        _ => None,
    })?;
    Some((lower, upper.0, upper.1))
}

/// A chain of `&&` with a [`window_band`]: `0 <= q - k < bound` as one unsigned comparison
/// (a negative distance is above any non-negative bound as an unsigned number), and the
/// other conjuncts.
fn window(
    b: &mut Builder,
    expr: &Expr,
    (lower, upper, bound): (usize, usize, i64),
    env: &VecEnv,
) -> Lanes {
    let distance = Expr::binary(BinOp::Sub, Expr::Var(Var::Q), Expr::Var(Var::K));
    let d = compile(b, &distance, env);
    let d = int(b, d, env);
    let limit = env.splat_int(b, bound);
    let mut seen = b.cmpi("ult", &d, &limit, &env.int_ty());
    for (i, c) in expr.conjuncts().into_iter().enumerate() {
        if i != lower && i != upper {
            let v = compile(b, c, env);
            let x = as_bool(b, v, env);
            seen = b.bin("andi", &seen, &x, &vi1(env.n));
        }
    }
    Lanes::Bool(seen)
}

fn binary(b: &mut Builder, op: BinOp, x: &Expr, y: &Expr, env: &VecEnv) -> Lanes {
    let n = env.n;
    let (xv, yv) = (compile(b, x, env), compile(b, y, env));
    if op.is_logical() {
        let (xb, yb) = (as_bool(b, xv, env), as_bool(b, yv, env));
        let name = if op == BinOp::And { "andi" } else { "ori" };
        return Lanes::Bool(b.bin(name, &xb, &yb, &vi1(n)));
    }
    let float = matches!(xv, Lanes::Float(_)) || matches!(yv, Lanes::Float(_));
    if float {
        let (xf, yf) = (as_float(b, xv, env), as_float(b, yv, env));
        let ty = vf32(n);
        let pred = |p: &str| Some(p.to_string());
        let cmp = match op {
            BinOp::Lt => pred("olt"),
            BinOp::Le => pred("ole"),
            BinOp::Gt => pred("ogt"),
            BinOp::Ge => pred("oge"),
            BinOp::Eq => pred("oeq"),
            BinOp::Ne => pred("une"),
            _ => None,
        };
        if let Some(p) = cmp {
            return Lanes::Bool(b.cmpf(&p, &xf, &yf, &ty));
        }
        let name = match op {
            BinOp::Add => "addf",
            BinOp::Sub => "subf",
            BinOp::Mul => "mulf",
            BinOp::Div => "divf",
            _ => "remf",
        };
        return Lanes::Float(b.bin(name, &xf, &yf, &ty));
    }
    let (xi, yi) = (int(b, xv, env), int(b, yv, env));
    let ty = env.int_ty();
    let cmp = match op {
        BinOp::Lt => Some("slt"),
        BinOp::Le => Some("sle"),
        BinOp::Gt => Some("sgt"),
        BinOp::Ge => Some("sge"),
        BinOp::Eq => Some("eq"),
        BinOp::Ne => Some("ne"),
        _ => None,
    };
    if let Some(p) = cmp {
        return Lanes::Bool(b.cmpi(p, &xi, &yi, &ty));
    }
    Lanes::Int(match op {
        BinOp::Add => b.bin("addi", &xi, &yi, &ty),
        BinOp::Sub => b.bin("subi", &xi, &yi, &ty),
        BinOp::Mul => b.bin("muli", &xi, &yi, &ty),
        BinOp::Div => floor_div(b, &xi, &yi, env, y),
        _ => {
            let q = floor_div(b, &xi, &yi, env, y);
            let qy = b.bin("muli", &q, &yi, &ty);
            b.bin("subi", &xi, &qy, &ty)
        }
    })
}

fn call(b: &mut Builder, func: Func, args: &[Expr], env: &VecEnv) -> Lanes {
    let n = env.n;
    let ty = vf32(n);
    let values: Vec<Lanes> = args.iter().map(|a| compile(b, a, env)).collect();
    let all_int = values.iter().all(|v| matches!(v, Lanes::Int(_)));
    match func {
        Func::Abs if all_int => {
            let x = int(b, values[0].clone(), env);
            let zero = env.splat_int(b, 0);
            let neg = b.bin("subi", &zero, &x, &env.int_ty());
            let is_neg = b.cmpi("slt", &x, &zero, &env.int_ty());
            Lanes::Int(b.select(&is_neg, &neg, &x, &env.int_ty()))
        }
        Func::Min | Func::Max if all_int => {
            let (x, y) = (
                int(b, values[0].clone(), env),
                int(b, values[1].clone(), env),
            );
            let name = if func == Func::Min { "minsi" } else { "maxsi" };
            Lanes::Int(b.bin(name, &x, &y, &env.int_ty()))
        }
        _ => {
            let x = as_float(b, values[0].clone(), env);
            Lanes::Float(match func {
                Func::Exp => exp(b, &x, n),
                Func::Exp2 => {
                    let ln2 = b.splat_f32(std::f32::consts::LN_2, n);
                    let scaled = b.bin("mulf", &x, &ln2, &ty);
                    exp(b, &scaled, n)
                }
                Func::Tanh => {
                    // tanh(x) = 1 - 2 / (exp(2x) + 1); exact at both saturations.
                    let two = b.splat_f32(2.0, n);
                    let one = b.splat_f32(1.0, n);
                    let x2 = b.bin("mulf", &x, &two, &ty);
                    let e = exp(b, &x2, n);
                    let d = b.bin("addf", &e, &one, &ty);
                    let f = b.bin("divf", &two, &d, &ty);
                    b.bin("subf", &one, &f, &ty)
                }
                Func::Log => b.op(format!("math.log {x} : {ty}")),
                Func::Sqrt => b.op(format!("math.sqrt {x} : {ty}")),
                Func::Abs => b.op(format!("math.absf {x} : {ty}")),
                Func::Min | Func::Max => {
                    let y = as_float(b, values[1].clone(), env);
                    let name = if func == Func::Min {
                        "minnumf"
                    } else {
                        "maxnumf"
                    };
                    b.bin(name, &x, &y, &ty)
                }
            })
        }
    }
}

/// Compiles a mask to `n` lanes of i1.
pub fn mask(b: &mut Builder, expr: &Expr, env: &VecEnv) -> Val {
    let v = compile(b, expr, env);
    as_bool(b, v, env)
}

/// Compiles a score modifier to `n` lanes of f32.
pub fn score(b: &mut Builder, expr: &Expr, env: &VecEnv) -> Val {
    let v = compile(b, expr, env);
    as_float(b, v, env)
}
