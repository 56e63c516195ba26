//! From an optimized graph to an execution plan: one or more kernel steps per node, packed
//! weights for the projections, tile schedules and RoPE tables the runtime computes, and
//! memory slots shared by values whose lifetimes do not overlap.

use std::collections::HashMap;

use zebra_ir::op::{AttentionKernel, Op};
use zebra_ir::types::{DType, Dim, Sym, TensorType};
use zebra_ir::{Graph, NodeId};
use zebra_runtime::plan::{
    ElemType, Extent, Grid, InputSpec, KernelInfo, Operand, PLAN_FORMAT, PackSpec, Plan,
    ScheduleSpec, Step, ValueSpec, WeightSpec,
};

use crate::CodegenError;
use crate::kernels::{KernelSpec, generic};

/// A plan with the kernels it calls, in the order of `plan.kernels`.
pub struct Planned {
    pub plan: Plan,
    pub kernels: Vec<KernelSpec>,
}

fn extent(dim: Dim) -> Extent {
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
    vector: usize,
    plan: Plan,
    kernels: Vec<KernelSpec>,
    symbols: HashMap<String, usize>,
    operand: HashMap<NodeId, Operand>,
    packs: HashMap<(usize, Option<usize>, usize), usize>,
    ropes: HashMap<(u64, usize), usize>,
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
        });
        self.kernels.push(spec);
        self.symbols.insert(symbol, i);
        i
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

    fn pack(&mut self, weight: usize, norm: Option<usize>, group: usize) -> Operand {
        let key = (weight, norm, group);
        if let Some(&p) = self.packs.get(&key) {
            return Operand::Packed(p);
        }
        let shape = &self.plan.weights[weight].shape;
        let spec = PackSpec {
            weight,
            norm,
            n: shape[0],
            k: shape[1],
            group,
            nr: crate::kernels::gemm::panel_width(self.vector),
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
                .all(|u| matches!(self.graph.node(*u).op, Op::Attention(_)))
        {
            return Ok(());
        }
        let out = self.value(&node.ty);
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
                let w = self.weight_index(operands[1])?;
                let norm = match norm_eps {
                    Some(_) => Some(self.weight_index(operands[2])?),
                    None => None,
                };
                let (n, k) = (self.plan.weights[w].shape[0], self.plan.weights[w].shape[1]);
                let packed = self.pack(w, norm, n);
                let mut ops = vec![of(self, 0), packed];
                if *residual {
                    ops.push(of(self, operands.len() - 1));
                }
                ops.push(out_operand);
                let panels = n.div_ceil(crate::kernels::gemm::panel_width(self.vector));
                let grid = Grid {
                    rows: rows_of(x_ty),
                    row_chunk: 64,
                    cols: panels.div_ceil(4) as u64,
                };
                self.step(
                    KernelSpec::Linear {
                        k,
                        n,
                        norm_eps: *norm_eps,
                        residual: *residual,
                    },
                    ops,
                    grid,
                    None,
                );
            }
            Op::SwiGlu { norm_eps } => {
                let x_ty = &self.graph.node(operands[0]).ty;
                let (wg, wu) = (
                    self.weight_index(operands[1])?,
                    self.weight_index(operands[2])?,
                );
                let norm = match norm_eps {
                    Some(_) => Some(self.weight_index(operands[3])?),
                    None => None,
                };
                let (n, k) = (
                    self.plan.weights[wg].shape[0],
                    self.plan.weights[wg].shape[1],
                );
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
                rope_base,
            } => {
                let x_ty = &self.graph.node(operands[0]).ty;
                let w = self.weight_index(operands[1])?;
                let norm = match norm_eps {
                    Some(_) => Some(self.weight_index(operands[2])?),
                    None => None,
                };
                let k = self.plan.weights[w].shape[1];
                let packed = self.pack(w, norm, *head_dim as usize);
                let mut ops = vec![of(self, 0), packed];
                if let Some(base) = rope_base {
                    let key = (base.to_bits(), *head_dim as usize);
                    let table = *self.ropes.entry(key).or_insert_with(|| {
                        self.plan.rope_tables.push((*base, *head_dim as usize));
                        self.plan.rope_tables.len() - 1
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
                    rope: rope_base.is_some(),
                };
                self.step(spec, ops, grid, None);
            }
            Op::Attention(kernel) => self.attention(kernel, &operands, out_operand)?,
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

    fn attention(
        &mut self,
        kernel: &AttentionKernel,
        operands: &[NodeId],
        out: Operand,
    ) -> Result<(), CodegenError> {
        let (bq, bk) = (kernel.block_q, kernel.block_k);
        let keys = self.operand[&operands[1]];
        // Packed keys and values: per key tile, D * bk floats each.
        let packed_shape = vec![
            Extent::Batch,
            Extent::Const(kernel.kv_heads),
            Extent::SeqBlocks(bk),
            Extent::Const(kernel.head_dim * bk),
        ];
        let keys_ws = self.plan.workspaces.len();
        self.plan
            .workspaces
            .push((packed_shape.clone(), ElemType::F32));
        let values_ws = self.plan.workspaces.len();
        self.plan.workspaces.push((packed_shape, ElemType::F32));
        let pack = KernelSpec::PackKv {
            head_dim: kernel.head_dim as usize,
            block_q: bq as usize,
            block_k: bk as usize,
        };
        let grid = Grid {
            rows: vec![Extent::Batch, Extent::SeqBlocks(bk)],
            row_chunk: 1,
            cols: kernel.kv_heads,
        };
        let values = self.operand[&operands[2]];
        self.step(
            pack,
            vec![
                keys,
                values,
                Operand::Workspace(keys_ws),
                Operand::Workspace(values_ws),
            ],
            grid,
            None,
        );

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
        let schedule = self.plan.schedules.len();
        self.plan.schedules.push(ScheduleSpec {
            mask: kernel.mask.to_string(),
            heads: kernel.heads as usize,
            block_q: bq as usize,
            block_k: bk as usize,
            sides,
        });
        self.plan.steps.push(Step::Schedule { id: schedule });
        let mut ops = vec![
            self.operand[&operands[0]],
            Operand::Workspace(keys_ws),
            Operand::Workspace(values_ws),
            out,
            Operand::ScheduleRows(schedule),
            Operand::ScheduleTiles(schedule),
        ];
        ops.extend(side_operands);
        let grid = Grid {
            rows: vec![Extent::Batch, Extent::SeqBlocks(bq)],
            row_chunk: 1,
            cols: kernel.heads,
        };
        self.step(
            KernelSpec::Attention {
                kernel: kernel.clone(),
            },
            ops,
            grid,
            Some(schedule),
        );
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
) -> Result<Planned, CodegenError> {
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
        vector,
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
        },
        kernels: Vec::new(),
        symbols: HashMap::new(),
        operand: HashMap::new(),
        packs: HashMap::new(),
        ropes: HashMap::new(),
        defined: Vec::new(),
    };
    for id in order {
        if let Op::Embedding = graph.node(id).op {
            let table = graph.operands(id)[0];
            planner.plan.vocab = graph.node(table).ty.shape[0].as_const().unwrap_or(0) as usize;
        }
        planner.node(id)?;
    }
    for (name, id) in graph.outputs() {
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
    Ok(Planned {
        plan: planner.plan,
        kernels: planner.kernels,
    })
}
