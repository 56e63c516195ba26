//! Equality saturation of one graph: the graph goes into an e-graph, staged rule sets run
//! under node, iteration and time limits, and the cheapest equivalent graph comes out.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use egg::{Extractor, Id, Language, RecExpr, Runner};
use zebra_ir::{Graph, Node, NodeId, Op};

use crate::cost::CostModel;
use crate::lang::{Attr, ZAnalysis, ZNode, ZOp, attr_count, join_op, split_node};
use crate::rules::{self, ZGraph, ZRewrite};
use crate::target::Target;
use crate::tiles::TileTable;

/// The limits of every runner.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub nodes: usize,
    pub iterations: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            nodes: 50_000,
            iterations: 16,
            time: Duration::from_secs(2),
        }
    }
}

/// One stage of rules.
pub struct Stage {
    pub name: &'static str,
    pub rules: Vec<ZRewrite>,
}

/// The rule stages, in order. Each stage includes the algebraic cleanups, so that nodes the
/// stage creates are cleaned up too; no stage holds blanket commutativity or associativity.
pub fn stages(target: Target, tiles: &TileTable) -> Vec<Stage> {
    let with_algebra = |mut rules: Vec<ZRewrite>| {
        rules.extend(rules::algebra::rules());
        rules
    };
    vec![
        Stage {
            name: "algebra",
            rules: rules::algebra::rules(),
        },
        Stage {
            name: "recognize",
            rules: with_algebra(rules::recognize::rules()),
        },
        Stage {
            name: "attention",
            rules: with_algebra(rules::attention::rules(target, tiles.clone())),
        },
        Stage {
            name: "epilogue",
            rules: with_algebra(rules::epilogue::rules()),
        },
    ]
}

/// What one stage did.
#[derive(Clone, Debug)]
pub struct StageReport {
    pub name: &'static str,
    pub iterations: usize,
    pub nodes: usize,
    pub classes: usize,
    pub stop: String,
    /// How many times each rule fired.
    pub applied: BTreeMap<String, usize>,
    pub time: Duration,
}

/// A graph inside an e-graph.
pub struct Saturation {
    pub egraph: ZGraph,
    /// The classes of the graph's outputs, in output order.
    pub roots: Vec<Id>,
    /// The class of every node of the input graph.
    pub classes: HashMap<NodeId, Id>,
    /// The source position of the first located node of each class, kept through rewrites
    /// so that what extraction picks for a class still points at the source.
    pub locs: HashMap<Id, zebra_ir::Loc>,
    pub reports: Vec<StageReport>,
}

/// Puts a graph into a fresh e-graph.
pub fn load(graph: &Graph, explanations: bool) -> Saturation {
    let mut egraph = ZGraph::default();
    if explanations {
        egraph = egraph.with_explanations_enabled();
    }
    let mut classes = HashMap::new();
    let mut locs = HashMap::new();
    for id in graph.topo_order().unwrap_or_default() {
        let node = graph.node(id);
        let (op, attrs) = split_node(&node.op, node.loc, &node.ty);
        if matches!(op, ZOp::Input(_) | ZOp::Weight(_)) {
            egraph
                .analysis
                .leaf_types
                .insert(op.clone(), node.ty.clone());
        }
        let mut children: Vec<Id> = attrs
            .into_iter()
            .map(|a| egraph.add(ZNode::leaf(ZOp::Attr(a))))
            .collect();
        children.extend(graph.operands(id).iter().map(|o| classes[o]));
        let class = egraph.add(ZNode::new(op, children));
        classes.insert(id, class);
        if let Some(loc) = node.loc {
            locs.entry(class).or_insert(loc);
        }
    }
    egraph.rebuild();
    let roots = graph
        .outputs()
        .iter()
        .map(|(_, id)| egraph.find(classes[id]))
        .collect();
    Saturation {
        egraph,
        roots,
        classes,
        locs,
        reports: Vec::new(),
    }
}

