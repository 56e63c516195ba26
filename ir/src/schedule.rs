//! Block-sparse tile schedules: which tiles of the `[query, key]` attention matrix a fused
//! attention visits, and which of them need the mask evaluated per element.
//!
//! Two analyses of the mask work together. The *support* says, for a range of queries, which
//! keys can possibly be visible (`k in [q - 31, q]` for a window of 32), so that a query tile
//! only looks at the key tiles near its band: the cost is O(visited), not O(T^2). The
//! *value-range* analysis (`interval.rs`) then classifies each candidate tile as empty
//! (skipped), full (no mask evaluation) or partial. Optionally, partial tiles of masks whose
//! inputs are known are refined by evaluating every element, which makes the schedule exact.

use std::fmt::Write;

use crate::expr::{BinOp, Env, Expr, Func, Scalar, UnOp, Var};
use crate::interval::{SideRange, TileEnv, range};

/// How a tile of the attention matrix is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TileKind {
    /// Every element is visible: no mask evaluation.
    Full,
    /// Some elements may be hidden: the mask is evaluated per element.
    Partial,
}

/// A bound on the key position as a function of the query position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// `a * q + d`.
    Linear { a: i64, d: i64 },
    /// The first (`end == false`) or last key of the chunk of `c` positions holding `q`.
    Chunk { c: i64, end: bool },
}

impl Bound {
    fn at(self, q: i64) -> i64 {
        match self {
            Bound::Linear { a, d } => a.saturating_mul(q).saturating_add(d),
            Bound::Chunk { c, end } => {
                let start = crate::expr::floor_div(q, c).saturating_mul(c);
                if end {
                    start.saturating_add(c - 1)
                } else {
                    start
                }
            }
        }
    }

    /// The smallest and largest value over `q in [q0, q1]` (every bound is monotone in `q`).
    fn over(self, q0: i64, q1: i64) -> (i64, i64) {
        let (a, b) = (self.at(q0), self.at(q1));
        (a.min(b), a.max(b))
    }

    fn describe(self) -> String {
        match self {
            Bound::Linear { a: 0, d } => d.to_string(),
            Bound::Linear { a, d } => {
                let q = if a == 1 {
                    "q".to_string()
                } else {
                    format!("{a} * q")
                };
                match d {
                    0 => q,
                    d if d > 0 => format!("{q} + {d}"),
                    d => format!("{q} - {}", d.unsigned_abs()),
                }
            }
            Bound::Chunk { c, end: false } => format!("q / {c} * {c}"),
            Bound::Chunk { c, end: true } => format!("q / {c} * {c} + {}", c - 1),
        }
    }
}

/// Keys `k` with `k >= every low` and `k <= every high`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRange {
    pub lows: Vec<Bound>,
    pub highs: Vec<Bound>,
}

impl KeyRange {
    fn all() -> KeyRange {
        KeyRange::default()
    }

    /// Whether every key `other` allows, this range allows too: each of this range's bounds
    /// is implied by one of `other`'s (the same bound, or a linear one of the same slope that
    /// is tighter). False when that is not known.
    fn covers(&self, other: &KeyRange) -> bool {
        let implied = |mine: &Bound, theirs: &Bound, low: bool| match (mine, theirs) {
            (Bound::Linear { a, d }, Bound::Linear { a: b, d: e }) => {
                a == b && if low { e >= d } else { e <= d }
            }
            (mine, theirs) => mine == theirs,
        };
        self.lows
            .iter()
            .all(|l| other.lows.iter().any(|o| implied(l, o, true)))
            && self
                .highs
                .iter()
                .all(|h| other.highs.iter().any(|o| implied(h, o, false)))
    }

    /// Whether the range holds no key at all: a constant upper bound below 0 (keys start at
    /// 0), as `k < sinks` has with no sinks.
    fn is_empty(&self) -> bool {
        self.highs
            .iter()
            .any(|h| matches!(h, Bound::Linear { a: 0, d } if *d < 0))
    }

    /// The keys this range allows for queries in `[q0, q1]`, as a closed interval.
    fn over(&self, q0: i64, q1: i64) -> (i64, i64) {
        let lo = self
            .lows
            .iter()
            .map(|b| b.over(q0, q1).0)
            .max()
            .unwrap_or(i64::MIN);
        let hi = self
            .highs
            .iter()
            .map(|b| b.over(q0, q1).1)
            .min()
            .unwrap_or(i64::MAX);
        (lo, hi)
    }
}

/// A superset of the keys a mask can show to each query: a union of key ranges. An empty
/// union shows nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Support {
    pub ranges: Vec<KeyRange>,
}

/// Past this many ranges a support is widened to every key.
const MAX_RANGES: usize = 16;

