//! Lowering: a checked model to the graph IR, in primitive ops that say exactly what is
//! computed. One decoder layer is
//!
//! ```text
//! h = x + o_proj(attention(rope(q_proj(rmsnorm(x))), rope(k_proj(...)), v_proj(...)))
//! y = h + down_proj(silu(gate_proj(rmsnorm(h))) * up_proj(rmsnorm(h)))
//! ```
//!
//! (with, where the model asks for them, a bias added after a projection's product, as in
//! Qwen2's Q, K and V, and an RMSNorm over each head of Q and K before RoPE: QK-norm),
//! and attention is written out the plain way: `softmax(mask(score_mod(scale * Q K^T))) V`,
//! with K and V repeated across each GQA group as Hugging Face's `repeat_kv` does. The
//! softmax guards its max and its sum so that a row whose keys are all masked gives zeros
//! instead of NaN.

use std::collections::HashMap;

use zebra_ir::op::{BinaryOp, Op, ReduceOp, UnaryOp};
use zebra_ir::{DType, Dim, Graph, LayerInfo, Loc, NodeId, TensorType};

use crate::spec::{AttentionKind, ModelSpec};

/// The lowering produced a node whose type does not check: a bug in the lowering.
#[derive(Debug, thiserror::Error)]
#[error("internal error while lowering model `{model}`: {message}")]
pub struct LowerError {
    pub model: String,
    pub message: String,
}

/// The masked-out score: `softmax` gives these keys weight 0.
pub const MASKED: f64 = f64::NEG_INFINITY;
/// The softmax's running max is clamped to at least this (f32's lowest finite value), so a
/// row with every key masked computes `exp(-inf - lowest) = 0` rather than `exp(NaN)`.
pub const SOFTMAX_MAX_FLOOR: f64 = f32::MIN as f64;
/// The softmax's sum is clamped to at least this (f32's smallest normal value), so a row with
/// every key masked computes `0 / tiny = 0`. A row with a visible key has a sum of at least 1.
pub const SOFTMAX_SUM_FLOOR: f64 = f32::MIN_POSITIVE as f64;

/// Lowers a checked model to a graph with input `tokens: i64[B, T]`, one `i64[B, T]` input
/// per side input, and output `logits: f32[B, T, vocab]`.
pub fn lower(model: &ModelSpec) -> Result<Graph, LowerError> {
    let mut b = Builder {
        graph: Graph::new(model.name.clone()),
        layer: None,
        model,
        weights: HashMap::new(),
    };
    b.graph.layers = model
        .layers
        .iter()
        .map(|&k| LayerInfo {
            kind: model.kinds[k].label.clone(),
        })
        .collect();
    let tokens = b.input("tokens");
    let sides: Vec<(String, NodeId)> = model
        .side_inputs
        .iter()
        .map(|name| (name.clone(), b.input(name)))
        .collect();
    let embed = b.weight("model.embed_tokens.weight", &[model.vocab, model.dim]);
    let mut x = b.op(Op::Embedding, &[embed, tokens])?;
    let positions = b.op(Op::Positions, &[])?;
    for (i, &kind) in model.layers.iter().enumerate() {
        b.layer = Some(i as u32);
        x = b.decoder_layer(x, i, &model.kinds[kind], positions, &sides)?;
    }
    b.layer = None;
    let norm = b.weight("model.norm.weight", &[model.dim]);
    let x = b.rmsnorm(x, norm, model.norm_eps)?;
    let head = if model.tied_embeddings {
        embed
    } else {
        b.weight("lm_head.weight", &[model.vocab, model.dim])
    };
    let logits = b.linear(x, head)?;
    b.graph.add_output("logits", logits);
    Ok(b.graph)
}

struct Builder<'m> {
    graph: Graph,
    layer: Option<u32>,
    model: &'m ModelSpec,
    weights: HashMap<String, NodeId>,
}

