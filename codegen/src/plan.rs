//! From an optimized graph to an execution plan: one or more kernel steps per node, packed
//! weights for the projections, tile schedules and RoPE tables the runtime computes, and
//! memory slots shared by values whose lifetimes do not overlap.

use std::collections::HashMap;

use zebra_ir::cache::KvPolicy;
use zebra_ir::op::{AttentionKernel, GradOf, Op};
use zebra_ir::types::{DType, Dim, Sym, TensorType};
use zebra_ir::{Graph, NodeId};
use zebra_runtime::plan::{
    CacheSpec, ElemType, Extent, Grid, InputSpec, KernelInfo, Operand, OptimizerPlan, PLAN_FORMAT,
    PackSpec, Plan, ScheduleSpec, Step, TrainedWeight, ValueSpec, WeightSpec,
};

use crate::CodegenError;
use crate::kernels::matmul::MatMulShape;
use crate::kernels::optimizer::OptimizerKernel;
use crate::kernels::{KernelSpec, generic};

/// What a plan computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PlanMode {
    /// The graph's outputs over whole sequences.
    #[default]
    Forward,
    /// As `Forward`, and each attention's keys and values (outputs `cache:{c}:k` and
    /// `cache:{c}:v`, `[B, KV, T, D]`), from which the runtime fills the KV caches.
    Prefill,
    /// One decode step (`T = 1` at a position the runtime gives): each attention runs
    /// against its layer's KV cache, appending the new key and value.
    Decode,
}

/// A plan with the kernels it calls, in the order of `plan.kernels`.
pub struct Planned {
    pub plan: Plan,
    pub kernels: Vec<KernelSpec>,
}

pub(crate) fn extent(dim: Dim) -> Extent {
    match dim {
        Dim::Const(n) => Extent::Const(n),
        Dim::Sym(Sym::Batch) => Extent::Batch,
        Dim::Sym(Sym::Seq) => Extent::Seq,
        Dim::Blocks(_, n) => Extent::SeqBlocks(u64::from(n)),
    }
}

fn elem(dtype: DType) -> ElemType {
    match dtype {
        DType::F32 => ElemType::F32,
        DType::I64 => ElemType::I64,
        DType::Bool => ElemType::U8,
    }
}

struct Planner<'g> {
    graph: &'g Graph,
    mode: PlanMode,
    /// Prefill's extra outputs: each attention's keys and values.
    cache_outputs: Vec<(String, NodeId)>,
    vector: usize,
    /// Whether the projections' weights are packed as bf16 ([`PlanOptions::bf16_weights`]).
    bf16_weights: bool,
    plan: Plan,
    kernels: Vec<KernelSpec>,
    symbols: HashMap<String, usize>,
    operand: HashMap<NodeId, Operand>,
    packs: HashMap<(usize, bool, Option<usize>, usize), usize>,
    /// The step that writes each value.
    defined: Vec<usize>,
}