impl Support {
    pub fn all() -> Support {
        Support {
            ranges: vec![KeyRange::all()],
        }
    }

    fn none() -> Support {
        Support { ranges: vec![] }
    }

    fn union(mut self, other: Support) -> Support {
        self.ranges.extend(other.ranges);
        if self.ranges.len() > MAX_RANGES {
            Support::all()
        } else {
            self
        }
    }

    fn intersect(self, other: Support) -> Support {
        let mut ranges = Vec::new();
        for a in &self.ranges {
            for b in &other.ranges {
                let mut r = a.clone();
                r.lows.extend(b.lows.iter().copied());
                r.highs.extend(b.highs.iter().copied());
                ranges.push(r);
            }
        }
        if ranges.len() > MAX_RANGES {
            Support::all()
        } else {
            Support { ranges }
        }
    }

    /// The support of a mask: what its comparisons of `q` and `k` allow. A table read at an
    /// index that depends on neither `q` nor `k` (per-head windows: `q - k < spans[h]`) is
    /// split into cases, one per distinct entry, and their supports joined. Ranges that hold
    /// no key (`k < 0`) or lie within another are dropped.
    pub fn of(mask: &Expr) -> Support {
        let mut cases = table_cases(mask);
        if cases.is_empty() {
            cases.push(mask.clone());
        }
        let mut joined = Support::none();
        for case in &cases {
            for range in support(case, false).ranges {
                if !range.is_empty() && !joined.ranges.iter().any(|r| r.covers(&range)) {
                    joined.ranges.retain(|r| !range.covers(r));
                    joined.ranges.push(range);
                }
            }
            if joined.ranges.len() > MAX_RANGES {
                return Support::all();
            }
        }
        joined
    }