/// Runs one stage to saturation or to its limits.
pub fn run(saturation: &mut Saturation, stage: &Stage, limits: Limits) {
    let start = Instant::now();
    let egraph = std::mem::take(&mut saturation.egraph);
    let runner = Runner::<ZNode, ZAnalysis, ()>::new(ZAnalysis::default())
        .with_egraph(egraph)
        .with_node_limit(limits.nodes)
        .with_iter_limit(limits.iterations)
        .with_time_limit(limits.time)
        .run(&stage.rules);
    let mut applied = BTreeMap::new();
    for iteration in &runner.iterations {
        for (rule, count) in &iteration.applied {
            *applied.entry(rule.to_string()).or_insert(0) += count;
        }
    }
    let stop = match &runner.stop_reason {
        Some(egg::StopReason::Saturated) => "saturated".to_string(),
        Some(egg::StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
        Some(egg::StopReason::NodeLimit(n)) => format!("node limit ({n})"),
        Some(egg::StopReason::TimeLimit(t)) => format!("time limit ({t:.2} s)"),
        Some(egg::StopReason::Other(s)) => s.clone(),
        None => "not run".to_string(),
    };
    saturation.reports.push(StageReport {
        name: stage.name,
        iterations: runner.iterations.len(),
        nodes: runner.egraph.total_number_of_nodes(),
        classes: runner.egraph.number_of_classes(),
        stop,
        applied,
        time: start.elapsed(),
    });
    saturation.egraph = runner.egraph;
    for root in &mut saturation.roots {
        *root = saturation.egraph.find(*root);
    }
}

/// The cheapest graph equivalent to the saturated one, with the input graph's name, outputs
/// and input order. Returns the graph and, for each of its nodes, the class it came from.
pub fn extract(
    saturation: &Saturation,
    original: &Graph,
    target: Target,
) -> (Graph, HashMap<NodeId, Id>) {
    let egraph = &saturation.egraph;
    let extractor = Extractor::new(egraph, CostModel::new(egraph, target));
    let locs: HashMap<Id, zebra_ir::Loc> = saturation
        .locs
        .iter()
        .map(|(c, l)| (egraph.find(*c), *l))
        .collect();
    let mut out = Graph::new(original.name.clone());
    out.layers = original.layers.clone();
    let mut built: HashMap<Id, NodeId> = HashMap::new();
    let mut origin: HashMap<NodeId, Id> = HashMap::new();
    // Inputs first, in the original order, so their canonical order is kept.
    for (name, id) in original.inputs() {
        let class = egraph.find(saturation.classes[&id]);
        let node = original.node(id).clone();
        let new = out.add(
            Node {
                op: Op::Input { name },
                ..node
            },
            &[],
        );
        built.insert(class, new);
        origin.insert(new, class);
    }
    for ((name, _), &root) in original.outputs().iter().zip(&saturation.roots) {
        let id = build(
            egraph,
            &extractor,
            &locs,
            root,
            &mut out,
            &mut built,
            &mut origin,
        );
        out.add_output(name.clone(), id);
    }
    (out, origin)
}

fn build(
    egraph: &ZGraph,
    extractor: &Extractor<CostModel, ZNode, ZAnalysis>,
    locs: &HashMap<Id, zebra_ir::Loc>,
    class: Id,
    out: &mut Graph,
    built: &mut HashMap<Id, NodeId>,
    origin: &mut HashMap<NodeId, Id>,
) -> NodeId {
    let class = egraph.find(class);
    if let Some(&id) = built.get(&class) {
        return id;
    }
    let node = extractor.find_best_node(class).clone();
    let n_attrs = attr_count(&node.op).min(node.children.len());
    let attrs: Vec<&Attr> = node.children[..n_attrs]
        .iter()
        .map(|&c| egraph[c].data.attr.as_ref().expect("an attribute leaf"))
        .collect();
    let (op, loc) = join_op(&node.op, &attrs).expect("extraction picks only IR operations");
    let operands: Vec<NodeId> = node.children[n_attrs..]
        .iter()
        .map(|&c| build(egraph, extractor, locs, c, out, built, origin))
        .collect();
    let ty = egraph[class]
        .data
        .ty
        .clone()
        .expect("every extracted value has a type");
    // Fused attention points at its mask (in its kernel); other nodes keep their class's.
    let loc = match op {
        Op::Attention(_) => None,
        _ => loc.or_else(|| locs.get(&class).copied()),
    };
    let id = out.add(
        Node {
            op,
            ty,
            layer: None,
            loc,
        },
        &operands,
    );
    built.insert(class, id);
    origin.insert(id, class);
    id
}

/// The rules that rewrote the original node in `class` into what extraction picked, in the
/// order they were applied. Needs an e-graph built with explanations.
pub fn explain(
    saturation: &mut Saturation,
    original: &Graph,
    node: NodeId,
    class: Id,
    target: Target,
) -> Vec<String> {
    let Some(from) = original_expr(original, node) else {
        return vec![];
    };
    let to = {
        let extractor = Extractor::new(
            &saturation.egraph,
            CostModel::new(&saturation.egraph, target),
        );
        extractor.find_best(class).1
    };
    let mut explanation = saturation.egraph.explain_equivalence(&from, &to);
    let mut rules = Vec::new();
    for term in explanation.make_flat_explanation() {
        collect_rules(term, &mut rules);
    }
    rules.dedup();
    rules
}

fn collect_rules(term: &egg::FlatTerm<ZNode>, rules: &mut Vec<String>) {
    for rule in [term.forward_rule, term.backward_rule]
        .into_iter()
        .flatten()
    {
        rules.push(rule.to_string());
    }
    for child in &term.children {
        collect_rules(child, rules);
    }
}

/// The original graph's subterm at `node` as an expression.
fn original_expr(graph: &Graph, node: NodeId) -> Option<RecExpr<ZNode>> {
    let mut expr = RecExpr::default();
    let mut memo: HashMap<NodeId, Id> = HashMap::new();
    fn go(
        graph: &Graph,
        id: NodeId,
        expr: &mut RecExpr<ZNode>,
        memo: &mut HashMap<NodeId, Id>,
    ) -> Id {
        if let Some(&e) = memo.get(&id) {
            return e;
        }
        let n = graph.node(id);
        let (op, attrs) = split_node(&n.op, n.loc, &n.ty);
        let mut children: Vec<Id> = attrs
            .into_iter()
            .map(|a| expr.add(ZNode::leaf(ZOp::Attr(a))))
            .collect();
        children.extend(
            graph
                .operands(id)
                .into_iter()
                .map(|o| go(graph, o, expr, memo)),
        );
        let e = expr.add(ZNode::new(op, children));
        memo.insert(id, e);
        e
    }
    go(graph, node, &mut expr, &mut memo);
    (!expr.as_ref().is_empty()
        && expr
            .as_ref()
            .iter()
            .all(|n| !n.is_leaf() || !n.op.is_recognized_form()))
    .then_some(expr)
}
