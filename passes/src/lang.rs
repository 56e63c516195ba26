//! The e-graph language of the optimizer and its analysis.
//!
//! Every IR operation is an e-node whose first children are *attribute leaves* (a
//! permutation, a shape, an axis, an epsilon, an index expression, ...) followed by its
//! operands, so that rewrite patterns can bind attributes like operands:
//! `(transpose ?p (transpose ?q ?x))`. A few *recognized forms* (`softmax`, `qk`, `scores`,
//! `repeat_kv`) exist only inside the e-graph: they name what a subgraph computes, so that
//! later rules can match it in one step, and extraction never picks them.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use egg::{Analysis, DidMerge, EGraph, Id, Language};
use zebra_ir::Loc;
use zebra_ir::expr::{Expr, fmt_float};
use zebra_ir::op::{AttentionKernel, BinaryOp, CmpOp, Op, ReduceOp, UnaryOp};
use zebra_ir::rope::{Rope, RopeScaling};
use zebra_ir::types::{DType, Dim, Shape, TensorType};

/// An f64 with total order and hashing by bits, for e-node identity.
#[derive(Clone, Copy, Debug)]
pub struct F64(pub f64);

impl PartialEq for F64 {
    fn eq(&self, other: &F64) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}
impl Eq for F64 {}
impl Hash for F64 {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}
impl PartialOrd for F64 {
    fn partial_cmp(&self, other: &F64) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for F64 {
    fn cmp(&self, other: &F64) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// An index expression with where it was written; compared by its text and position.
#[derive(Clone, Debug)]
pub struct ExprAttr {
    pub expr: Expr,
    pub text: Arc<str>,
    pub loc: Option<Loc>,
}

impl ExprAttr {
    pub fn new(expr: Expr, loc: Option<Loc>) -> ExprAttr {
        ExprAttr {
            text: expr.to_string().into(),
            expr,
            loc,
        }
    }

    fn key(&self) -> (&str, Option<(u32, u32)>) {
        (&self.text, self.loc.map(|l| (l.line, l.col)))
    }
}

impl PartialEq for ExprAttr {
    fn eq(&self, other: &ExprAttr) -> bool {
        self.key() == other.key()
    }
}
impl Eq for ExprAttr {}
impl Hash for ExprAttr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}
impl PartialOrd for ExprAttr {
    fn partial_cmp(&self, other: &ExprAttr) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ExprAttr {
    fn cmp(&self, other: &ExprAttr) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// An attention kernel as an attribute, compared by its text form without its name: the
/// name is the layer kind's, given when the optimized graph is assembled.
#[derive(Clone, Debug)]
pub struct KernelAttr {
    pub kernel: Box<AttentionKernel>,
    text: Arc<str>,
}

impl KernelAttr {
    pub fn new(kernel: AttentionKernel) -> KernelAttr {
        let attrs: Vec<String> = zebra_ir::print::kernel_attributes(&kernel)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let loc = kernel
            .loc
            .map_or(String::new(), |l| format!("@{}:{}", l.line, l.col));
        KernelAttr {
            text: format!("{{{}}}{loc}", attrs.join(",")).into(),
            kernel: Box::new(kernel),
        }
    }
}

impl PartialEq for KernelAttr {
    fn eq(&self, other: &KernelAttr) -> bool {
        self.text == other.text
    }
}
impl Eq for KernelAttr {}
impl Hash for KernelAttr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}
impl PartialOrd for KernelAttr {
    fn partial_cmp(&self, other: &KernelAttr) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for KernelAttr {
    fn cmp(&self, other: &KernelAttr) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

/// An operation the rules never look inside (the training ops autodiff adds): kept whole, and
/// compared by its name and attributes.
#[derive(Clone, Debug)]
pub struct OpaqueOp {
    pub op: Box<Op>,
    text: Arc<str>,
}

impl OpaqueOp {
    pub fn new(op: Op) -> OpaqueOp {
        let mut attrs: Vec<String> = zebra_ir::print::attributes(&op)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if let Some(kernel) = op.attention_kernel() {
            attrs.push(KernelAttr::new(kernel.clone()).text.to_string());
        }
        OpaqueOp {
            text: format!("{}{{{}}}", op.name(), attrs.join(",")).into(),
            op: Box::new(op),
        }
    }
}

impl PartialEq for OpaqueOp {
    fn eq(&self, other: &OpaqueOp) -> bool {
        self.text == other.text
    }
}
impl Eq for OpaqueOp {}
impl Hash for OpaqueOp {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}
impl PartialOrd for OpaqueOp {
    fn partial_cmp(&self, other: &OpaqueOp) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OpaqueOp {
    fn cmp(&self, other: &OpaqueOp) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

/// The value of an attribute leaf.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attr {
    None,
    Bool(bool),
    Int(i64),
    Float(F64),
    Perm(Vec<u8>),
    Shape(Shape),
    Expr(ExprAttr),
    Names(Vec<Arc<str>>),
    Kernel(KernelAttr),
    /// A scaled RoPE (an unscaled one is its base, a `Float`).
    Rope(RopeAttr),
}

/// A RoPE with identity, hashing and order by its parameters' bits.
#[derive(Clone, Copy, Debug)]
pub struct RopeAttr(pub Rope);

impl PartialEq for RopeAttr {
    fn eq(&self, other: &RopeAttr) -> bool {
        self.0.key() == other.0.key()
    }
}
impl Eq for RopeAttr {}
impl Hash for RopeAttr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.key().hash(state);
    }
}
impl PartialOrd for RopeAttr {
    fn partial_cmp(&self, other: &RopeAttr) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for RopeAttr {
    fn cmp(&self, other: &RopeAttr) -> std::cmp::Ordering {
        self.0.key().cmp(&other.0.key())
    }
}

/// The attribute of a RoPE: its base alone when it is unscaled.
fn rope_attr(rope: &Rope) -> Attr {
    match rope.scaling {
        RopeScaling::None => Attr::Float(F64(rope.base)),
        _ => Attr::Rope(RopeAttr(*rope)),
    }
}

/// The RoPE of an attribute that [`rope_attr`] made.
fn as_rope(attr: &Attr) -> Option<Rope> {
    match attr {
        Attr::Float(base) => Some(Rope::new(base.0)),
        Attr::Rope(rope) => Some(rope.0),
        _ => None,
    }
}

/// The operator of an e-node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ZOp {
    // Leaves.
    Attr(Attr),
    Input(Arc<str>),
    Weight(Arc<str>),
    Constant(F64),
    Positions,
    // Primitive operations: `[attributes..., operands...]`.
    Embedding,
    MatMul,
    Unary(UnaryOp),
    Binary(BinaryOp),
    Compare(CmpOp),
    Reduce(ReduceOp),
    Reshape,
    Transpose,
    Expand,
    Rope,
    Mask,
    ScoreMod,
    Select,
    // Fused operations.
    RmsNorm,
    Linear,
    SwiGlu,
    HeadsProj,
    Attention,
    TileRanges,
    /// Training operations, opaque to the rules.
    Opaque(OpaqueOp),
    // Recognized forms, never extracted.
    /// `(softmax s)`: softmax along the last axis, zeros where every element is -inf.
    Softmax,
    /// `(qk q k)`: `q @ k^T` over the last two axes.
    Qk,
    /// `(scores scale q k)`: `scale * q @ k^T`.
    Scores,
    /// `(repeat_kv group k)`: each KV head repeated `group` times along axis 1.
    RepeatKv,
}

impl ZOp {
    /// Whether extraction may pick this operator.
    pub fn is_recognized_form(&self) -> bool {
        matches!(self, ZOp::Softmax | ZOp::Qk | ZOp::Scores | ZOp::RepeatKv)
    }