    /// A human-readable description, such as `q - 31 <= k <= q`.
    pub fn describe(&self) -> String {
        if self.ranges.is_empty() {
            return "no key".into();
        }
        let parts: Vec<String> = self
            .ranges
            .iter()
            .map(|r| {
                let join = |bounds: &[Bound], f: &str| match bounds {
                    [] => None,
                    [one] => Some(one.describe()),
                    many => Some(format!(
                        "{f}({})",
                        many.iter()
                            .map(|b| b.describe())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                };
                match (join(&r.lows, "max"), join(&r.highs, "min")) {
                    (None, None) => "every k".to_string(),
                    (Some(lo), None) => format!("k >= {lo}"),
                    (None, Some(hi)) => format!("k <= {hi}"),
                    (Some(lo), Some(hi)) => format!("{lo} <= k <= {hi}"),
                }
            })
            .collect();
        parts.join(" or ")
    }
}

/// Past this many distinct entries a table is not split into cases.
const MAX_TABLE_CASES: usize = 16;

/// Past this many cases in all, tables are not split.
const MAX_CASES: usize = 64;

/// The mask once per combination of the entries of the tables it reads at indices free of
/// `q` and `k` (per-head windows): each case is the mask of some heads, and every head's mask
/// is one of them. Empty when the mask reads no such table or has too many cases.
fn table_cases(mask: &Expr) -> Vec<Expr> {
    let Some((read, entries)) = table_outside_positions(mask) else {
        return Vec::new();
    };
    let mut cases = Vec::new();
    for entry in entries {
        let case = mask.replace(&read, &entry).fold_constants();
        let split = table_cases(&case);
        if split.is_empty() {
            cases.push(case);
        } else {
            cases.extend(split);
        }
        if cases.len() > MAX_CASES {
            return Vec::new();
        }
    }
    cases
}

/// The first read of a table whose index depends on neither `q` nor `k` (nor on a side
/// input), and its distinct entries, when they are few.
fn table_outside_positions(mask: &Expr) -> Option<(Expr, Vec<Expr>)> {
    let mut found = None;
    mask.walk(&mut |e| {
        if found.is_none()
            && let Expr::Table { table, index } = e
            && index.vars().iter().all(|v| matches!(v, Var::H | Var::B))
        {
            let mut entries: Vec<Expr> = Vec::new();
            for entry in table.literals() {
                if !entries.contains(&entry) {
                    entries.push(entry);
                }
            }
            if entries.len() <= MAX_TABLE_CASES {
                found = Some((e.clone(), entries));
            }
        }
    });
    found
}

/// `c0 + cq * q + ck * k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Affine {
    c0: i64,
    cq: i64,
    ck: i64,
}

fn affine(expr: &Expr) -> Option<Affine> {
    let combine = |a: Affine, b: Affine, sign: i64| -> Option<Affine> {
        Some(Affine {
            c0: a.c0.checked_add(b.c0.checked_mul(sign)?)?,
            cq: a.cq.checked_add(b.cq.checked_mul(sign)?)?,
            ck: a.ck.checked_add(b.ck.checked_mul(sign)?)?,
        })
    };
    match expr {
        Expr::Int(v) => Some(Affine {
            c0: *v,
            cq: 0,
            ck: 0,
        }),
        Expr::Var(Var::Q) => Some(Affine {
            c0: 0,
            cq: 1,
            ck: 0,
        }),
        Expr::Var(Var::K) => Some(Affine {
            c0: 0,
            cq: 0,
            ck: 1,
        }),
        Expr::Unary(UnOp::Neg, e) => combine(
            Affine {
                c0: 0,
                cq: 0,
                ck: 0,
            },
            affine(e)?,
            -1,
        ),
        Expr::Binary(BinOp::Add, a, b) => combine(affine(a)?, affine(b)?, 1),
        Expr::Binary(BinOp::Sub, a, b) => combine(affine(a)?, affine(b)?, -1),
        Expr::Binary(BinOp::Mul, a, b) => {
            let (a, b) = (affine(a)?, affine(b)?);
            let (constant, other) = if a.cq == 0 && a.ck == 0 {
                (a.c0, b)
            } else if b.cq == 0 && b.ck == 0 {
                (b.c0, a)
            } else {
                return None;
            };
            Some(Affine {
                c0: other.c0.checked_mul(constant)?,
                cq: other.cq.checked_mul(constant)?,
                ck: other.ck.checked_mul(constant)?,
            })
        }
        _ => None,
    }
}

/// `var / c` for a positive constant `c`.
fn chunk_of(expr: &Expr) -> Option<(Var, i64)> {
    match expr {
        Expr::Binary(BinOp::Div, v, c) => match (&**v, &**c) {
            (Expr::Var(var @ (Var::Q | Var::K)), Expr::Int(c)) if *c > 0 => Some((*var, *c)),
            _ => None,
        },
        _ => None,
    }
}

fn negate(op: BinOp) -> BinOp {
    match op {
        BinOp::Lt => BinOp::Ge,
        BinOp::Le => BinOp::Gt,
        BinOp::Gt => BinOp::Le,
        BinOp::Ge => BinOp::Lt,
        BinOp::Eq => BinOp::Ne,
        BinOp::Ne => BinOp::Eq,
        other => other,
    }
}

/// The support of `expr` (of `!expr` when `negated`), in negation normal form.
fn support(expr: &Expr, negated: bool) -> Support {
    match expr {
        Expr::Bool(v) => {
            if *v != negated {
                Support::all()
            } else {
                Support::none()
            }
        }
        Expr::Unary(UnOp::Not, e) => support(e, !negated),
        Expr::Binary(op @ (BinOp::And | BinOp::Or), a, b) => {
            let (a, b) = (support(a, negated), support(b, negated));
            // De Morgan: under negation `&&` becomes `||` and the other way round.
            if (*op == BinOp::And) != negated {
                a.intersect(b)
            } else {
                a.union(b)
            }
        }
        Expr::Binary(op, a, b) if op.is_comparison() => {
            let op = if negated { negate(*op) } else { *op };
            // |x| < y is -y < x && x < y (and y > |x| the same).
            let (op, a, b) = match (&**a, &**b) {
                (_, Expr::Call(Func::Abs, _)) => (flip(op), b, a),
                _ => (op, a, b),
            };
            if let (Expr::Call(Func::Abs, args), BinOp::Lt | BinOp::Le) = (&**a, op)
                && let [x] = args.as_slice()
            {
                let below = Expr::binary(op, x.clone(), (**b).clone());
                let above = Expr::binary(
                    op,
                    Expr::Unary(UnOp::Neg, Box::new((**b).clone())),
                    x.clone(),
                );
                return support(&Expr::binary(BinOp::And, above, below), false);
            }
            comparison(op, a, b)
        }
        _ => Support::all(),
    }
}

fn comparison(op: BinOp, a: &Expr, b: &Expr) -> Support {
    // `q / c == k / c`: the chunk of q.
    if op == BinOp::Eq
        && let (Some((va, ca)), Some((vb, cb))) = (chunk_of(a), chunk_of(b))
        && ca == cb
        && va != vb
    {
        return Support {
            ranges: vec![KeyRange {
                lows: vec![Bound::Chunk { c: ca, end: false }],
                highs: vec![Bound::Chunk { c: ca, end: true }],
            }],
        };
    }
    let (Some(a), Some(b)) = (affine(a), affine(b)) else {
        return Support::all();
    };
    // a - b OP 0, i.e. ck * k + cq * q + c0 OP 0.
    let (Some(c0), Some(cq), Some(ck)) = (
        a.c0.checked_sub(b.c0),
        a.cq.checked_sub(b.cq),
        a.ck.checked_sub(b.ck),
    ) else {
        return Support::all();
    };
    // Solve for k when its coefficient is +-1: k OP' (s * cq) * q + s * c0 with s = -ck.
    let (op, a_q, d) = match ck {
        1 => (op, cq.checked_neg(), c0.checked_neg()),
        -1 => (flip(op), Some(cq), Some(c0)),
        _ => return Support::all(),
    };
    let (Some(a_q), Some(d)) = (a_q, d) else {
        return Support::all();
    };
    let bound = |delta: i64| d.checked_add(delta).map(|d| Bound::Linear { a: a_q, d });
    let range = match op {
        BinOp::Lt => bound(-1).map(|b| KeyRange {
            lows: vec![],
            highs: vec![b],
        }),
        BinOp::Le => bound(0).map(|b| KeyRange {
            lows: vec![],
            highs: vec![b],
        }),
        BinOp::Gt => bound(1).map(|b| KeyRange {
            lows: vec![b],
            highs: vec![],
        }),
        BinOp::Ge => bound(0).map(|b| KeyRange {
            lows: vec![b],
            highs: vec![],
        }),
        BinOp::Eq => bound(0).map(|b| KeyRange {
            lows: vec![b],
            highs: vec![b],
        }),
        _ => None,
    };
    match range {
        Some(r) => Support { ranges: vec![r] },
        None => Support::all(),
    }
}

/// `x OP y` as `y OP' x`.
fn flip(op: BinOp) -> BinOp {
    match op {
        BinOp::Lt => BinOp::Gt,
        BinOp::Le => BinOp::Ge,
        BinOp::Gt => BinOp::Lt,
        BinOp::Ge => BinOp::Le,
        other => other,
    }
}

/// The tiles one query tile visits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Row {
    /// `(key tile, kind)`, in increasing key-tile order.
    pub tiles: Vec<(u32, TileKind)>,
}

