//! Layer sharing: the graph is cut into segments (the prologue before the first layer, each
//! decoder layer, the epilogue after the last), each segment becomes a *template* with its
//! outside values as inputs and its layer's weight names made generic, and segments with
//! equal templates share one optimization. A Zebra model of any depth is optimized as three
//! or four small graphs.

use std::collections::HashMap;

use zebra_ir::{Graph, Node, NodeId, Op};

/// Where a segment sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Place {
    Prologue,
    Layer(u32),
    Epilogue,
}

/// A segment of the graph as a standalone graph.
pub struct Template {
    pub place: Place,
    /// The segment with inputs `ext:0, ext:1, ...` for its outside values and outputs
    /// `out:0, out:1, ...` for the values used outside it.
    pub graph: Graph,
    /// The original nodes the `ext:i` inputs stand for.
    pub externals: Vec<NodeId>,
    /// The original nodes the `out:i` outputs stand for.
    pub outputs: Vec<NodeId>,
    /// Equal signatures mean equal templates.
    pub signature: String,
}

/// The placeholder for `model.layers.{i}` in template weight names.
pub const LAYER: &str = "{layer}";

fn layer_prefix(layer: u32) -> String {
    format!("model.layers.{layer}.")
}

/// Cuts the graph into templates, in execution order. Graphs whose layers do not run in
/// order come back as one template.
pub fn templates(graph: &Graph) -> Vec<Template> {
    let order = graph.topo_order().unwrap_or_default();
    let mut place: HashMap<NodeId, Place> = HashMap::new();
    for &id in &order {
        let node = graph.node(id);
        let p = match node.layer {
            Some(layer) => Place::Layer(layer),
            None if graph
                .operands(id)
                .iter()
                .any(|o| place[o] != Place::Prologue) =>
            {
                Place::Epilogue
            }
            None => Place::Prologue,
        };
        place.insert(id, p);
    }
    // A value outside the layers that depends on none of them (a weight, a constant, a
    // transposed weight) goes with its users when they are all in the epilogue, so that the
    // epilogue's rules see it.
    let outputs: Vec<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    for &id in order.iter().rev() {
        if place[&id] == Place::Prologue && !outputs.contains(&id) {
            let users = graph.users(id);
            if !users.is_empty() && users.iter().all(|u| place[u] == Place::Epilogue) {
                place.insert(id, Place::Epilogue);
            }
        }
    }
    let in_order = order
        .iter()
        .all(|&id| graph.operands(id).iter().all(|o| place[o] <= place[&id]));
    if !in_order {
        for p in place.values_mut() {
            *p = Place::Prologue;
        }
    }
    let mut places: Vec<Place> = place.values().copied().collect();
    places.sort();
    places.dedup();
    places
        .into_iter()
        .map(|p| {
            let nodes: Vec<NodeId> = order.iter().copied().filter(|id| place[id] == p).collect();
            template(graph, p, &nodes)
        })
        .collect()
}

fn template(graph: &Graph, place: Place, nodes: &[NodeId]) -> Template {
    let inside: std::collections::HashSet<NodeId> = nodes.iter().copied().collect();
    let mut t = Graph::new("template");
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    let mut externals: Vec<NodeId> = Vec::new();
    for &id in nodes {
        let node = graph.node(id);
        let mut operands = Vec::new();
        for operand in graph.operands(id) {
            if let Some(&mapped) = map.get(&operand) {
                operands.push(mapped);
                continue;
            }
            let index = externals.len();
            externals.push(operand);
            let ext = t.add(
                Node {
                    op: Op::Input {
                        name: format!("ext:{index}"),
                    },
                    ty: graph.node(operand).ty.clone(),
                    layer: None,
                    loc: None,
                },
                &[],
            );
            map.insert(operand, ext);
            operands.push(ext);
        }
        let op = match (&node.op, place) {
            (Op::Weight { name }, Place::Layer(layer)) => {
                match name.strip_prefix(&layer_prefix(layer)) {
                    Some(role) => Op::Weight {
                        name: format!("{LAYER}.{role}"),
                    },
                    None => node.op.clone(),
                }
            }
            _ => node.op.clone(),
        };
        let new = t.add(
            Node {
                op,
                ty: node.ty.clone(),
                layer: None,
                loc: node.loc,
            },
            &operands,
        );
        map.insert(id, new);
    }
    let graph_outputs: Vec<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    let mut outputs = Vec::new();
    for &id in nodes {
        let used_outside =
            graph.users(id).iter().any(|u| !inside.contains(u)) || graph_outputs.contains(&id);
        if used_outside {
            t.add_output(format!("out:{}", outputs.len()), map[&id]);
            outputs.push(id);
        }
    }
    let signature = zebra_ir::print_graph(&t);
    Template {
        place,
        graph: t,
        externals,
        outputs,
        signature,
    }
}