impl Planner<'_> {
    fn kernel(&mut self, spec: KernelSpec) -> usize {
        let symbol = spec.symbol(self.vector);
        if let Some(&i) = self.symbols.get(&symbol) {
            return i;
        }
        let i = self.kernels.len();
        self.plan.kernels.push(KernelInfo {
            symbol: symbol.clone(),
            description: spec.description(self.vector),
            tensor_cores: None,
            cache_splits: match spec {
                KernelSpec::AttentionDecode { .. } => crate::kernels::decode::CACHE_SPLITS,
                _ => 0,
            },
        });
        self.kernels.push(spec);
        self.symbols.insert(symbol, i);
        i
    }

    /// A training plan's optimizer (see [`OptimizerPlan`]), for every weight whose
    /// gradient is an output (`grad:{name}`); nothing for other plans.
    fn optimizer(&mut self) {
        let mut params: Vec<TrainedWeight> = self
            .plan
            .outputs
            .iter()
            .filter_map(|(name, v)| {
                let name = name.strip_prefix("grad:")?;
                let weight = self.plan.weights.iter().position(|w| w.name == name)?;
                let decay = zebra_runtime::train::decays(name, &self.plan.weights[weight].shape);
                Some(TrainedWeight {
                    weight,
                    grad: *v,
                    decay,
                })
            })
            .collect();
        if params.is_empty() {
            return;
        }
        params.sort_by_key(|p| p.weight);
        let (mut norm, mut update, mut partials) = (Vec::new(), Vec::new(), 0);
        for (i, p) in params.iter().enumerate() {
            let n = self.plan.weights[p.weight].len();
            let parts = OptimizerKernel::parts(n, self.vector);
            let operands = vec![Operand::Value(p.grad), Operand::Partials(partials)];
            norm.push(self.optimizer_step(OptimizerKernel::SumSquares { n, parts }, operands));
            partials += parts;
            let operands = vec![
                Operand::Weight(p.weight),
                Operand::Value(p.grad),
                Operand::MomentM(i),
                Operand::MomentV(i),
                Operand::Hyper,
            ];
            let kernel = OptimizerKernel::AdamW { n, decay: p.decay };
            update.push(self.optimizer_step(kernel, operands));
        }
        // Packed weights made from trained weights, packed again after the update.
        let trained = |w: usize| params.iter().any(|p| p.weight == w);
        for (i, spec) in self.plan.packed.clone().into_iter().enumerate() {
            if !trained(spec.weight) && !spec.norm.is_some_and(trained) {
                continue;
            }
            let mut operands = vec![Operand::Weight(spec.weight)];
            operands.extend(spec.norm.map(Operand::Weight));
            operands.push(Operand::Packed(i));
            update.push(self.optimizer_step(OptimizerKernel::Pack(spec), operands));
        }
        self.plan.optimizer = Some(OptimizerPlan {
            params,
            norm,
            partials,
            update,
        });
    }

    /// A step running an optimizer kernel over its programs.
    fn optimizer_step(&mut self, kernel: OptimizerKernel, operands: Vec<Operand>) -> Step {
        let programs = kernel.programs(self.vector);
        let kernel = self.kernel(KernelSpec::Optimizer(kernel));
        Step::Kernel {
            kernel,
            operands,
            grid: Grid {
                rows: vec![Extent::Const(programs as u64)],
                row_chunk: 1,
                cols: 1,
            },
            schedule: None,
        }
    }

    fn weight_index(&self, id: NodeId) -> Result<usize, CodegenError> {
        match self.operand.get(&id) {
            Some(Operand::Weight(w)) => Ok(*w),
            _ => Err(CodegenError::Unsupported(format!(
                "a projection's matrix must be a weight, found `{}`",
                self.graph.node(id).op.name()
            ))),
        }
    }

    /// A projection's matrix: a weight, or a weight's transpose. Returns the weight, whether
    /// it is transposed, and the matrix's `[N, K]`.
    fn matrix(&self, id: NodeId) -> Result<(usize, bool, usize, usize), CodegenError> {
        if let Op::Transpose { perm } = &self.graph.node(id).op
            && perm == &[1, 0]
        {
            let w = self.weight_index(self.graph.operands(id)[0])?;
            let shape = &self.plan.weights[w].shape;
            return Ok((w, true, shape[1], shape[0]));
        }
        let w = self.weight_index(id)?;
        let shape = &self.plan.weights[w].shape;
        Ok((w, false, shape[0], shape[1]))
    }

    fn pack(
        &mut self,
        matrix: (usize, bool, usize, usize),
        norm: Option<usize>,
        group: usize,
    ) -> Operand {
        let (weight, transposed, n, k) = matrix;
        let key = (weight, transposed, norm, group);
        if let Some(&p) = self.packs.get(&key) {
            return Operand::Packed(p);
        }
        let spec = PackSpec {
            weight,
            norm,
            transposed,
            n,
            k,
            group,
            nr: crate::kernels::gemm::panel_width(self.vector),
            bf16: self.bf16_weights,
        };
        let p = self.plan.packed.len();
        self.plan.packed.push(spec);
        self.packs.insert(key, p);
        Operand::Packed(p)
    }

    fn value(&mut self, ty: &TensorType) -> usize {
        self.plan.values.push(ValueSpec {
            shape: ty.shape.iter().map(|d| extent(*d)).collect(),
            elem: elem(ty.dtype),
            slot: 0,
        });
        self.plan.values.len() - 1
    }

    fn step(
        &mut self,
        spec: KernelSpec,
        operands: Vec<Operand>,
        grid: Grid,
        schedule: Option<usize>,
    ) {
        let kernel = self.kernel(spec);
        self.plan.steps.push(Step::Kernel {
            kernel,
            operands,
            grid,
            schedule,
        });
    }

    fn node(&mut self, id: NodeId) -> Result<(), CodegenError> {
        let node = self.graph.node(id);
        let operands: Vec<NodeId> = self.graph.operands(id);
        let of = |p: &Planner, i: usize| p.operand[&operands[i]];
        let source = match &node.op {
            Op::Input { name } => Some(Operand::Input(
                self.plan
                    .inputs
                    .iter()
                    .position(|i| &i.name == name)
                    .unwrap_or_else(|| {
                        self.plan.inputs.push(InputSpec {
                            name: name.clone(),
                            elem: elem(node.ty.dtype),
                            shape: node.ty.shape.iter().map(|d| extent(*d)).collect(),
                        });
                        self.plan.inputs.len() - 1
                    }),
            )),
            Op::Weight { name } => {
                let index = self
                    .plan
                    .weights
                    .iter()
                    .position(|w| &w.name == name)
                    .unwrap_or_else(|| {
                        let shape = node
                            .ty
                            .shape
                            .iter()
                            .map(|d| d.as_const().unwrap_or(0) as usize)
                            .collect();
                        self.plan.weights.push(WeightSpec {
                            name: name.clone(),
                            shape,
                        });
                        self.plan.weights.len() - 1
                    });
                Some(Operand::Weight(index))
            }
            Op::Constant { value } => {
                self.plan.constants.push(*value as f32);
                Some(Operand::Constant(self.plan.constants.len() - 1))
            }
            Op::Positions => Some(Operand::Positions),
            _ => None,
        };
        if let Some(source) = source {
            self.operand.insert(id, source);
            return Ok(());
        }
        // Tile ranges feeding only attention: the schedule step computes them itself.
        if matches!(node.op, Op::TileRanges { .. })
            && self
                .graph
                .users(id)
                .iter()
                .all(|u| self.graph.node(*u).op.attention_kernel().is_some())
        {
            return Ok(());
        }
        // A weight's transpose read only as a projection's matrix: packed, never materialized.
        if let Op::Transpose { perm } = &node.op
            && perm == &[1, 0]
            && matches!(self.operand.get(&operands[0]), Some(Operand::Weight(_)))
            && self.graph.users(id).iter().all(|&u| {
                let matrices: &[usize] = match self.graph.node(u).op {
                    Op::Linear { .. } | Op::HeadsProj { .. } => &[1],
                    Op::SwiGlu { .. } => &[1, 2],
                    _ => &[],
                };
                self.graph
                    .operands(u)
                    .iter()
                    .enumerate()
                    .all(|(i, &o)| o != id || matrices.contains(&i))
            })
        {
            return Ok(());
        }
        // A transpose read only by matmuls that look through it: never materialized.
        if matches!(node.op, Op::Transpose { .. })
            && !self.graph.users(id).is_empty()
            && self.graph.users(id).iter().all(|&u| {
                matches!(self.graph.node(u).op, Op::MatMul)
                    && self.matmul_plan(u).is_some_and(|(_, a, b)| {
                        let ops = self.graph.operands(u);
                        (ops[0] != id || a != id) && (ops[1] != id || b != id)
                    })
            })
            && !self.graph.outputs().iter().any(|(_, o)| *o == id)
        {
            return Ok(());
        }
        if let Some(kernel) = node.op.attention_kernel() {
            if self.operand.contains_key(&id) {
                return Ok(()); // planned with a sibling
            }
            let kernel = kernel.clone();
            return self.attention_family(id, &kernel);
        }
        // A prefill's logits: only each batch row's last position picks the next token, so
        // only it is computed (a [T, vocab] tensor is the largest a long prompt would make).
        let last_rows = self.mode == PlanMode::Prefill
            && matches!(
                node.op,
                Op::Linear {
                    residual: false,
                    ..
                }
            )
            && node.ty.rank() == 3
            && node.ty.shape[1] == Dim::T
            && self.graph.users(id).is_empty()
            && self
                .graph
                .outputs()
                .iter()
                .any(|(name, o)| *o == id && name == "logits");
        let out = if last_rows {
            let mut ty = node.ty.clone();
            ty.shape[1] = Dim::Const(1);
            self.value(&ty)
        } else {
            self.value(&node.ty)
        };
        let out_operand = Operand::Value(out);
        self.defined.push(usize::MAX);
        self.operand.insert(id, out_operand);
        let rows_of = |ty: &TensorType| -> Vec<Extent> {
            ty.shape[..ty.rank() - 1]
                .iter()
                .map(|d| extent(*d))
                .collect()
        };
        match &node.op {
            Op::Linear { .. } | Op::SwiGlu { .. } | Op::HeadsProj { .. }
                if self.graph.node(operands[0]).ty.shape[..]
                    != [Dim::B, Dim::T, self.graph.node(operands[0]).ty.shape[2]] =>
            {
                return Err(CodegenError::Unsupported(format!(
                    "`{}` needs its input as [B, T, K], found {}",
                    node.op.name(),
                    self.graph.node(operands[0]).ty
                )));
            }
            Op::Linear { norm_eps, residual } => {
                let x_ty = &self.graph.node(operands[0]).ty;
                let w = self.matrix(operands[1])?;
                let norm = match norm_eps {
                    Some(_) => Some(self.weight_index(operands[2])?),
                    None => None,
                };
                let (n, k) = (w.2, w.3);
                let packed = self.pack(w, norm, n);
                let mut ops = vec![of(self, 0), packed];
                if *residual {
                    ops.push(of(self, operands.len() - 1));
                }
                ops.push(out_operand);
                let panels = n.div_ceil(crate::kernels::gemm::panel_width(self.vector));
                let rows = if last_rows {
                    vec![Extent::Batch, Extent::Const(1)]
                } else {
                    rows_of(x_ty)
                };
                let grid = Grid {
                    rows,
                    row_chunk: 64,
                    cols: panels.div_ceil(4) as u64,
                };
                self.step(
                    KernelSpec::Linear {
                        k,
                        n,
                        norm_eps: *norm_eps,
                        residual: *residual,
                        last_rows,
                        bf16: self.bf16_weights,
                    },
                    ops,
                    grid,
                    None,
                );
            }
            Op::SwiGlu { norm_eps } => {
                let x_ty = &self.graph.node(operands[0]).ty;
                let (wg, wu) = (self.matrix(operands[1])?, self.matrix(operands[2])?);
                let norm = match norm_eps {
                    Some(_) => Some(self.weight_index(operands[3])?),
                    None => None,
                };
                let (n, k) = (wg.2, wg.3);
                let (pg, pu) = (self.pack(wg, norm, n), self.pack(wu, norm, n));
                let panels = n.div_ceil(crate::kernels::gemm::panel_width(self.vector));
                let grid = Grid {
                    rows: rows_of(x_ty),
                    row_chunk: 64,
                    cols: panels.div_ceil(4) as u64,
                };
                let ops = vec![of(self, 0), pg, pu, out_operand];
                self.step(
                    KernelSpec::SwiGlu {
                        k,
                        n,
                        norm_eps: *norm_eps,
                        bf16: self.bf16_weights,
                    },
                    ops,
                    grid,
                    None,
                );
            }
            Op::HeadsProj {
                heads,
                head_dim,
                norm_eps,
                bias,
                qk_norm,
                rope,
            } => {
                let x_ty = &self.graph.node(operands[0]).ty;
                let w = self.matrix(operands[1])?;
                let norm = match norm_eps {
                    Some(_) => Some(self.weight_index(operands[2])?),
                    None => None,
                };
                let k = w.3;
                let packed = self.pack(w, norm, *head_dim as usize);
                let mut ops = vec![of(self, 0), packed];
                // The bias and the QK-norm's scales, as they are.
                let first = 2 + usize::from(norm_eps.is_some());
                let extra = usize::from(*bias) + usize::from(qk_norm.is_some());
                ops.extend((first..first + extra).map(|i| of(self, i)));
                if let Some(rope) = rope {
                    let table = (*rope, *head_dim as usize);
                    let tables = &mut self.plan.rope_tables;
                    let table = tables.iter().position(|t| *t == table).unwrap_or_else(|| {
                        tables.push(table);
                        tables.len() - 1
                    });
                    ops.extend([Operand::RopeCos(table), Operand::RopeSin(table)]);
                }
                ops.push(out_operand);
                let grid = Grid {
                    rows: rows_of(x_ty),
                    row_chunk: 32,
                    cols: *heads,
                };
                let spec = KernelSpec::HeadsProj {
                    k,
                    heads: *heads as usize,
                    head_dim: *head_dim as usize,
                    norm_eps: *norm_eps,
                    epilogue: crate::kernels::gemm::HeadsEpilogue {
                        bias: *bias,
                        qk_norm: *qk_norm,
                        rope: rope.is_some(),
                    },
                    bf16: self.bf16_weights,
                };
                self.step(spec, ops, grid, None);
            }
            Op::MatMul if self.matmul_plan(id).is_some() => {
                let (shape, a, b) = self.matmul_plan(id).expect("checked");
                let nr = 2 * self.vector as u64;
                let blocks = |d: Dim, size: u64| match d {
                    Dim::Const(n) => Extent::Const(n.div_ceil(size)),
                    _ => Extent::SeqBlocks(size),
                };
                let mut rows: Vec<Extent> = shape.batch.iter().map(|d| extent(*d)).collect();
                rows.push(blocks(shape.m, crate::kernels::matmul::BLOCK_ROWS as u64));
                rows.push(blocks(
                    shape.n,
                    nr * crate::kernels::matmul::BLOCK_PANELS as u64,
                ));
                let ops = vec![self.operand[&a], self.operand[&b], out_operand];
                let grid = Grid {
                    rows,
                    row_chunk: 1,
                    cols: 1,
                };
                self.step(KernelSpec::MatMul(shape), ops, grid, None);
            }
            Op::CeLse | Op::CeLoss | Op::CeGrad { .. } => {
                let h = &self.graph.node(operands[0]).ty;
                let w = &self.graph.node(operands[1]).ty;
                let (k, vocab) = match (w.shape[1].as_const(), w.shape[0].as_const()) {
                    (Some(k), Some(v)) if h.shape[..2] == [Dim::B, Dim::T] => {
                        (k as usize, v as usize)
                    }
                    _ => {
                        return Err(CodegenError::Unsupported(format!(
                            "cross-entropy needs h: [B, T, K] and a constant weight, found {h} and {w}"
                        )));
                    }
                };
                let ops: Vec<Operand> = (0..operands.len())
                    .map(|i| of(self, i))
                    .chain([out_operand])
                    .collect();
                let grid = if matches!(
                    node.op,
                    Op::CeGrad {
                        wrt: zebra_ir::op::CeGradOf::Weight
                    }
                ) {
                    Grid {
                        rows: vec![Extent::Const(vocab as u64)],
                        row_chunk: 1,
                        cols: 1,
                    }
                } else {
                    Grid {
                        rows: vec![Extent::Batch, Extent::Seq],
                        row_chunk: crate::kernels::loss::ROWS as u64,
                        cols: 1,
                    }
                };
                let spec = KernelSpec::CrossEntropy {
                    op: node.op.clone(),
                    k,
                    vocab,
                };
                self.step(spec, ops, grid, None);
            }
            Op::EmbeddingGrad { vocab } => {
                let ids = &self.graph.node(operands[0]).ty;
                if ids.shape != [Dim::B, Dim::T] {
                    return Err(CodegenError::Unsupported(format!(
                        "embedding_grad needs ids: [B, T], found {ids}"
                    )));
                }
                let d = node.ty.shape[1].as_const().unwrap_or(1) as usize;
                let ops = vec![of(self, 0), of(self, 1), out_operand];
                let grid = Grid {
                    rows: vec![Extent::Const(*vocab)],
                    row_chunk: crate::kernels::loss::VOCAB_ROWS as u64,
                    cols: 1,
                };
                let spec = KernelSpec::EmbeddingGrad {
                    vocab: *vocab as usize,
                    d,
                };
                self.step(spec, ops, grid, None);
            }
            op if crate::kernels::elementwise::supports(
                op,
                &operands
                    .iter()
                    .map(|o| self.graph.node(*o).ty.clone())
                    .collect::<Vec<_>>(),
                &node.ty,
                self.vector,
            ) =>
            {
                let types: Vec<TensorType> = operands
                    .iter()
                    .map(|o| self.graph.node(*o).ty.clone())
                    .collect();
                let ops: Vec<Operand> = (0..operands.len())
                    .map(|i| of(self, i))
                    .chain([out_operand])
                    .collect();
                let grid = if crate::kernels::elementwise::is_row_kernel(op) {
                    let x = &types[0];
                    Grid {
                        rows: x.shape[..x.rank() - 1].iter().map(|d| extent(*d)).collect(),
                        row_chunk: crate::kernels::elementwise::ROWS,
                        cols: 1,
                    }
                } else {
                    Grid {
                        rows: node.ty.shape.iter().map(|d| extent(*d)).collect(),
                        row_chunk: crate::kernels::elementwise::CHUNK,
                        cols: 1,
                    }
                };
                self.step(
                    KernelSpec::Elementwise {
                        op: op.clone(),
                        operands: types,
                        out: node.ty.clone(),
                    },
                    ops,
                    grid,
                    None,
                );
            }
            op if generic::supports(op) => {
                let types: Vec<TensorType> = operands
                    .iter()
                    .map(|o| self.graph.node(*o).ty.clone())
                    .collect();
                let ops: Vec<Operand> = (0..operands.len())
                    .map(|i| of(self, i))
                    .chain([out_operand])
                    .collect();
                let grid = Grid {
                    rows: node.ty.shape.iter().map(|d| extent(*d)).collect(),
                    row_chunk: generic::CHUNK,
                    cols: 1,
                };
                self.step(
                    KernelSpec::Generic {
                        op: op.clone(),
                        operands: types,
                        out: node.ty.clone(),
                    },
                    ops,
                    grid,
                    None,
                );
            }
            other => {
                return Err(CodegenError::Unsupported(format!(
                    "no CPU kernel for `{}`",
                    other.name()
                )));
            }
        }
        self.defined[out] = self.plan.steps.len() - 1;
        Ok(())
    }

    /// How a `matmul` node runs on the fast kernel: its shape, and the nodes it reads its two
    /// operands from (through a transpose of their last two axes, when that is what they
    /// are). `None` when only the generic kernel handles it (partial batch broadcasts).
    fn matmul_plan(&self, id: NodeId) -> Option<(MatMulShape, NodeId, NodeId)> {
        let out = &self.graph.node(id).ty;
        let operands = self.graph.operands(id);
        let rank = out.rank();
        let batch: Vec<Dim> = out.shape[..rank - 2].to_vec();
        let through = |x: NodeId| -> (NodeId, bool) {
            if let Op::Transpose { perm } = &self.graph.node(x).op {
                let r = perm.len();
                let swaps_last = r >= 2
                    && perm[r - 2] == r - 1
                    && perm[r - 1] == r - 2
                    && perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p);
                if swaps_last {
                    return (self.graph.operands(x)[0], true);
                }
            }
            (x, false)
        };
        let batched = |ty: &TensorType| -> Option<bool> {
            let own = &ty.shape[..ty.rank() - 2];
            if own == batch.as_slice() {
                Some(true)
            } else if own.iter().all(|d| *d == Dim::ONE) {
                Some(false)
            } else {
                None
            }
        };
        let (a_ty, b_ty) = (
            &self.graph.node(operands[0]).ty,
            &self.graph.node(operands[1]).ty,
        );
        let shape = MatMulShape {
            m: out.shape[rank - 2],
            n: out.shape[rank - 1],
            k: a_ty.shape[a_ty.rank() - 1],
            a_batched: batched(a_ty)?,
            b_batched: batched(b_ty)?,
            a_t: through(operands[0]).1,
            b_t: through(operands[1]).1,
            batch,
        };
        let blockable = |d: Dim| matches!(d, Dim::Const(_) | Dim::Sym(Sym::Seq));
        if !(blockable(shape.m) && blockable(shape.n))
            || shape.batch.iter().any(|d| matches!(d, Dim::Blocks(..)))
        {
            return None;
        }
        Some((shape, through(operands[0]).0, through(operands[1]).0))
    }

    /// Scratch memory for a step, zeroed at first use.
    fn workspace(&mut self, shape: Vec<Extent>) -> Operand {
        self.plan.workspaces.push((shape, ElemType::F32));
        Operand::Workspace(self.plan.workspaces.len() - 1)
    }

    /// Packs keys and values for the attention kernels (`pack_kv`): the first operand in key
    /// panels, the second in value panels. Returns the two workspaces.
    fn pack_kv(
        &mut self,
        kernel: &AttentionKernel,
        first: Operand,
        second: Operand,
    ) -> [Operand; 2] {
        let bk = kernel.block_k;
        let shape = vec![
            Extent::Batch,
            Extent::Const(kernel.kv_heads),
            Extent::SeqBlocks(bk),
            Extent::Const(kernel.head_dim * bk),
        ];
        let a = self.workspace(shape.clone());
        let b = self.workspace(shape);
        let grid = Grid {
            rows: vec![Extent::Batch, Extent::SeqBlocks(bk)],
            row_chunk: 1,
            cols: kernel.kv_heads,
        };
        let spec = KernelSpec::PackKv {
            head_dim: kernel.head_dim as usize,
            block_q: kernel.block_q as usize,
            block_k: bk as usize,
        };
        self.step(spec, vec![first, second, a, b], grid, None);
        [a, b]
    }

    /// The schedule of a kernel's mask (one per distinct mask and tiling), and the side
    /// inputs' operands.
    fn schedule(
        &mut self,
        kernel: &AttentionKernel,
        operands: &[NodeId],
    ) -> Result<(usize, Vec<Operand>), CodegenError> {
        let mut sides = Vec::new();
        let mut side_operands = Vec::new();
        for (i, name) in kernel.sides.iter().enumerate() {
            let side = self.operand[&operands[3 + 3 * i]];
            let Operand::Input(input) = side else {
                return Err(CodegenError::Unsupported(format!(
                    "side input `{name}` must be a graph input"
                )));
            };
            sides.push((name.clone(), input));
            side_operands.push(side);
        }
        let spec = ScheduleSpec {
            mask: kernel.mask.to_string(),
            heads: kernel.heads as usize,
            block_q: kernel.block_q as usize,
            block_k: kernel.block_k as usize,
            sides,
        };
        if let Some(id) = self.plan.schedules.iter().position(|s| *s == spec) {
            return Ok((id, side_operands));
        }
        let id = self.plan.schedules.len();
        self.plan.schedules.push(spec);
        self.plan.steps.push(Step::Schedule { id });
        Ok((id, side_operands))
    }

    /// The nodes computed together with `id`: the same attention kernel on the same operands.
    fn siblings(&self, id: NodeId, kernel: &AttentionKernel) -> Vec<NodeId> {
        let operands = self.graph.operands(id);
        let mut found: Vec<NodeId> = self
            .graph
            .users(operands[0])
            .into_iter()
            .filter(|&u| {
                self.graph
                    .node(u)
                    .op
                    .attention_kernel()
                    .is_some_and(|k| k.same_computation(kernel))
                    && self.graph.operands(u)[..kernel.arity()] == operands[..kernel.arity()]
            })
            .collect();
        found.sort();
        found
    }

    /// Gives `id` a value (defined by the step about to be pushed).
    fn define(&mut self, id: NodeId) -> (usize, Operand) {
        let ty = self.graph.node(id).ty.clone();
        let v = self.value(&ty);
        self.defined.push(usize::MAX);
        self.operand.insert(id, Operand::Value(v));
        (v, Operand::Value(v))
    }

    /// Plans `attention`, `attention_lse` and `attention_grad` nodes, each with the siblings
    /// it is computed with: the attention writes its log-sum-exp on the side, and one kernel
    /// computes both `dK` and `dV`.
    fn attention_family(
        &mut self,
        id: NodeId,
        kernel: &AttentionKernel,
    ) -> Result<(), CodegenError> {
        let operands = self.graph.operands(id);
        if self.mode != PlanMode::Forward {
            return self.cached_attention(id, kernel, &operands);
        }
        let n = kernel.arity();
        let siblings = self.siblings(id, kernel);
        let of = |p: &Planner, i: usize| p.operand[&operands[i]];
        let (q, k, v) = (of(self, 0), of(self, 1), of(self, 2));
        let (schedule, side_operands) = self.schedule(kernel, &operands)?;
        let heads_shape = |heads: u64| {
            vec![
                Extent::Batch,
                Extent::Const(heads),
                Extent::Seq,
                Extent::Const(kernel.head_dim),
            ]
        };
        let (bq, bk) = (kernel.block_q, kernel.block_k);
        let mut defined = Vec::new();
        match &self.graph.node(id).op {
            Op::Attention(_) | Op::AttentionLse(_) => {
                let find = |want: fn(&Op) -> bool| {
                    siblings
                        .iter()
                        .copied()
                        .find(|&s| want(&self.graph.node(s).op))
                };
                let forward = find(|op| matches!(op, Op::Attention(_)));
                let lse = find(|op| matches!(op, Op::AttentionLse(_)));
                let out = match forward {
                    Some(f) => {
                        let (value, operand) = self.define(f);
                        defined.push(value);
                        operand
                    }
                    None if kernel.merge_heads => self.workspace(vec![
                        Extent::Batch,
                        Extent::Seq,
                        Extent::Const(kernel.heads * kernel.head_dim),
                    ]),
                    None => self.workspace(heads_shape(kernel.heads)),
                };
                let lse_operand = lse.map(|l| {
                    let (value, operand) = self.define(l);
                    defined.push(value);
                    operand
                });
                let [kp, vp] = self.pack_kv(kernel, k, v);
                let mut ops = vec![
                    q,
                    kp,
                    vp,
                    out,
                    Operand::ScheduleRows(schedule),
                    Operand::ScheduleTiles(schedule),
                ];
                ops.extend(side_operands);
                ops.extend(lse_operand);
                let grid = Grid {
                    rows: vec![Extent::Batch, Extent::SeqBlocks(bq)],
                    row_chunk: 1,
                    cols: kernel.heads,
                };
                let spec = KernelSpec::Attention {
                    kernel: kernel.clone(),
                    lse: lse_operand.is_some(),
                };
                self.step(spec, ops, grid, Some(schedule));
            }
            Op::AttentionGrad { wrt, .. } => {
                let (o, d_o, lse) = (of(self, n), of(self, n + 1), of(self, n + 2));
                let same_inputs: Vec<NodeId> = siblings
                    .iter()
                    .copied()
                    .filter(|&s| self.graph.operands(s) == operands)
                    .collect();
                let grad_of = |p: &Planner, g: GradOf| {
                    same_inputs.iter().copied().find(|&s| {
                        matches!(&p.graph.node(s).op, Op::AttentionGrad { wrt, .. } if *wrt == g)
                    })
                };
                let [kp, _] = self.pack_kv(kernel, k, v);
                let [vt_k, kv_v] = self.pack_kv(kernel, v, k);
                if *wrt == GradOf::Q {
                    let (value, dq) = self.define(id);
                    defined.push(value);
                    let mut ops = vec![
                        q,
                        kp,
                        vt_k,
                        kv_v,
                        o,
                        d_o,
                        lse,
                        dq,
                        Operand::ScheduleRows(schedule),
                        Operand::ScheduleTiles(schedule),
                    ];
                    ops.extend(side_operands);
                    let grid = Grid {
                        rows: vec![Extent::Batch, Extent::SeqBlocks(bq)],
                        row_chunk: 1,
                        cols: kernel.heads,
                    };
                    let spec = KernelSpec::AttentionDq {
                        kernel: kernel.clone(),
                    };
                    self.step(spec, ops, grid, Some(schedule));
                } else {
                    let mut outs = Vec::new();
                    for g in [GradOf::K, GradOf::V] {
                        outs.push(match grad_of(self, g) {
                            Some(node) => {
                                let (value, operand) = self.define(node);
                                defined.push(value);
                                operand
                            }
                            None => self.workspace(heads_shape(kernel.kv_heads)),
                        });
                    }
                    let mut ops = vec![
                        q,
                        kp,
                        vt_k,
                        o,
                        d_o,
                        lse,
                        outs[0],
                        outs[1],
                        Operand::ScheduleColumns(schedule),
                        Operand::ScheduleColumnTiles(schedule),
                    ];
                    ops.extend(side_operands);
                    let grid = Grid {
                        rows: vec![Extent::Batch, Extent::SeqBlocks(bk)],
                        row_chunk: 1,
                        cols: kernel.kv_heads,
                    };
                    let spec = KernelSpec::AttentionDkv {
                        kernel: kernel.clone(),
                    };
                    self.step(spec, ops, grid, Some(schedule));
                }
            }
            other => unreachable!("`{}` is not an attention op", other.name()),
        }
        let step = self.plan.steps.len() - 1;
        for value in defined {
            self.defined[value] = step;
        }
        Ok(())
    }
}