/// The tile schedule of one attention at one sequence length (and, for masks over side
/// inputs, one batch row).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub block_q: usize,
    pub block_k: usize,
    pub seq_len: usize,
    pub rows: Vec<Row>,
}

impl Schedule {
    pub fn count(&self, kind: TileKind) -> usize {
        self.rows
            .iter()
            .map(|r| r.tiles.iter().filter(|t| t.1 == kind).count())
            .sum()
    }

    pub fn visited(&self) -> usize {
        self.rows.iter().map(|r| r.tiles.len()).sum()
    }

    pub fn total_tiles(&self) -> usize {
        self.seq_len.div_ceil(self.block_q) * self.seq_len.div_ceil(self.block_k)
    }
}

/// The side-input values of one batch row, for masks that read them.
pub struct SideValues<'a> {
    pub names: &'a [String],
    /// One slice of `seq_len` values per name.
    pub values: Vec<&'a [i64]>,
}

impl SideValues<'_> {
    fn tile_range(&self, index: usize, lo: usize, hi: usize) -> (i64, i64) {
        let values = &self.values[index][lo..=hi];
        (
            values.iter().copied().min().unwrap_or(0),
            values.iter().copied().max().unwrap_or(0),
        )
    }
}

/// What a schedule is built for.
pub struct ScheduleInput<'a> {
    pub mask: &'a Expr,
    pub support: &'a Support,
    pub heads: usize,
    pub block_q: usize,
    pub block_k: usize,
    pub seq_len: usize,
    /// The side inputs of one batch row; `None` for masks that read none (or to schedule
    /// for any values, with every side input unknown).
    pub sides: Option<&'a SideValues<'a>>,
    /// The batch row the side values belong to (what `b` is).
    pub batch_row: usize,
    /// Evaluate partial tiles element by element, making the schedule exact.
    pub refine: bool,
}

/// Builds the schedule: candidate key tiles from the support, classified by value ranges,
/// optionally refined element by element.
pub fn build(input: &ScheduleInput) -> Schedule {
    let mut budget = REFINE_BUDGET;
    build_within(input, &mut budget)
}

