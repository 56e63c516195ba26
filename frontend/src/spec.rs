//! Checked programs: models with every size known and every attention kind resolved to
//! index expressions. This is what the lowering and the later stages read.

use zebra_ir::rope::Rope;
use zebra_ir::{Expr, Loc};

use crate::diag::Span;

/// A checked `.zb` file.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub models: Vec<ModelSpec>,
}

impl Program {
    /// The model called `name`, or the only model when `name` is `None`.
    pub fn model(&self, name: Option<&str>) -> Result<&ModelSpec, String> {
        match name {
            Some(name) => self.models.iter().find(|m| m.name == name).ok_or_else(|| {
                let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
                format!(
                    "no model named `{name}` (the file defines: {})",
                    names.join(", ")
                )
            }),
            None => match self.models.as_slice() {
                [only] => Ok(only),
                [] => Err("the file defines no model".into()),
                many => {
                    let names: Vec<&str> = many.iter().map(|m| m.name.as_str()).collect();
                    Err(format!(
                        "the file defines several models ({}); pick one with --model",
                        names.join(", ")
                    ))
                }
            },
        }
    }
}

/// One Llama-style decoder model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub span: Span,
    pub vocab: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// The hidden size of the SwiGLU feed-forward block.
    pub ffn_hidden: usize,
    /// The epsilon of every RMSNorm.
    pub norm_eps: f64,
    /// Whether the LM head reuses the embedding table.
    pub tied_embeddings: bool,
    /// The attention projections that add a bias (Qwen2's Q, K and V).
    pub biases: Biases,
    /// RMSNorm over each head of the queries and keys before RoPE, with its epsilon (Qwen3,
    /// Gemma 3's QK-norm); its scales are shared by the heads.
    pub qk_norm: Option<f64>,
    /// The distinct attention kinds, in order of first use.
    pub kinds: Vec<AttentionKind>,
    /// For each layer, the index of its kind in `kinds`.
    pub layers: Vec<usize>,
    /// The per-token side inputs the model's masks read (e.g. `doc`), sorted.
    pub side_inputs: Vec<String>,
}

/// Which of the attention's projections add a bias after their product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Biases {
    pub q: bool,
    pub k: bool,
    pub v: bool,
    pub o: bool,
}

impl Biases {
    /// The projections' names, in the DSL's spelling and order.
    pub const NAMES: [&'static str; 4] = ["q", "k", "v", "o"];

    /// Whether projection `name` (`q`, `k`, `v` or `o`) adds a bias.
    pub fn has(&self, name: &str) -> bool {
        match name {
            "q" => self.q,
            "k" => self.k,
            "v" => self.v,
            "o" => self.o,
            _ => false,
        }
    }

    /// Sets projection `name`'s bias; `false` for a name that is not a projection.
    pub fn set(&mut self, name: &str) -> bool {
        let slot = match name {
            "q" => &mut self.q,
            "k" => &mut self.k,
            "v" => &mut self.v,
            "o" => &mut self.o,
            _ => return false,
        };
        *slot = true;
        true
    }

    pub fn any(&self) -> bool {
        Self::NAMES.iter().any(|n| self.has(n))
    }
}

/// One attention variant with all its parameters bound.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionKind {
    /// How the model names it: `local`, or `local(window = 8)` when arguments differ from the
    /// defaults.
    pub label: String,
    /// The name of the `attention` declaration.
    pub attention: String,
    /// Every non-side parameter with its value, in declaration order.
    pub args: Vec<(String, ParamValue)>,
    pub causal: bool,
    /// The mask predicate, parameters substituted.
    pub mask: Expr,
    /// The score modifier, parameters substituted, if any.
    pub score: Option<Expr>,
    /// The side inputs the mask and score read, sorted.
    pub sides: Vec<String>,
    /// The RoPE of layers of this kind; `None` for no position embedding.
    pub rope: Option<Rope>,
    pub mask_loc: Loc,
    pub score_loc: Option<Loc>,
    pub mask_span: Span,
    pub score_span: Option<Span>,
}

/// A bound parameter value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ParamValue {
    Int(i64),
    Float(f64),
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamValue::Int(v) => write!(f, "{v}"),
            ParamValue::Float(v) => f.write_str(&zebra_ir::expr::fmt_float(*v)),
        }
    }
}

