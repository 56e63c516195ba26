//! The extraction cost model: the time an operation takes on the target, estimated as
//! FLOPs over peak rate plus bytes moved over bandwidth, at a nominal sequence length.
//! Recognized forms cost infinity, so extraction never picks them.

use std::collections::HashMap;

use egg::{CostFunction, Id, Language};
use zebra_ir::op::AttentionKernel;
use zebra_ir::schedule::{ScheduleInput, Support, build_heads};
use zebra_ir::types::{Bindings, DType, TensorType, resolve_shape};

use crate::lang::{Attr, ZNode, ZOp, attr_count};
use crate::rules::ZGraph;
use crate::target::Target;

/// The sequence length and batch the cost model assumes.
pub const NOMINAL: Bindings = Bindings {
    batch: 1,
    seq: 4096,
};

pub struct CostModel<'a> {
    egraph: &'a ZGraph,
    target: Target,
    /// The fraction of attention tiles visited, per mask, at the nominal length.
    densities: HashMap<String, f64>,
}

impl<'a> CostModel<'a> {
    pub fn new(egraph: &'a ZGraph, target: Target) -> CostModel<'a> {
        CostModel {
            egraph,
            target,
            densities: HashMap::new(),
        }
    }

    fn elements(ty: &TensorType) -> f64 {
        resolve_shape(&ty.shape, &NOMINAL)
            .iter()
            .map(|&d| d as f64)
            .product()
    }

    fn bytes(ty: &TensorType) -> f64 {
        let size = match ty.dtype {
            DType::F32 => 4.0,
            DType::I64 => 8.0,
            DType::Bool => 1.0,
        };
        Self::elements(ty) * size
    }

    fn density(&mut self, kernel: &AttentionKernel) -> f64 {
        let key = format!(
            "{} {} {} {}",
            kernel.mask, kernel.heads, kernel.block_q, kernel.block_k
        );
        if let Some(&d) = self.densities.get(&key) {
            return d;
        }
        let support = Support::of(&kernel.mask);
        let schedules = build_heads(&ScheduleInput {
            mask: &kernel.mask,
            support: &support,
            heads: kernel.heads as usize,
            block_q: kernel.block_q as usize,
            block_k: kernel.block_k as usize,
            seq_len: NOMINAL.seq,
            sides: None,
            batch_row: 0,
            refine: false,
        });
        // Per-head masks visit each head's own tiles: the density is their mean.
        let heads = kernel.heads as usize;
        let d = schedules.visited_by_heads(heads) as f64
            / (schedules.of(0).total_tiles() * heads).max(1) as f64;
        self.densities.insert(key, d);
        d
    }

    /// FLOPs of one operation, from its operand and result types.
    fn flops(&mut self, node: &ZNode, operands: &[&TensorType], out: &TensorType) -> f64 {
        let n_out = Self::elements(out);
        let inner = |i: usize| {
            operands
                .get(i)
                .and_then(|t| t.shape.last())
                .map_or(1.0, |d| resolve_shape(&[*d], &NOMINAL)[0] as f64)
        };
        match &node.op {
            ZOp::MatMul => 2.0 * n_out * inner(0),
            ZOp::Linear | ZOp::HeadsProj => {
                2.0 * n_out * inner(0) + Self::elements(operands[0]) * 3.0
            }
            ZOp::SwiGlu => 4.0 * n_out * inner(0) + Self::elements(operands[0]) * 3.0,
            ZOp::Attention => {
                let kernel = match self.egraph[node.children[0]].data.attr.as_ref() {
                    Some(Attr::Kernel(k)) => k.kernel.clone(),
                    _ => return f64::INFINITY,
                };
                let t = NOMINAL.seq as f64;
                let q = Self::elements(operands[0]);
                4.0 * q * t * self.density(&kernel)
            }
            _ => n_out.max(
                operands
                    .iter()
                    .map(|t| Self::elements(t))
                    .fold(0.0, f64::max),
            ),
        }
    }
}

impl CostFunction<ZNode> for CostModel<'_> {
    type Cost = f64;

    fn cost<C>(&mut self, enode: &ZNode, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        if enode.op.is_recognized_form() {
            return f64::INFINITY;
        }
        let children: f64 = enode.children.iter().map(|&c| costs(c)).sum();
        if enode.is_leaf() {
            return children;
        }
        let n_attrs = attr_count(&enode.op);
        let operands: Option<Vec<&TensorType>> = enode.children[n_attrs..]
            .iter()
            .map(|&c| self.egraph[c].data.ty.as_ref())
            .collect();
        let own = match (operands, self.node_type(enode)) {
            (Some(operands), Some(out_ty)) => {
                let bytes: f64 =
                    operands.iter().map(|t| Self::bytes(t)).sum::<f64>() + Self::bytes(&out_ty);
                let flops = self.flops(enode, &operands, &out_ty);
                flops / self.target.peak_flops() + bytes / self.target.bandwidth()
            }
            _ => f64::INFINITY,
        };
        own + children
    }
}

impl CostModel<'_> {
    /// The result type of an e-node, from the class it lives in.
    fn node_type(&self, enode: &ZNode) -> Option<TensorType> {
        let class = self.egraph.lookup(enode.clone())?;
        self.egraph[class].data.ty.clone()
    }
}