/// [`build`], refining partial tiles only while `budget` mask evaluations are left.
fn build_within(input: &ScheduleInput, budget: &mut usize) -> Schedule {
    let (bq, bk, t) = (input.block_q.max(1), input.block_k.max(1), input.seq_len);
    let cases = table_cases(input.mask);
    let heads = if input.mask.depends_on_head() {
        input.heads.max(1)
    } else {
        1
    };
    let n_k = t.div_ceil(bk);
    let mut rows = Vec::with_capacity(t.div_ceil(bq));
    let mut side_ranges: Vec<SideRange> = Vec::new();
    for qt in 0..t.div_ceil(bq) {
        let (q0, q1) = (qt * bq, ((qt + 1) * bq).min(t) - 1);
        let mut candidates: Vec<usize> = Vec::new();
        for r in &input.support.ranges {
            let (lo, hi) = r.over(q0 as i64, q1 as i64);
            let (lo, hi) = (lo.max(0), hi.min(t as i64 - 1));
            if lo > hi {
                continue;
            }
            candidates.extend(lo as usize / bk..=hi as usize / bk);
        }
        candidates.sort_unstable();
        candidates.dedup();
        let mut row = Row::default();
        for kt in candidates.into_iter().filter(|&kt| kt < n_k) {
            let (k0, k1) = (kt * bk, ((kt + 1) * bk).min(t) - 1);
            if let Some(sides) = input.sides {
                side_ranges.clear();
                for (i, name) in sides.names.iter().enumerate() {
                    side_ranges.push(SideRange {
                        name: name.clone(),
                        over_q: sides.tile_range(i, q0, q1),
                        over_k: sides.tile_range(i, k0, k1),
                    });
                }
            }
            let env = TileEnv {
                q: (q0 as i64, q1 as i64),
                k: (k0 as i64, k1 as i64),
                heads: input.heads as i64,
                batch: i64::MAX,
                sides: &side_ranges,
            };
            let r = range(input.mask, &env);
            let cost = (q1 - q0 + 1) * (k1 - k0 + 1) * heads;
            let kind = if r.never() {
                continue;
            } else if r.always() {
                TileKind::Full
            } else if let Some(kind) = by_cases(&cases, &env) {
                match kind {
                    Some(kind) => kind,
                    None => continue,
                }
            } else if input.refine && cost <= *budget {
                *budget -= cost;
                match refine(input, heads, (q0, q1), (k0, k1)) {
                    Some(kind) => kind,
                    None => continue,
                }
            } else {
                TileKind::Partial
            };
            row.tiles.push((kt as u32, kind));
        }
        rows.push(row);
    }
    Schedule {
        block_q: bq,
        block_k: bk,
        seq_len: t,
        rows,
    }
}

/// Whether an attention has a tile schedule per head: its mask reads `h` (per-head windows,
/// a table of spans by head) and it has several heads (up to [`MAX_HEAD_SCHEDULES`]). Then
/// each head visits only the tiles its own mask shows, not the union over heads; heads whose
/// masks agree share a schedule.
pub fn per_head(mask: &Expr, heads: usize) -> bool {
    (2..=MAX_HEAD_SCHEDULES).contains(&heads) && mask.depends_on_head()
}

/// Past this many heads, a mask that reads `h` gets one schedule for every head (the union
/// of theirs), so that building schedules stays cheap whatever the head count.
const MAX_HEAD_SCHEDULES: usize = 256;

/// The mask of head `h`: `h` replaced by its value and constants folded, so that tables read
/// by head become that head's entries.
pub fn head_mask(mask: &Expr, h: usize) -> Expr {
    short_circuit(
        &mask
            .replace(&Expr::Var(Var::H), &Expr::Int(h as i64))
            .fold_constants(),
    )
}

/// `true || x` is `true`, `true && x` is `x` (and so on): what a head's constant choice
/// leaves of a mask, so that the head's schedule sees only the keys it can show.
fn short_circuit(e: &Expr) -> Expr {
    match e {
        Expr::Binary(op @ (BinOp::And | BinOp::Or), l, r) => {
            let (l, r) = (short_circuit(l), short_circuit(r));
            let absorbing = *op == BinOp::Or;
            match (&l, &r) {
                (Expr::Bool(v), _) | (_, Expr::Bool(v)) if *v == absorbing => Expr::Bool(*v),
                (Expr::Bool(_), other) | (other, Expr::Bool(_)) => other.clone(),
                _ => Expr::binary(*op, l, r),
            }
        }
        Expr::Unary(UnOp::Not, inner) => match short_circuit(inner) {
            Expr::Bool(v) => Expr::Bool(!v),
            other => Expr::Unary(UnOp::Not, Box::new(other)),
        },
        other => other.clone(),
    }
}

/// The schedules of an attention's heads: head `h` visits `schedules[of_head[h]]`. Without a
/// schedule per head ([`per_head`]), `of_head` is `[0]` and the one schedule serves every head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadSchedules {
    pub of_head: Vec<usize>,
    pub schedules: Vec<Schedule>,
}