/// A name for an attention kernel from a layer kind's label: `local(window = 8)` becomes
/// `local_window_8`.
pub fn kernel_name(label: &str) -> String {
    let mut name = String::new();
    for c in label.chars() {
        if c.is_ascii_alphanumeric() {
            name.push(c);
        } else if !name.ends_with('_') && !name.is_empty() {
            name.push('_');
        }
    }
    let name = name.trim_end_matches('_').to_string();
    if name.is_empty() {
        "attention".into()
    } else {
        name
    }
}

/// Copies an optimized template into the full graph for one segment: its inputs become the
/// given outside nodes, its weights get the layer's names, its attention kernels the layer
/// kind's name. Returns, for every template node, the node it became.
pub fn instantiate(
    full: &mut Graph,
    optimized: &Graph,
    place: Place,
    externals: &[NodeId],
    shared: &mut HashMap<String, NodeId>,
) -> HashMap<NodeId, NodeId> {
    let layer = match place {
        Place::Layer(l) => Some(l),
        _ => None,
    };
    let label = layer
        .and_then(|l| full.layers.get(l as usize))
        .map(|l| l.kind.clone());
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    for id in optimized.topo_order().unwrap_or_default() {
        let node = optimized.node(id);
        let operands: Vec<NodeId> = optimized.operands(id).iter().map(|o| map[o]).collect();
        let new = match &node.op {
            Op::Input { name } => match name
                .strip_prefix("ext:")
                .and_then(|i| i.parse::<usize>().ok())
            {
                Some(index) => externals[index],
                None => *shared.entry(format!("input {name}")).or_insert_with(|| {
                    full.add(
                        Node {
                            layer: None,
                            ..node.clone()
                        },
                        &[],
                    )
                }),
            },
            Op::Weight { name } => {
                let name = match layer {
                    Some(l) => name.replace(&format!("{LAYER}."), &layer_prefix(l)),
                    None => name.clone(),
                };
                *shared.entry(format!("weight {name}")).or_insert_with(|| {
                    full.add(
                        Node {
                            op: Op::Weight { name: name.clone() },
                            layer,
                            ..node.clone()
                        },
                        &[],
                    )
                })
            }
            op if op.attention_kernel().is_some() => {
                let mut kernel = op.attention_kernel().expect("checked").clone();
                // The layer kind's name; in a graph cut as one template (a training step),
                // the node's own layer's.
                let kind = label.clone().or_else(|| {
                    node.layer
                        .and_then(|l| full.layers.get(l as usize))
                        .map(|l| l.kind.clone())
                });
                kernel.name = kernel_name(kind.as_deref().unwrap_or("attention"));
                full.add(
                    Node {
                        op: op.with_attention_kernel(kernel),
                        layer,
                        ..node.clone()
                    },
                    &operands,
                )
            }
            _ => full.add(
                Node {
                    layer,
                    ..node.clone()
                },
                &operands,
            ),
        };
        map.insert(id, new);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_come_from_labels() {
        assert_eq!(kernel_name("local(window = 8)"), "local_window_8");
        assert_eq!(kernel_name("global"), "global");
        assert_eq!(kernel_name("(*)"), "attention");
    }
}