    fn name(&self) -> String {
        match self {
            ZOp::Attr(a) => attr_text(a),
            ZOp::Input(n) => format!("in:{n}"),
            ZOp::Weight(n) => format!("w:{n}"),
            ZOp::Constant(v) => format!("c:{}", fmt_float(v.0)),
            ZOp::Positions => "positions".into(),
            ZOp::Embedding => "embedding".into(),
            ZOp::MatMul => "matmul".into(),
            ZOp::Unary(u) => u.name().into(),
            ZOp::Binary(b) => b.name().into(),
            ZOp::Compare(c) => c.name().into(),
            ZOp::Reduce(r) => r.name().into(),
            ZOp::Reshape => "reshape".into(),
            ZOp::Transpose => "transpose".into(),
            ZOp::Expand => "expand".into(),
            ZOp::Rope => "rope".into(),
            ZOp::Mask => "mask".into(),
            ZOp::ScoreMod => "score_mod".into(),
            ZOp::Select => "select".into(),
            ZOp::RmsNorm => "rmsnorm".into(),
            ZOp::Linear => "linear".into(),
            ZOp::SwiGlu => "swiglu".into(),
            ZOp::HeadsProj => "heads_proj".into(),
            ZOp::Attention => "attention".into(),
            ZOp::TileRanges => "tile_ranges".into(),
            ZOp::Opaque(o) => o.text.to_string(),
            ZOp::Softmax => "softmax".into(),
            ZOp::Qk => "qk".into(),
            ZOp::Scores => "scores".into(),
            ZOp::RepeatKv => "repeat_kv".into(),
        }
    }
}

fn attr_text(attr: &Attr) -> String {
    let list = |items: Vec<String>| items.join(",");
    match attr {
        Attr::None => "none".into(),
        Attr::Bool(b) => b.to_string(),
        Attr::Int(i) => format!("i:{i}"),
        Attr::Float(f) => format!("f:{}", fmt_float(f.0)),
        Attr::Perm(p) => format!("perm:{}", list(p.iter().map(|x| x.to_string()).collect())),
        Attr::Shape(s) => format!("shape:{}", list(s.iter().map(|d| d.to_string()).collect())),
        Attr::Expr(e) => format!("expr:{:?}", &*e.text),
        Attr::Names(n) => format!("names:{}", list(n.iter().map(|x| x.to_string()).collect())),
        Attr::Kernel(k) => format!("kernel:{}", k.text),
        Attr::Rope(r) => format!("rope:{},{}", fmt_float(r.0.base), r.0.scaling),
    }
}

/// One e-node: an operator and its children.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ZNode {
    pub op: ZOp,
    pub children: Vec<Id>,
}

impl ZNode {
    pub fn leaf(op: ZOp) -> ZNode {
        ZNode {
            op,
            children: vec![],
        }
    }