impl Planner<'_> {
    /// Plans an attention for generation: its KV caches (from the mask: one, or one per
    /// group of KV heads that keep the same keys), and in a decode step the attention
    /// against each cache for the query heads of the KV heads it holds; prefill computes it
    /// as usual and also outputs its keys and values (once for all its caches).
    fn cached_attention(
        &mut self,
        id: NodeId,
        kernel: &AttentionKernel,
        operands: &[NodeId],
    ) -> Result<(), CodegenError> {
        let layer_index = self.graph.node(id).layer;
        let layer = || match layer_index {
            Some(i) => match self.graph.layers.get(i as usize) {
                Some(info) => format!("the attention of layer {i} ({})", info.kind),
                None => format!("the attention of layer {i}"),
            },
            None => "an attention".to_string(),
        };
        if !matches!(self.graph.node(id).op, Op::Attention(_)) {
            return Err(CodegenError::Unsupported(format!(
                "{} is a training op; generation plans forward graphs",
                self.graph.node(id).op.name()
            )));
        }
        if !kernel.sides.is_empty() {
            return Err(CodegenError::Unsupported(format!(
                "{} reads side inputs ({}); generation cannot extend them token by token",
                layer(),
                kernel.sides.join(", ")
            )));
        }
        let heads = KvPolicy::by_kv_head(
            &kernel.mask,
            kernel.heads as usize,
            kernel.kv_heads as usize,
        )
        .map_err(|e| CodegenError::Unsupported(format!("{}: {e}", layer())))?;
        let first = self.plan.caches.len();
        for held in &heads {
            let policy = held.policy;
            self.plan.caches.push(CacheSpec {
                kv_heads: held.kv_heads.len(),
                kv_heads_held: held.kv_heads.clone(),
                prefill_outputs: first,
                head_dim: kernel.head_dim as usize,
                sinks: policy.sinks as usize,
                ring: policy.ring.map(|r| r as usize),
                min_prompt: policy.min_prompt as usize,
                block: crate::kernels::decode::block_slots(self.vector),
                layer: layer_index.map(|l| l as usize),
            });
        }
        if self.mode == PlanMode::Prefill {
            self.cache_outputs
                .push((format!("cache:{first}:k"), operands[1]));
            self.cache_outputs
                .push((format!("cache:{first}:v"), operands[2]));
            let saved = std::mem::replace(&mut self.mode, PlanMode::Forward);
            let result = self.attention_family(id, kernel);
            self.mode = saved;
            return result;
        }
        let (q, k, v) = (
            self.operand[&operands[0]],
            self.operand[&operands[1]],
            self.operand[&operands[2]],
        );
        let (value, out) = self.define(id);
        // Where the GPU kernel keeps each split's share of the cache (`decode_gpu`); the
        // CPU's kernel leaves it untouched. The steps run one after the other and share it.
        let partials = self.workspace(vec![
            Extent::Batch,
            Extent::Const(crate::kernels::decode_gpu::workspace_floats_per_batch_row(
                kernel,
            )),
        ]);
        // Each step writes the query heads of its KV heads: together, all of them.
        for (cache, held) in (first..).zip(heads) {
            let ops = vec![
                q,
                k,
                v,
                Operand::CacheKeys(cache),
                Operand::CacheValues(cache),
                Operand::CachePositions(cache),
                out,
                partials,
            ];
            let grid = Grid {
                rows: vec![Extent::Batch],
                row_chunk: 1,
                cols: held.kv_heads.len() as u64,
            };
            let spec = KernelSpec::AttentionDecode {
                kernel: kernel.clone(),
                cache: held,
            };
            self.step(spec, ops, grid, None);
            if self.defined[value] == usize::MAX {
                self.defined[value] = self.plan.steps.len() - 1;
            }
        }
        Ok(())
    }
}