impl HeadSchedules {
    /// The schedule of head `h` (the shared one when there is one for all).
    pub fn of(&self, h: usize) -> &Schedule {
        &self.schedules[self.of_head[h.min(self.of_head.len() - 1)]]
    }

    /// Tiles visited, summed over every head (counting a shared schedule once per head).
    pub fn visited_by_heads(&self, heads: usize) -> usize {
        (0..heads).map(|h| self.of(h).visited()).sum()
    }
}

/// Builds the schedule of every head ([`HeadSchedules`]): for a mask that reads `h`, one per
/// distinct [`head_mask`], each from that mask's own support; else the one [`build`] gives.
pub fn build_heads(input: &ScheduleInput) -> HeadSchedules {
    if !per_head(input.mask, input.heads) {
        return HeadSchedules {
            of_head: vec![0],
            schedules: vec![build(input)],
        };
    }
    let mut of_head = vec![0; input.heads];
    let mut schedules = Vec::new();
    // The heads share one refinement budget, so that many heads cost no more than one.
    let mut budget = REFINE_BUDGET;
    for (mask, heads) in head_masks(input.mask, input.heads) {
        for h in heads {
            of_head[h] = schedules.len();
        }
        let support = Support::of(&mask);
        let input = ScheduleInput {
            mask: &mask,
            support: &support,
            ..*input
        };
        schedules.push(build_within(&input, &mut budget));
    }
    HeadSchedules { of_head, schedules }
}

/// The distinct [`head_mask`]s of `heads` heads, each with the heads that have it, in order
/// of their first head.
pub fn head_masks(mask: &Expr, heads: usize) -> Vec<(Expr, Vec<usize>)> {
    let mut kinds: Vec<(Expr, Vec<usize>)> = Vec::new();
    for h in 0..heads {
        let m = head_mask(mask, h);
        match kinds.iter_mut().find(|(k, _)| *k == m) {
            Some((_, of)) => of.push(h),
            None => kinds.push((m, vec![h])),
        }
    }
    kinds
}

/// How many mask evaluations refining one schedule may take (about 30 ms on this
/// repository's 2-core machine); past them, tiles the value ranges leave undecided stay
/// partial, which is always correct.
const REFINE_BUDGET: usize = 1 << 20;

/// A tile classified case by case ([`table_cases`]), when every case is decided over it:
/// `Some(None)` if no case shows a key, `Some(Some(kind))` otherwise (full when every case
/// shows every key). `None` when some case is undecided, or there are no cases.
fn by_cases(cases: &[Expr], env: &TileEnv) -> Option<Option<TileKind>> {
    let (mut always, mut never) = (false, false);
    for case in cases {
        let r = range(case, env);
        if r.always() {
            always = true;
        } else if r.never() {
            never = true;
        } else {
            return None;
        }
    }
    match (always, never) {
        (false, false) => None,
        (false, true) => Some(None),
        (true, false) => Some(Some(TileKind::Full)),
        (true, true) => Some(Some(TileKind::Partial)),
    }
}

/// Evaluates a tile element by element: `None` if nothing is visible.
/// `heads`: how many heads to evaluate (1 when the mask does not read `h`).
fn refine(
    input: &ScheduleInput,
    heads: usize,
    (q0, q1): (usize, usize),
    (k0, k1): (usize, usize),
) -> Option<TileKind> {
    let (mut any, mut all) = (false, true);
    for h in 0..heads {
        for q in q0..=q1 {
            for k in k0..=k1 {
                let env = PointEnv {
                    q,
                    k,
                    h,
                    b: input.batch_row,
                    sides: input.sides,
                };
                if input.mask.eval(&env).as_bool() {
                    any = true;
                } else {
                    all = false;
                }
            }
        }
    }
    match (any, all) {
        (false, _) => None,
        (true, true) => Some(TileKind::Full),
        (true, false) => Some(TileKind::Partial),
    }
}

struct PointEnv<'a> {
    q: usize,
    k: usize,
    h: usize,
    b: usize,
    sides: Option<&'a SideValues<'a>>,
}

impl Env for PointEnv<'_> {
    fn var(&self, var: Var) -> Scalar {
        Scalar::Int(match var {
            Var::Q => self.q as i64,
            Var::K => self.k as i64,
            Var::H => self.h as i64,
            Var::B => self.b as i64,
            Var::Score => 0,
        })
    }

    fn side(&self, name: &str, index: Var) -> i64 {
        let position = if index == Var::Q { self.q } else { self.k };
        self.sides
            .and_then(|s| {
                let i = s.names.iter().position(|n| n == name)?;
                s.values[i].get(position).copied()
            })
            .unwrap_or(0)
    }
}