    pub fn new(op: ZOp, children: Vec<Id>) -> ZNode {
        ZNode { op, children }
    }
}

impl Language for ZNode {
    type Discriminant = ZOp;

    fn discriminant(&self) -> ZOp {
        self.op.clone()
    }

    fn matches(&self, other: &ZNode) -> bool {
        self.op == other.op && self.children.len() == other.children.len()
    }

    fn children(&self) -> &[Id] {
        &self.children
    }

    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

impl fmt::Display for ZNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.op.name())
    }
}

/// Why an operator text in a rule pattern could not be read.
#[derive(Debug, thiserror::Error)]
#[error("unknown operator `{0}` in a pattern")]
pub struct UnknownOp(String);

impl egg::FromOp for ZNode {
    type Error = UnknownOp;

    /// Reads the operator names of rule patterns: op names, `c:<float>`, `perm:0,2,1,3`,
    /// `axis` values as `i:<int>`, `none`, `true`, `false`.
    fn from_op(op: &str, children: Vec<Id>) -> Result<ZNode, UnknownOp> {
        let unknown = || UnknownOp(op.to_string());
        let parse_f = |t: &str| -> Result<f64, UnknownOp> {
            match t {
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                _ => t.parse().map_err(|_| unknown()),
            }
        };
        let zop = if let Some(v) = op.strip_prefix("c:") {
            ZOp::Constant(F64(parse_f(v)?))
        } else if let Some(v) = op.strip_prefix("f:") {
            ZOp::Attr(Attr::Float(F64(parse_f(v)?)))
        } else if let Some(v) = op.strip_prefix("i:") {
            ZOp::Attr(Attr::Int(v.parse().map_err(|_| unknown())?))
        } else if let Some(v) = op.strip_prefix("perm:") {
            let perm: Result<Vec<u8>, _> = v.split(',').map(str::parse).collect();
            ZOp::Attr(Attr::Perm(perm.map_err(|_| unknown())?))
        } else {
            match op {
                "none" => ZOp::Attr(Attr::None),
                "true" => ZOp::Attr(Attr::Bool(true)),
                "false" => ZOp::Attr(Attr::Bool(false)),
                "positions" => ZOp::Positions,
                "embedding" => ZOp::Embedding,
                "matmul" => ZOp::MatMul,
                "reshape" => ZOp::Reshape,
                "transpose" => ZOp::Transpose,
                "expand" => ZOp::Expand,
                "rope" => ZOp::Rope,
                "mask" => ZOp::Mask,
                "score_mod" => ZOp::ScoreMod,
                "select" => ZOp::Select,
                "rmsnorm" => ZOp::RmsNorm,
                "linear" => ZOp::Linear,
                "swiglu" => ZOp::SwiGlu,
                "heads_proj" => ZOp::HeadsProj,
                "attention" => ZOp::Attention,
                "tile_ranges" => ZOp::TileRanges,
                "softmax" => ZOp::Softmax,
                "qk" => ZOp::Qk,
                "scores" => ZOp::Scores,
                "repeat_kv" => ZOp::RepeatKv,
                other => {
                    if let Some(u) = UnaryOp::ALL.into_iter().find(|u| u.name() == other) {
                        ZOp::Unary(u)
                    } else if let Some(b) = BinaryOp::ALL.into_iter().find(|b| b.name() == other) {
                        ZOp::Binary(b)
                    } else if let Some(c) = CmpOp::ALL.into_iter().find(|c| c.name() == other) {
                        ZOp::Compare(c)
                    } else if let Some(r) = ReduceOp::ALL.into_iter().find(|r| r.name() == other) {
                        ZOp::Reduce(r)
                    } else {
                        return Err(unknown());
                    }
                }
            }
        };
        Ok(ZNode { op: zop, children })
    }
}