/// How a weight starts in `zebra init`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// All ones (norm scales).
    Ones,
    /// All zeros (biases, as Hugging Face starts them).
    Zeros,
}

/// One weight tensor of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// The standard deviation of `zebra init`'s normal weights (Hugging Face's
/// `initializer_range`).
pub const INIT_STD: f64 = 0.02;

impl ModelSpec {
    /// The same model with every layer of one attention kind, named by its label
    /// (`local`) or its declaration's name: the baselines a grouped layout is compared with.
    pub fn with_every_layer(&self, kind: &str) -> Result<ModelSpec, String> {
        let index = self
            .kinds
            .iter()
            .position(|k| k.label == kind)
            .or_else(|| self.kinds.iter().position(|k| k.attention == kind))
            .ok_or_else(|| {
                let kinds: Vec<&str> = self.kinds.iter().map(|k| k.label.as_str()).collect();
                format!(
                    "model `{}` has no attention kind `{kind}` (its kinds: {})",
                    self.name,
                    kinds.join(", ")
                )
            })?;
        let mut spec = self.clone();
        spec.layers = vec![index; spec.layers.len()];
        spec.name = format!("{}_all_{}", self.name, self.kinds[index].attention);
        Ok(spec)
    }

    /// The query heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Every weight, named and laid out as in Hugging Face Llama checkpoints.
    pub fn weight_specs(&self) -> Vec<WeightSpec> {
        let normal = |name: String, shape: Vec<usize>| WeightSpec {
            name,
            shape,
            init: Init::Normal(INIT_STD),
        };
        let ones = |name: String, dim: usize| WeightSpec {
            name,
            shape: vec![dim],
            init: Init::Ones,
        };
        let (d, hd) = (self.dim, self.head_dim);
        let mut specs = vec![normal(
            "model.embed_tokens.weight".into(),
            vec![self.vocab, d],
        )];
        for i in 0..self.layers.len() {
            let p = format!("model.layers.{i}");
            specs.push(ones(format!("{p}.input_layernorm.weight"), d));
            specs.push(normal(
                format!("{p}.self_attn.q_proj.weight"),
                vec![self.n_heads * hd, d],
            ));
            specs.push(normal(
                format!("{p}.self_attn.k_proj.weight"),
                vec![self.n_kv_heads * hd, d],
            ));
            specs.push(normal(
                format!("{p}.self_attn.v_proj.weight"),
                vec![self.n_kv_heads * hd, d],
            ));
            specs.push(normal(
                format!("{p}.self_attn.o_proj.weight"),
                vec![d, self.n_heads * hd],
            ));
            for (proj, size) in [
                ("q", self.n_heads * hd),
                ("k", self.n_kv_heads * hd),
                ("v", self.n_kv_heads * hd),
                ("o", d),
            ] {
                if self.biases.has(proj) {
                    specs.push(WeightSpec {
                        name: format!("{p}.self_attn.{proj}_proj.bias"),
                        shape: vec![size],
                        init: Init::Zeros,
                    });
                }
            }
            if self.qk_norm.is_some() {
                specs.push(ones(format!("{p}.self_attn.q_norm.weight"), hd));
                specs.push(ones(format!("{p}.self_attn.k_norm.weight"), hd));
            }
            specs.push(ones(format!("{p}.post_attention_layernorm.weight"), d));
            specs.push(normal(
                format!("{p}.mlp.gate_proj.weight"),
                vec![self.ffn_hidden, d],
            ));
            specs.push(normal(
                format!("{p}.mlp.up_proj.weight"),
                vec![self.ffn_hidden, d],
            ));
            specs.push(normal(
                format!("{p}.mlp.down_proj.weight"),
                vec![d, self.ffn_hidden],
            ));
        }
        specs.push(ones("model.norm.weight".into(), d));
        if !self.tied_embeddings {
            specs.push(normal("lm_head.weight".into(), vec![self.vocab, d]));
        }
        specs
    }

    /// The number of parameters (`usize::MAX` past it: more than any memory holds).
    pub fn parameter_count(&self) -> usize {
        self.weight_specs().iter().fold(0usize, |n, w| {
            let count = w.shape.iter().fold(1usize, |c, &e| c.saturating_mul(e));
            n.saturating_add(count)
        })
    }
}
