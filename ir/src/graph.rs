//! The dataflow graph: typed nodes on a petgraph graph, operand edges in order.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use petgraph::Direction;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, NodeIndexable};

use crate::op::Op;
use crate::types::TensorType;

/// A node handle.
pub type NodeId = NodeIndex<u32>;

/// A position in the DSL source a node came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Loc {
    pub line: u32,
    pub col: u32,
}

/// One operation with its result type.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
    /// The decoder layer the node belongs to, if any.
    pub layer: Option<u32>,
    /// Where in the DSL source the node's computation was written, if known.
    pub loc: Option<Loc>,
}

/// What is known about one decoder layer of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// The attention kind of the layer, as the model names it (`local`, `global(window = 8)`).
    pub kind: String,
}

/// A tensor dataflow graph. Edges go from operand to user; an edge's weight is the operand's
/// position.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    graph: StableDiGraph<Node, u32>,
    outputs: Vec<(String, NodeId)>,
    pub layers: Vec<LayerInfo>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            ..Graph::default()
        }
    }

    /// Adds a node whose type the caller states. The verifier checks it later.
    pub fn add(&mut self, node: Node, operands: &[NodeId]) -> NodeId {
        let id = self.graph.add_node(node);
        for (i, &operand) in operands.iter().enumerate() {
            self.graph.add_edge(operand, id, i as u32);
        }
        id
    }

    /// Adds a node and infers its type from its operands.
    pub fn add_inferred(
        &mut self,
        op: Op,
        operands: &[NodeId],
        layer: Option<u32>,
    ) -> Result<NodeId, String> {
        let types: Vec<&TensorType> = operands.iter().map(|&o| &self.graph[o].ty).collect();
        let placeholder = TensorType::f32(vec![]);
        let ty = op
            .infer(&types, &placeholder)
            .map_err(|e| format!("{}: {e}", op.name()))?;
        Ok(self.add(
            Node {
                op,
                ty,
                layer,
                loc: None,
            },
            operands,
        ))
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.graph[id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.graph[id]
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.graph.contains_node(id)
    }

    pub fn node_count(&self) -> usize {
        self.graph.node_count()
    }

    /// The node's operands, in order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(u32, NodeId)> = self
            .graph
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        edges.sort();
        edges.into_iter().map(|(_, n)| n).collect()
    }

    /// The nodes that read this node, each once, in id order.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut users: Vec<NodeId> = self
            .graph
            .neighbors_directed(id, Direction::Outgoing)
            .collect();
        users.sort();
        users.dedup();
        users
    }

    /// Replaces every use of `old` by `new`.
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        let edges: Vec<_> = self
            .graph
            .edges_directed(old, Direction::Outgoing)
            .map(|e| (e.id(), e.target(), *e.weight()))
            .collect();
        for (edge, target, position) in edges {
            self.graph.remove_edge(edge);
            self.graph.add_edge(new, target, position);
        }
        for (_, out) in &mut self.outputs {
            if *out == old {
                *out = new;
            }
        }
    }

    pub fn remove(&mut self, id: NodeId) -> Option<Node> {
        self.graph.remove_node(id)
    }

    /// Every node id, in creation order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.graph.node_indices().collect()
    }

    /// Forgets every output (the nodes stay).
    pub fn clear_outputs(&mut self) {
        self.outputs.clear();
    }

    pub fn add_output(&mut self, name: impl Into<String>, id: NodeId) {
        self.outputs.push((name.into(), id));
    }

    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }

    /// The input nodes, in canonical order, with their names.
    pub fn inputs(&self) -> Vec<(String, NodeId)> {
        self.topo_order()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|id| match &self.graph[id].op {
                Op::Input { name } => Some((name.clone(), id)),
                _ => None,
            })
            .collect()
    }

    /// The weight nodes, in canonical order, with their names.
    pub fn weights(&self) -> Vec<(String, NodeId)> {
        self.topo_order()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|id| match &self.graph[id].op {
                Op::Weight { name } => Some((name.clone(), id)),
                _ => None,
            })
            .collect()
    }

    /// The canonical order: topological, and among the nodes ready at each step the one
    /// created first. `None` if the graph has a cycle. The printer numbers nodes in this order,
    /// so a graph read back from its text form prints the same.
    pub fn topo_order(&self) -> Option<Vec<NodeId>> {
        let mut pending: HashMap<NodeId, usize> = HashMap::new();
        let mut ready = BinaryHeap::new();
        for id in self.graph.node_indices() {
            let n = self.graph.edges_directed(id, Direction::Incoming).count();
            if n == 0 {
                ready.push(Reverse(id));
            } else {
                pending.insert(id, n);
            }
        }
        let mut order = Vec::with_capacity(self.graph.node_count());
        while let Some(Reverse(id)) = ready.pop() {
            order.push(id);
            for edge in self.graph.edges_directed(id, Direction::Outgoing) {
                let count = pending.get_mut(&edge.target()).expect("pending user");
                *count -= 1;
                if *count == 0 {
                    ready.push(Reverse(edge.target()));
                }
            }
        }
        (order.len() == self.graph.node_count()).then_some(order)
    }

    /// Removes nodes that no output depends on. Returns how many were removed.
    pub fn remove_dead(&mut self) -> usize {
        let mut live = vec![false; self.graph.node_bound()];
        let mut stack: Vec<NodeId> = self.outputs.iter().map(|(_, n)| *n).collect();
        while let Some(id) = stack.pop() {
            if std::mem::replace(&mut live[id.index()], true) {
                continue;
            }
            stack.extend(self.graph.neighbors_directed(id, Direction::Incoming));
        }
        let dead: Vec<NodeId> = self
            .graph
            .node_indices()
            .filter(|id| !live[id.index()])
            .collect();
        for &id in &dead {
            self.graph.remove_node(id);
        }
        dead.len()
    }

    /// The underlying petgraph graph, for algorithms that want it.
    pub fn petgraph(&self) -> &StableDiGraph<Node, u32> {
        &self.graph
    }
}