/// The operator and attribute leaves of an IR node, in the e-graph's child order. Masks and
/// score modifiers keep their source position in the expression attribute (so that fused
/// kernels and warnings can point at it); masks keep their declared shape.
pub fn split_node(op: &Op, loc: Option<Loc>, ty: &TensorType) -> (ZOp, Vec<Attr>) {
    let float = |v: f64| Attr::Float(F64(v));
    let optional = |v: Option<f64>| v.map_or(Attr::None, float);
    let names =
        |sides: &[String]| Attr::Names(sides.iter().map(|s| Arc::from(s.as_str())).collect());
    match op {
        Op::Input { name } => (ZOp::Input(name.as_str().into()), vec![]),
        Op::Weight { name } => (ZOp::Weight(name.as_str().into()), vec![]),
        Op::Constant { value } => (ZOp::Constant(F64(*value)), vec![]),
        Op::Positions => (ZOp::Positions, vec![]),
        Op::Embedding => (ZOp::Embedding, vec![]),
        Op::MatMul => (ZOp::MatMul, vec![]),
        Op::Unary(u) => (ZOp::Unary(*u), vec![]),
        Op::Binary(b) => (ZOp::Binary(*b), vec![]),
        Op::Compare(c) => (ZOp::Compare(*c), vec![]),
        Op::Reduce { op, axis } => (ZOp::Reduce(*op), vec![Attr::Int(*axis as i64)]),
        Op::Reshape { shape } => (ZOp::Reshape, vec![Attr::Shape(shape.clone())]),
        Op::Transpose { perm } => (
            ZOp::Transpose,
            vec![Attr::Perm(perm.iter().map(|&p| p as u8).collect())],
        ),
        Op::Expand { shape } => (ZOp::Expand, vec![Attr::Shape(shape.clone())]),
        Op::Rope { rope } => (ZOp::Rope, vec![rope_attr(rope)]),
        Op::Mask { expr, sides } => (
            ZOp::Mask,
            vec![
                Attr::Expr(ExprAttr::new(expr.clone(), loc)),
                names(sides),
                Attr::Shape(ty.shape.clone()),
            ],
        ),
        Op::ScoreMod { expr, sides } => (
            ZOp::ScoreMod,
            vec![Attr::Expr(ExprAttr::new(expr.clone(), loc)), names(sides)],
        ),
        Op::Select => (ZOp::Select, vec![]),
        Op::RmsNorm { eps } => (ZOp::RmsNorm, vec![float(*eps)]),
        Op::Linear { norm_eps, residual } => (
            ZOp::Linear,
            vec![optional(*norm_eps), Attr::Bool(*residual)],
        ),
        Op::SwiGlu { norm_eps } => (ZOp::SwiGlu, vec![optional(*norm_eps)]),
        Op::HeadsProj {
            heads,
            head_dim,
            norm_eps,
            bias,
            qk_norm,
            rope,
        } => (
            ZOp::HeadsProj,
            vec![
                Attr::Int(*heads as i64),
                Attr::Int(*head_dim as i64),
                optional(*norm_eps),
                Attr::Bool(*bias),
                optional(*qk_norm),
                rope.as_ref().map_or(Attr::None, rope_attr),
            ],
        ),
        Op::Attention(kernel) => (
            ZOp::Attention,
            vec![Attr::Kernel(KernelAttr::new((**kernel).clone()))],
        ),
        Op::TileRanges { block } => (ZOp::TileRanges, vec![Attr::Int(*block as i64)]),
        Op::AttentionLse(_)
        | Op::AttentionGrad { .. }
        | Op::EmbeddingGrad { .. }
        | Op::RopeGrad { .. }
        | Op::CeLse
        | Op::CeLoss
        | Op::CeGrad { .. } => (ZOp::Opaque(OpaqueOp::new(op.clone())), vec![]),
    }
}