/// The most key tiles one query tile can visit under a key range, when that number does not
/// grow with the sequence length.
fn tiles_per_query_tile(range: &KeyRange, block_q: i64, block_k: i64) -> Option<i64> {
    // The most key tiles over 64 consecutive query tiles, far from the start (where offsets
    // are in effect) and twice as far: equal counts mean the count does not grow with T.
    let most = |base: i64| -> Option<i64> {
        (0..64)
            .map(|i| {
                let q0 = (base + i) * block_q;
                let (lo, hi) = range.over(q0, q0 + block_q - 1);
                // Keys are never negative.
                let lo = lo.max(0);
                if hi == i64::MAX {
                    None
                } else if hi < lo {
                    Some(0)
                } else {
                    Some(hi.div_euclid(block_k) - lo.div_euclid(block_k) + 1)
                }
            })
            .try_fold(0, |m, w| w.map(|w| m.max(w)))
    };
    let (near, far) = (most((1 << 30) / block_q)?, most((1 << 31) / block_q)?);
    (near == far).then_some(near)
}

/// The keys one query visits on average far from the sequence's start, with tiles of
/// `block_q` queries by `block_k` keys (every key of each key tile visited), over 2^16
/// queries and, for a mask with a schedule per head ([`per_head`]), over the `heads`;
/// `None` when the key tiles a query tile visits grow with the sequence length.
pub fn keys_per_query(mask: &Expr, heads: usize, block_q: usize, block_k: usize) -> Option<f64> {
    if per_head(mask, heads) {
        let mut sum = 0.0;
        for (mask, of) in head_masks(mask, heads) {
            sum += keys_per_query(&mask, 1, block_q, block_k)? * of.len() as f64;
        }
        return Some(sum / heads as f64);
    }
    let (bq, bk) = (block_q.max(1) as i64, block_k.max(1) as i64);
    let support = Support::of(mask);
    for range in &support.ranges {
        tiles_per_query_tile(range, bq, bk)?;
    }
    const SPAN: i64 = 1 << 16;
    let base = (1i64 << 30) / bq * bq;
    let mut visited = 0i64;
    for q0 in (base..base + SPAN).step_by(bq as usize) {
        for range in &support.ranges {
            let (lo, hi) = range.over(q0, q0 + bq - 1);
            let lo = lo.max(0);
            if hi >= lo {
                visited += (hi.div_euclid(bk) - lo.div_euclid(bk) + 1) * bk * bq;
            }
        }
    }
    Some(visited as f64 / SPAN as f64)
}

/// Describes a mask's schedule symbolically and at two sequence lengths, for the text form.
/// A mask that reads `h` ([`per_head`]) is described head by head (heads with the same mask
/// together), and its tile counts are summed over the heads.
pub fn describe(mask: &Expr, heads: usize, block_q: usize, block_k: usize) -> String {
    let mut text = String::new();
    if per_head(mask, heads) {
        let _ = write!(text, "per head: ");
        let kinds = head_masks(mask, heads);
        if kinds.len() > DESCRIBED_HEAD_MASKS {
            let _ = write!(text, "{} distinct masks, the first: ", kinds.len());
        }
        for (i, (m, of)) in kinds.iter().take(DESCRIBED_HEAD_MASKS).enumerate() {
            let names: Vec<String> = of.iter().map(usize::to_string).collect();
            let noun = if of.len() == 1 { "head" } else { "heads" };
            let sep = if i == 0 { "" } else { "; " };
            let _ = write!(text, "{sep}{noun} {}: ", names.join(", "));
            describe_keys(&mut text, m, block_q, block_k);
        }
    } else {
        describe_keys(&mut text, mask, block_q, block_k);
    }
    if !mask.sides().is_empty() {
        return text;
    }
    let support = Support::of(mask);
    for t in [1024usize, 8192] {
        let schedules = build_heads(&ScheduleInput {
            mask,
            support: &support,
            heads,
            block_q,
            block_k,
            seq_len: t,
            sides: None,
            batch_row: 0,
            refine: true,
        });
        let (mut full, mut partial) = (0, 0);
        // Each head's own tiles, or the one schedule's once.
        let counted = schedules.of_head.len();
        for h in 0..counted {
            full += schedules.of(h).count(TileKind::Full);
            partial += schedules.of(h).count(TileKind::Partial);
        }
        let total = schedules.of(0).total_tiles() * counted;
        let _ = write!(text, "; T={t}: {full} full + {partial} partial of {total}");
    }
    if per_head(mask, heads) {
        let _ = write!(text, " (over {heads} heads)");
    }
    text
}

/// How many distinct head masks the text form describes.
const DESCRIBED_HEAD_MASKS: usize = 8;

