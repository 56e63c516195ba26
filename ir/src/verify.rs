//! The IR verifier: acyclicity, arity, operand and result types, names and outputs.

use std::collections::HashMap;
use std::fmt;

use crate::graph::Graph;
use crate::op::Op;
use crate::print::node_names;

/// One problem the verifier found, naming the node as the text form numbers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    /// `%12`, or `None` for a problem with the graph as a whole.
    pub node: Option<String>,
    pub message: String,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(node) => write!(f, "{node}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// All the problems found in one graph.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct VerifyErrors(pub Vec<VerifyError>);

impl fmt::Display for VerifyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the graph is invalid:")?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// Checks the graph and returns every problem found.
pub fn verify(graph: &Graph) -> Result<(), VerifyErrors> {
    let mut errors = Vec::new();
    if graph.topo_order().is_none() {
        errors.push(VerifyError {
            node: None,
            message: "the graph has a cycle".into(),
        });
        return Err(VerifyErrors(errors));
    }
    let names = node_names(graph);
    let mut weight_types = HashMap::new();
    let mut input_types = HashMap::new();
    for id in graph.topo_order().unwrap_or_default() {
        let node = graph.node(id);
        let mut fail = |message: String| {
            errors.push(VerifyError {
                node: Some(names[&id].clone()),
                message,
            })
        };
        let operands = graph.operands(id);
        let types: Vec<_> = operands.iter().map(|&o| &graph.node(o).ty).collect();
        match node.op.infer(&types, &node.ty) {
            Ok(ty) if ty == node.ty => {}
            Ok(ty) => fail(format!(
                "`{}` is declared {} but computes {ty}",
                node.op.name(),
                node.ty
            )),
            Err(message) => fail(format!("`{}`: {message}", node.op.name())),
        }
        if let Some(layer) = node.layer
            && layer as usize >= graph.layers.len()
        {
            fail(format!(
                "the node is in layer {layer}, but the graph has {} layer(s)",
                graph.layers.len()
            ));
        }
        match &node.op {
            Op::Weight { name } => {
                if let Some(previous) = weight_types.insert(name.clone(), node.ty.clone())
                    && previous != node.ty
                {
                    fail(format!(
                        "weight `{name}` is declared both {previous} and {}",
                        node.ty
                    ));
                }
            }
            Op::Input { name } if input_types.insert(name.clone(), node.ty.clone()).is_some() => {
                fail(format!("input `{name}` is declared twice"));
            }
            Op::Mask { sides, .. } | Op::ScoreMod { sides, .. } => {
                let first = usize::from(matches!(node.op, Op::ScoreMod { .. }));
                for (name, &operand) in sides.iter().zip(&operands[first.min(operands.len())..]) {
                    let is_that_input =
                        matches!(&graph.node(operand).op, Op::Input { name: n } if n == name);
                    if !is_that_input {
                        fail(format!(
                            "side input `{name}` must be the graph input of that name"
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    if graph.outputs().is_empty() {
        errors.push(VerifyError {
            node: None,
            message: "the graph has no outputs".into(),
        });
    }
    for (name, id) in graph.outputs() {
        if !graph.contains(*id) {
            errors.push(VerifyError {
                node: None,
                message: format!("output `{name}` refers to a removed node"),
            });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(VerifyErrors(errors))
    }
}