impl Builder<'_> {
    fn error(&self, message: String) -> LowerError {
        LowerError {
            model: self.model.name.clone(),
            message,
        }
    }

    fn op(&mut self, op: Op, operands: &[NodeId]) -> Result<NodeId, LowerError> {
        self.graph
            .add_inferred(op, operands, self.layer)
            .map_err(|m| self.error(m))
    }

    fn op_at(&mut self, op: Op, operands: &[NodeId], loc: Loc) -> Result<NodeId, LowerError> {
        let id = self.op(op, operands)?;
        self.graph.node_mut(id).loc = Some(loc);
        Ok(id)
    }

    fn input(&mut self, name: &str) -> NodeId {
        self.graph.add(
            zebra_ir::Node {
                op: Op::Input { name: name.into() },
                ty: TensorType::new(DType::I64, vec![Dim::B, Dim::T]),
                layer: None,
                loc: None,
            },
            &[],
        )
    }

    fn weight(&mut self, name: &str, shape: &[usize]) -> NodeId {
        if let Some(&id) = self.weights.get(name) {
            return id;
        }
        let shape: Vec<Dim> = shape.iter().map(|&d| Dim::Const(d as u64)).collect();
        let id = self.graph.add(
            zebra_ir::Node {
                op: Op::Weight { name: name.into() },
                ty: TensorType::f32(shape),
                layer: self.layer,
                loc: None,
            },
            &[],
        );
        self.weights.insert(name.into(), id);
        id
    }

    fn constant(&mut self, value: f64) -> Result<NodeId, LowerError> {
        self.op(Op::Constant { value }, &[])
    }

    fn binary(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> Result<NodeId, LowerError> {
        self.op(Op::Binary(op), &[a, b])
    }

    fn unary(&mut self, op: UnaryOp, a: NodeId) -> Result<NodeId, LowerError> {
        self.op(Op::Unary(op), &[a])
    }

    fn rank(&self, id: NodeId) -> usize {
        self.graph.node(id).ty.rank()
    }

    /// `x @ w^T` for a Hugging Face `[out, in]` weight.
    fn linear(&mut self, x: NodeId, w: NodeId) -> Result<NodeId, LowerError> {
        let wt = self.op(Op::Transpose { perm: vec![1, 0] }, &[w])?;
        self.op(Op::MatMul, &[x, wt])
    }

    /// Attention projection `name` (`q`, `k`, `v` or `o`) of the layer whose weights are
    /// under `prefix`: `x @ w^T`, plus its bias when the model has one.
    fn projection(
        &mut self,
        x: NodeId,
        w: NodeId,
        prefix: &str,
        name: &str,
    ) -> Result<NodeId, LowerError> {
        let y = self.linear(x, w)?;
        if !self.model.biases.has(name) {
            return Ok(y);
        }
        let n = self.graph.node(w).ty.shape[0]
            .as_const()
            .expect("weights have constant shapes") as usize;
        let bias = self.weight(&format!("{prefix}.self_attn.{name}_proj.bias"), &[n]);
        self.binary(BinaryOp::Add, y, bias)
    }

    /// `x * rsqrt(mean(x^2, last axis) + eps) * weight`, as Hugging Face's LlamaRMSNorm.
    fn rmsnorm(&mut self, x: NodeId, weight: NodeId, eps: f64) -> Result<NodeId, LowerError> {
        let axis = self.rank(x) - 1;
        let squared = self.binary(BinaryOp::Mul, x, x)?;
        let mean = self.op(
            Op::Reduce {
                op: ReduceOp::Mean,
                axis,
            },
            &[squared],
        )?;
        let eps = self.constant(eps)?;
        let shifted = self.binary(BinaryOp::Add, mean, eps)?;
        let scale = self.unary(UnaryOp::Rsqrt, shifted)?;
        let normed = self.binary(BinaryOp::Mul, x, scale)?;
        self.binary(BinaryOp::Mul, normed, weight)
    }

    /// `[B, T, n * hd] -> [B, n, T, hd]`.
    fn split_heads(&mut self, x: NodeId, n: usize) -> Result<NodeId, LowerError> {
        let hd = self.model.head_dim as u64;
        let shape = vec![Dim::B, Dim::T, Dim::Const(n as u64), Dim::Const(hd)];
        let x = self.op(Op::Reshape { shape }, &[x])?;
        self.op(
            Op::Transpose {
                perm: vec![0, 2, 1, 3],
            },
            &[x],
        )
    }

    /// Hugging Face's `repeat_kv`: `[B, kv, T, hd] -> [B, kv * group, T, hd]`.
    fn repeat_kv(&mut self, x: NodeId) -> Result<NodeId, LowerError> {
        let group = self.model.group_size() as u64;
        if group == 1 {
            return Ok(x);
        }
        let (kv, hd) = (self.model.n_kv_heads as u64, self.model.head_dim as u64);
        let c = Dim::Const;
        let x = self.op(
            Op::Reshape {
                shape: vec![Dim::B, c(kv), c(1), Dim::T, c(hd)],
            },
            &[x],
        )?;
        let x = self.op(
            Op::Expand {
                shape: vec![Dim::B, c(kv), c(group), Dim::T, c(hd)],
            },
            &[x],
        )?;
        self.op(
            Op::Reshape {
                shape: vec![Dim::B, c(kv * group), Dim::T, c(hd)],
            },
            &[x],
        )
    }

    fn decoder_layer(
        &mut self,
        x: NodeId,
        index: usize,
        kind: &AttentionKind,
        positions: NodeId,
        sides: &[(String, NodeId)],
    ) -> Result<NodeId, LowerError> {
        let m = self.model;
        let p = format!("model.layers.{index}");
        let (d, hd) = (m.dim, m.head_dim);

        let norm = self.weight(&format!("{p}.input_layernorm.weight"), &[d]);
        let h = self.rmsnorm(x, norm, m.norm_eps)?;
        let wq = self.weight(
            &format!("{p}.self_attn.q_proj.weight"),
            &[m.n_heads * hd, d],
        );
        let wk = self.weight(
            &format!("{p}.self_attn.k_proj.weight"),
            &[m.n_kv_heads * hd, d],
        );
        let wv = self.weight(
            &format!("{p}.self_attn.v_proj.weight"),
            &[m.n_kv_heads * hd, d],
        );
        let wo = self.weight(
            &format!("{p}.self_attn.o_proj.weight"),
            &[d, m.n_heads * hd],
        );
        let q = self.projection(h, wq, &p, "q")?;
        let q = self.split_heads(q, m.n_heads)?;
        let k = self.projection(h, wk, &p, "k")?;
        let k = self.split_heads(k, m.n_kv_heads)?;
        let v = self.projection(h, wv, &p, "v")?;
        let v = self.split_heads(v, m.n_kv_heads)?;
        let (q, k) = match m.qk_norm {
            Some(eps) => {
                let gq = self.weight(&format!("{p}.self_attn.q_norm.weight"), &[hd]);
                let gk = self.weight(&format!("{p}.self_attn.k_norm.weight"), &[hd]);
                (self.rmsnorm(q, gq, eps)?, self.rmsnorm(k, gk, eps)?)
            }
            None => (q, k),
        };
        let (q, k) = match kind.rope {
            Some(rope) => (
                self.op(Op::Rope { rope }, &[q, positions])?,
                self.op(Op::Rope { rope }, &[k, positions])?,
            ),
            None => (q, k),
        };
        let k = self.repeat_kv(k)?;
        let v = self.repeat_kv(v)?;
        let attn = self.attention(q, k, v, kind, sides)?;
        let attn = self.op(
            Op::Transpose {
                perm: vec![0, 2, 1, 3],
            },
            &[attn],
        )?;
        let merged = vec![Dim::B, Dim::T, Dim::Const((m.n_heads * hd) as u64)];
        let attn = self.op(Op::Reshape { shape: merged }, &[attn])?;
        let out = self.projection(attn, wo, &p, "o")?;
        let x = self.binary(BinaryOp::Add, x, out)?;

        let norm = self.weight(&format!("{p}.post_attention_layernorm.weight"), &[d]);
        let h = self.rmsnorm(x, norm, m.norm_eps)?;
        let f = m.ffn_hidden;
        let wg = self.weight(&format!("{p}.mlp.gate_proj.weight"), &[f, d]);
        let wu = self.weight(&format!("{p}.mlp.up_proj.weight"), &[f, d]);
        let wd = self.weight(&format!("{p}.mlp.down_proj.weight"), &[d, f]);
        let gate = self.linear(h, wg)?;
        let up = self.linear(h, wu)?;
        let sig = self.unary(UnaryOp::Sigmoid, gate)?;
        let silu = self.binary(BinaryOp::Mul, gate, sig)?;
        let act = self.binary(BinaryOp::Mul, silu, up)?;
        let down = self.linear(act, wd)?;
        self.binary(BinaryOp::Add, x, down)
    }

    /// `softmax(mask(score_mod(Q K^T * scale))) V` over `[B, H, T, hd]` operands.
    fn attention(
        &mut self,
        q: NodeId,
        k: NodeId,
        v: NodeId,
        kind: &AttentionKind,
        sides: &[(String, NodeId)],
    ) -> Result<NodeId, LowerError> {
        let kt = self.op(
            Op::Transpose {
                perm: vec![0, 1, 3, 2],
            },
            &[k],
        )?;
        let scores = self.op(Op::MatMul, &[q, kt])?;
        let scale = self.constant(1.0 / (self.model.head_dim as f64).sqrt())?;
        let mut scores = self.binary(BinaryOp::Mul, scores, scale)?;
        let side_ids = |names: &[String]| -> Vec<NodeId> {
            names
                .iter()
                .filter_map(|n| sides.iter().find(|(s, _)| s == n).map(|(_, id)| *id))
                .collect()
        };
        if let Some(expr) = &kind.score {
            let names: Vec<String> = expr.sides().into_iter().collect();
            let mut operands = vec![scores];
            operands.extend(side_ids(&names));
            let op = Op::ScoreMod {
                expr: expr.clone(),
                sides: names,
            };
            scores = self.op_at(op, &operands, kind.score_loc.unwrap_or(kind.mask_loc))?;
        }
        let names: Vec<String> = kind.mask.sides().into_iter().collect();
        let batch = if kind.mask.depends_on_batch() {
            Dim::B
        } else {
            Dim::ONE
        };
        let heads = if kind.mask.depends_on_head() {
            Dim::Const(self.model.n_heads as u64)
        } else {
            Dim::ONE
        };
        let mask_node = zebra_ir::Node {
            op: Op::Mask {
                expr: kind.mask.clone(),
                sides: names.clone(),
            },
            ty: TensorType::new(DType::Bool, vec![batch, heads, Dim::T, Dim::T]),
            layer: self.layer,
            loc: Some(kind.mask_loc),
        };
        let mask = self.graph.add(mask_node, &side_ids(&names));
        let fill = self.constant(MASKED)?;
        let scores = self.op(Op::Select, &[mask, scores, fill])?;

        // softmax along the key axis, as primitives.
        let max = self.op(
            Op::Reduce {
                op: ReduceOp::Max,
                axis: 3,
            },
            &[scores],
        )?;
        let floor = self.constant(SOFTMAX_MAX_FLOOR)?;
        let max = self.binary(BinaryOp::Max, max, floor)?;
        let shifted = self.binary(BinaryOp::Sub, scores, max)?;
        let exp = self.unary(UnaryOp::Exp, shifted)?;
        let sum = self.op(
            Op::Reduce {
                op: ReduceOp::Sum,
                axis: 3,
            },
            &[exp],
        )?;
        let floor = self.constant(SOFTMAX_SUM_FLOOR)?;
        let sum = self.binary(BinaryOp::Max, sum, floor)?;
        let probs = self.binary(BinaryOp::Div, exp, sum)?;
        self.op(Op::MatMul, &[probs, v])
    }
}