/// The keys a mask shows and how many key tiles a query tile visits.
fn describe_keys(text: &mut String, mask: &Expr, block_q: usize, block_k: usize) {
    let support = Support::of(mask);
    let _ = write!(text, "keys: {}; ", support.describe());
    if !mask.sides().is_empty() {
        text.push_str("side inputs: key tiles classified at run time from per-tile ranges");
        return;
    }
    let per_tile: Option<i64> = support
        .ranges
        .iter()
        .map(|r| tiles_per_query_tile(r, block_q as i64, block_k as i64))
        .sum();
    match per_tile {
        Some(n) => {
            let tiles = if n == 1 { "tile" } else { "tiles" };
            let _ = write!(text, "at most {n} key {tiles} per query tile, O(T)");
        }
        None => text.push_str("key tiles per query tile grow with T, O(T^2)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::parse_expr;

    fn schedule(mask: &str, t: usize, block: usize, refine: bool) -> Schedule {
        let mask = parse_expr(mask).unwrap();
        let support = Support::of(&mask);
        build(&ScheduleInput {
            mask: &mask,
            support: &support,
            heads: 4,
            block_q: block,
            block_k: block,
            seq_len: t,
            sides: None,
            batch_row: 0,
            refine,
        })
    }

    #[test]
    fn supports_of_common_masks() {
        let s = |m: &str| Support::of(&parse_expr(m).unwrap()).describe();
        assert_eq!(s("k <= q"), "k <= q");
        assert_eq!(s("k <= q && q - k < 32"), "q - 31 <= k <= q");
        assert_eq!(s("!(k > q) && !(q - k >= 32)"), "q - 31 <= k <= q");
        assert_eq!(
            s("k <= q && (q - k < 16 || k < 4)"),
            "q - 15 <= k <= q or k <= min(q, 3)"
        );
        assert_eq!(
            s("k <= q && q / 64 == k / 64"),
            "q / 64 * 64 <= k <= min(q, q / 64 * 64 + 63)"
        );
        assert_eq!(s("abs(q - k) <= 8"), "q - 8 <= k <= q + 8");
        assert_eq!(s("8 > abs(k - q)"), "q - 7 <= k <= q + 7");
        assert_eq!(s("abs(q - k) > 8"), "every k");
        assert_eq!(s("false"), "no key");
        // Tables read per head: one case per entry, the widest kept.
        assert_eq!(s("k <= q && q - k < [8, 32, 16][h]"), "q - 31 <= k <= q");
        assert_eq!(
            s("k <= q && (q - k < [4, 12][h % 2] || k < [0, 3, 1][h])"),
            "k <= min(q, 2) or q - 11 <= k <= q"
        );
        assert_eq!(s("k <= q && ([0, 1][h] == 1 || q - k < 8)"), "k <= q");
        assert_eq!(s("k <= q && q - k < [8, 32][q % 2]"), "k <= q");
    }

    #[test]
    fn a_heads_mask_keeps_only_what_its_entries_leave() {
        let mask =
            parse_expr("k <= q && ([0, 1][h] == 1 || q - k < [3, 7][h] || k < [2, 0][h])").unwrap();
        let of = |h| head_mask(&mask, h).to_string();
        assert_eq!(of(0), "k <= q && (q - k < 3 || k < 2)");
        assert_eq!(of(1), "k <= q");
        assert!(per_head(&mask, 2));
        assert!(!per_head(&mask, 1));
        assert!(!per_head(&parse_expr("k <= q").unwrap(), 8));
        // Heads 2 and 3 clamp to head 1's entries: three heads share one schedule.
        let support = Support::of(&mask);
        let built = build_heads(&ScheduleInput {
            mask: &mask,
            support: &support,
            heads: 4,
            block_q: 16,
            block_k: 16,
            seq_len: 256,
            sides: None,
            batch_row: 0,
            refine: false,
        });
        assert_eq!(built.of_head, vec![0, 1, 1, 1]);
        // Head 0: the sinks' tile, the previous tile (the window reaches 2 keys back) and
        // its own.
        assert_eq!(built.of(0).visited(), 1 + 2 + 14 * 3);
        assert_eq!(built.of(3).visited(), 16 * 17 / 2);
    }

    #[test]
    fn causal_visits_about_half() {
        let s = schedule("k <= q", 256, 32, false);
        assert_eq!(s.count(TileKind::Partial), 8);
        assert_eq!(s.count(TileKind::Full), 28);
    }

    #[test]
    fn window_visits_a_band() {
        let s = schedule("k <= q && q - k < 32", 1024, 64, false);
        assert!(s.rows.iter().all(|r| r.tiles.len() <= 2));
        assert_eq!(s.visited(), 16 + 15);
    }
}