/// Assigns memory slots: a value takes a free slot of its element type (one whose values
/// are all dead before the step defining it), else a new one. Outputs get slots of their
/// own.
fn assign_slots(plan: &mut Plan, defined: &[usize]) {
    let n = plan.values.len();
    let mut last_use: Vec<usize> = defined.to_vec();
    for (s, step) in plan.steps.iter().enumerate() {
        if let Step::Kernel { operands, .. } = step {
            for operand in operands {
                if let Operand::Value(v) = operand {
                    last_use[*v] = last_use[*v].max(s);
                }
            }
        }
    }
    for (_, v) in &plan.outputs {
        last_use[*v] = usize::MAX;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&v| defined[v]);
    let mut slots: Vec<(ElemType, usize)> = Vec::new(); // element type, step after which it is free
    for v in order {
        let elem = plan.values[v].elem;
        let free = slots.iter().position(|(e, free_after)| {
            *e == elem && *free_after < defined[v] && *free_after != usize::MAX
        });
        let slot = match free {
            Some(s) => s,
            None => {
                slots.push((elem, 0));
                slots.len() - 1
            }
        };
        slots[slot].1 = last_use[v];
        plan.values[v].slot = slot;
    }
    plan.slots = slots.len();
}

/// Plans a graph for the CPU with `vector`-wide f32 vectors.
pub fn plan(
    graph: &Graph,
    target: &str,
    vector: usize,
    max_seq_len: usize,
    mode: PlanMode,
) -> Result<Planned, CodegenError> {
    plan_with(
        graph,
        target,
        vector,
        max_seq_len,
        mode,
        PlanOptions::default(),
    )
}