/// The number of attribute leaves an operator takes.
pub fn attr_count(op: &ZOp) -> usize {
    match op {
        ZOp::Reduce(_)
        | ZOp::Reshape
        | ZOp::Transpose
        | ZOp::Expand
        | ZOp::Rope
        | ZOp::RmsNorm
        | ZOp::SwiGlu
        | ZOp::Attention
        | ZOp::TileRanges => 1,
        ZOp::ScoreMod | ZOp::Linear => 2,
        ZOp::Mask => 3,
        ZOp::HeadsProj => 6,
        ZOp::Scores | ZOp::RepeatKv => 1,
        _ => 0,
    }
}

/// Rebuilds the IR operation of an extractable e-node from its attributes; also returns the
/// source position of masks and score modifiers. `None` for leaves and recognized forms.
pub fn join_op(op: &ZOp, attrs: &[&Attr]) -> Option<(Op, Option<Loc>)> {
    let float = |a: &Attr| match a {
        Attr::Float(f) => Some(f.0),
        _ => None,
    };
    let optional = |a: &Attr| match a {
        Attr::Float(f) => Some(Some(f.0)),
        Attr::None => Some(None),
        _ => None,
    };
    let int = |a: &Attr| match a {
        Attr::Int(i) => Some(*i),
        _ => None,
    };
    let shape = |a: &Attr| match a {
        Attr::Shape(s) => Some(s.clone()),
        _ => None,
    };
    let names = |a: &Attr| match a {
        Attr::Names(n) => Some(n.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
        _ => None,
    };
    let expr = |a: &Attr| match a {
        Attr::Expr(e) => Some((e.expr.clone(), e.loc)),
        _ => None,
    };
    let plain = |op: Op| Some((op, None));
    match op {
        ZOp::Input(n) => plain(Op::Input {
            name: n.to_string(),
        }),
        ZOp::Weight(n) => plain(Op::Weight {
            name: n.to_string(),
        }),
        ZOp::Constant(v) => plain(Op::Constant { value: v.0 }),
        ZOp::Positions => plain(Op::Positions),
        ZOp::Opaque(o) => plain((*o.op).clone()),
        ZOp::Embedding => plain(Op::Embedding),
        ZOp::MatMul => plain(Op::MatMul),
        ZOp::Unary(u) => plain(Op::Unary(*u)),
        ZOp::Binary(b) => plain(Op::Binary(*b)),
        ZOp::Compare(c) => plain(Op::Compare(*c)),
        ZOp::Reduce(r) => plain(Op::Reduce {
            op: *r,
            axis: int(attrs[0])? as usize,
        }),
        ZOp::Reshape => plain(Op::Reshape {
            shape: shape(attrs[0])?,
        }),
        ZOp::Expand => plain(Op::Expand {
            shape: shape(attrs[0])?,
        }),
        ZOp::Transpose => match attrs[0] {
            Attr::Perm(p) => plain(Op::Transpose {
                perm: p.iter().map(|&x| x as usize).collect(),
            }),
            _ => None,
        },
        ZOp::Rope => plain(Op::Rope {
            rope: as_rope(attrs[0])?,
        }),
        ZOp::Mask => {
            let (expr, loc) = expr(attrs[0])?;
            Some((
                Op::Mask {
                    expr,
                    sides: names(attrs[1])?,
                },
                loc,
            ))
        }
        ZOp::ScoreMod => {
            let (expr, loc) = expr(attrs[0])?;
            Some((
                Op::ScoreMod {
                    expr,
                    sides: names(attrs[1])?,
                },
                loc,
            ))
        }
        ZOp::Select => plain(Op::Select),
        ZOp::RmsNorm => plain(Op::RmsNorm {
            eps: float(attrs[0])?,
        }),
        ZOp::Linear => plain(Op::Linear {
            norm_eps: optional(attrs[0])?,
            residual: matches!(attrs[1], Attr::Bool(true)),
        }),
        ZOp::SwiGlu => plain(Op::SwiGlu {
            norm_eps: optional(attrs[0])?,
        }),
        ZOp::HeadsProj => plain(Op::HeadsProj {
            heads: int(attrs[0])? as u64,
            head_dim: int(attrs[1])? as u64,
            norm_eps: optional(attrs[2])?,
            bias: matches!(attrs[3], Attr::Bool(true)),
            qk_norm: optional(attrs[4])?,
            rope: match attrs[5] {
                Attr::None => None,
                a => Some(as_rope(a)?),
            },
        }),
        ZOp::Attention => match attrs[0] {
            Attr::Kernel(k) => plain(Op::Attention(k.kernel.clone())),
            _ => None,
        },
        ZOp::TileRanges => plain(Op::TileRanges {
            block: int(attrs[0])? as u64,
        }),
        ZOp::Attr(_) | ZOp::Softmax | ZOp::Qk | ZOp::Scores | ZOp::RepeatKv => None,
    }
}

/// What the analysis knows about an e-class.
#[derive(Clone, Debug, PartialEq)]
pub struct Facts {
    /// The tensor type of the class's value; `None` for attribute leaves.
    pub ty: Option<TensorType>,
    /// The attribute, for attribute leaves.
    pub attr: Option<Attr>,
    /// The value, for scalar constants.
    pub constant: Option<f64>,
}

/// The analysis: types from the IR's typing rules, attributes, constants.
#[derive(Default)]
pub struct ZAnalysis {
    /// The types of leaves the e-graph cannot know: inputs (template externals among them)
    /// and weights.
    pub leaf_types: std::collections::HashMap<ZOp, TensorType>,
}

impl ZAnalysis {
    /// The type of a class, for rules: panics only on attribute leaves, which rules do not ask.
    pub fn ty(egraph: &EGraph<ZNode, ZAnalysis>, id: Id) -> Option<&TensorType> {
        egraph[id].data.ty.as_ref()
    }
}

impl Analysis<ZNode> for ZAnalysis {
    type Data = Facts;

    fn make(egraph: &mut EGraph<ZNode, ZAnalysis>, enode: &ZNode) -> Facts {
        let nothing = Facts {
            ty: None,
            attr: None,
            constant: None,
        };
        let typed = |ty: Option<TensorType>| Facts {
            ty,
            attr: None,
            constant: None,
        };
        match &enode.op {
            ZOp::Attr(a) => Facts {
                ty: None,
                attr: Some(a.clone()),
                constant: None,
            },
            ZOp::Input(_) | ZOp::Weight(_) => {
                typed(egraph.analysis.leaf_types.get(&enode.op).cloned())
            }
            ZOp::Constant(v) => Facts {
                ty: Some(TensorType::f32(vec![])),
                attr: None,
                constant: Some(v.0),
            },
            ZOp::Softmax => typed(egraph[enode.children[0]].data.ty.clone()),
            ZOp::Qk | ZOp::Scores => {
                let skip = usize::from(enode.op == ZOp::Scores);
                let (q, k) = (
                    &egraph[enode.children[skip]].data.ty,
                    &egraph[enode.children[skip + 1]].data.ty,
                );
                match (q, k) {
                    (Some(q), Some(k)) if q.rank() >= 2 && k.rank() == q.rank() => {
                        let mut shape = q.shape.clone();
                        let last = shape.len() - 1;
                        shape[last] = k.shape[k.rank() - 2];
                        typed(Some(TensorType::f32(shape)))
                    }
                    _ => nothing,
                }
            }
            ZOp::RepeatKv => {
                let group = match egraph[enode.children[0]].data.attr {
                    Some(Attr::Int(g)) => g as u64,
                    _ => return nothing,
                };
                match &egraph[enode.children[1]].data.ty {
                    Some(t) if t.rank() == 4 => {
                        let mut shape = t.shape.clone();
                        shape[1] = match shape[1] {
                            Dim::Const(n) => Dim::Const(n * group),
                            other => other,
                        };
                        typed(Some(TensorType::f32(shape)))
                    }
                    _ => nothing,
                }
            }
            op => {
                let n_attrs = attr_count(op);
                let attrs: Option<Vec<&Attr>> = enode.children[..n_attrs.min(enode.children.len())]
                    .iter()
                    .map(|&c| egraph[c].data.attr.as_ref())
                    .collect();
                let operands: Option<Vec<&TensorType>> = enode.children
                    [n_attrs.min(enode.children.len())..]
                    .iter()
                    .map(|&c| egraph[c].data.ty.as_ref())
                    .collect();
                let (Some(attrs), Some(operands)) = (attrs, operands) else {
                    return nothing;
                };
                let Some((ir_op, _)) = join_op(op, &attrs) else {
                    return nothing;
                };
                // Masks declare their shape (a head extent of 1 or the head count).
                let declared = match (&ir_op, attrs.get(2)) {
                    (Op::Mask { .. }, Some(Attr::Shape(shape))) => {
                        TensorType::new(DType::Bool, shape.clone())
                    }
                    _ => TensorType::f32(vec![]),
                };
                typed(ir_op.infer(&operands, &declared).ok())
            }
        }
    }

    fn merge(&mut self, a: &mut Facts, b: Facts) -> DidMerge {
        // Every rule preserves types and attributes: facts that disagree are a rule bug.
        assert!(
            a.ty.is_none() || b.ty.is_none() || a.ty == b.ty,
            "an optimizer rule merged values of different types: {:?} and {:?}",
            a.ty,
            b.ty
        );
        assert!(
            a.attr.is_none() || b.attr.is_none() || a.attr == b.attr,
            "a rule merged different attributes"
        );
        let mut changed = DidMerge(false, false);
        if a.ty.is_none() && b.ty.is_some() {
            a.ty = b.ty;
            changed.0 = true;
        }
        if a.constant.is_none() && b.constant.is_some() {
            a.constant = b.constant;
            changed.0 = true;
        }
        if a.attr.is_none() && b.attr.is_some() {
            a.attr = b.attr;
            changed.0 = true;
        }
        changed
    }
}