/// How a CPU plan stores what it reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// The projections' weights packed as bf16 (inference only: a training plan keeps f32
    /// weights), which halves the bytes a single token's projections read.
    pub bf16_weights: bool,
}

/// As [`plan`], with `options`.
pub fn plan_with(
    graph: &Graph,
    target: &str,
    vector: usize,
    max_seq_len: usize,
    mode: PlanMode,
    options: PlanOptions,
) -> Result<Planned, CodegenError> {
    if mode != PlanMode::Forward
        && let Some(mask) = graph
            .node_ids()
            .into_iter()
            .find(|&id| matches!(graph.node(id).op, Op::Mask { .. }))
    {
        let at = match graph.node(mask).layer {
            Some(i) => format!("layer {i}"),
            None => format!("%{}", mask.index()),
        };
        return Err(CodegenError::Unsupported(format!(
            "the attention of {at} is not fused (see the warnings of `zebra compile`); \
             generation needs every attention fused, to give it a KV cache"
        )));
    }
    if max_seq_len as i64 > crate::vexpr::MAX_SEQ_LEN {
        return Err(CodegenError::Unsupported(format!(
            "a maximum sequence length of {max_seq_len}: kernels are built for at most {}",
            crate::vexpr::MAX_SEQ_LEN
        )));
    }
    let order = graph
        .topo_order()
        .ok_or_else(|| CodegenError::Unsupported("the graph has a cycle".into()))?;
    let mut planner = Planner {
        graph,
        mode,
        cache_outputs: Vec::new(),
        vector,
        bf16_weights: options.bf16_weights,
        plan: Plan {
            format: PLAN_FORMAT,
            name: graph.name.clone(),
            target: target.to_string(),
            library: "kernels.so".into(),
            library_hash: String::new(),
            kernels: Vec::new(),
            max_seq_len,
            vocab: 0,
            inputs: Vec::new(),
            weights: Vec::new(),
            packed: Vec::new(),
            constants: Vec::new(),
            values: Vec::new(),
            slots: 0,
            workspaces: Vec::new(),
            schedules: Vec::new(),
            rope_tables: Vec::new(),
            steps: Vec::new(),
            outputs: Vec::new(),
            caches: Vec::new(),
            optimizer: None,
        },
        kernels: Vec::new(),
        symbols: HashMap::new(),
        operand: HashMap::new(),
        packs: HashMap::new(),
        defined: Vec::new(),
    };
    for id in order {
        if let Op::Embedding = graph.node(id).op {
            let table = graph.operands(id)[0];
            planner.plan.vocab = graph.node(table).ty.shape[0].as_const().unwrap_or(0) as usize;
        }
        planner.node(id)?;
    }
    let extra = std::mem::take(&mut planner.cache_outputs);
    for (name, id) in graph.outputs().iter().chain(extra.iter()) {
        match planner.operand[id] {
            Operand::Value(v) => planner.plan.outputs.push((name.clone(), v)),
            _ => {
                return Err(CodegenError::Unsupported(format!(
                    "output `{name}` must be computed by a kernel"
                )));
            }
        }
    }
    let defined = std::mem::take(&mut planner.defined);
    assign_slots(&mut planner.plan, &defined);
    planner.optimizer();
    if options.bf16_weights && planner.plan.optimizer.is_some() {
        return Err(CodegenError::Unsupported(
            "bf16 weights are for inference: a training step keeps its weights in f32".into(),
        ));
    }
    Ok(Planned {
        plan: planner.plan,
        kernels: planner.kernels,
    })
}
