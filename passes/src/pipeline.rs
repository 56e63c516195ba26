//! The optimizer pipeline: one explicit list of stages, each timed, with the IR verified
//! after the stages that produce IR.
//!
//! ```text
//! share        cut the graph into templates; equal layers share one
//! algebra      layout chains and scales folded                        (egg)
//! recognize    softmax, Q K^T, scores, repeat_kv, RMSNorm, linear named (egg)
//! attention    softmax(mask(score(scale Q K^T))) V fused, tiles chosen (egg)
//! epilogue     norms, residuals, SwiGLU, heads and RoPE fused           (egg)
//! extract      the cheapest graph under the target's cost model
//! instantiate  the optimized templates copied back for every segment
//! ```

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use egg::Id;
use zebra_ir::{Graph, NodeId, VerifyErrors, verify};

use crate::saturate::{self, Limits, Saturation, StageReport};
use crate::share::{self, Template};
use crate::target::Target;
use crate::tiles::TileTable;

/// How to optimize.
#[derive(Clone, Debug)]
pub struct Options {
    pub target: Target,
    pub limits: Limits,
    /// Keep what is needed to explain which rules produced each node (slower).
    pub explain: bool,
    /// Also extract the IR after every e-graph stage, for `--print-after`.
    pub keep_stages: bool,
    /// Tile sizes chosen per attention (from the tuning database), over the target's.
    pub tiles: TileTable,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            target: Target::Cpu,
            limits: Limits::default(),
            explain: false,
            keep_stages: false,
            tiles: TileTable::default(),
        }
    }
}

/// The names of the stages whose IR can be printed, in order.
pub const STAGES: [&str; 6] = [
    "lower",
    "algebra",
    "recognize",
    "attention",
    "epilogue",
    "opt",
];

#[derive(Debug, thiserror::Error)]
pub enum OptimizeError {
    #[error("the input graph is invalid: {0}")]
    Input(VerifyErrors),
    #[error("internal error: the optimized graph is invalid (stage `{stage}`): {errors}")]
    Output { stage: String, errors: VerifyErrors },
}

/// The optimized graph and what it took.
pub struct Optimized {
    pub graph: Graph,
    /// Time per stage, in pipeline order.
    pub timings: Vec<(String, Duration)>,
    /// The IR after each e-graph stage (when `keep_stages`).
    pub stages: Vec<(String, Graph)>,
    /// Per distinct template: its place and what each rule stage did.
    pub reports: Vec<(String, Vec<StageReport>)>,
    /// How many segments the graph has, and how many distinct templates were optimized.
    pub segments: usize,
    pub distinct: usize,
    explain: Option<Explain>,
}

struct Explain {
    templates: Vec<Template>,
    /// The saturated e-graph of each distinct template, by template index.
    saturations: HashMap<usize, Saturation>,
    /// For each node of the optimized graph: its template and e-class.
    provenance: HashMap<NodeId, (usize, Id)>,
    target: Target,
}

/// Why a node of the optimized graph is what it is.
pub struct Explanation {
    /// The rules of egg's proof that the lowered node equals the optimized one, in order.
    /// Rules that build a node from parts found deeper in the e-graph (`fuse-attention`)
    /// appear as one step.
    pub proof: Vec<String>,
    /// The segment the node belongs to (`Layer(3)`) and, per stage, how often each rule
    /// fired while optimizing that segment's template.
    pub segment: String,
    pub fired: Vec<(&'static str, BTreeMap<String, usize>)>,
}

impl Optimized {
    /// Explains a node of the optimized graph. `None` without `Options::explain`, or for a
    /// node that is not in any template.
    pub fn explain(&mut self, node: NodeId) -> Option<Explanation> {
        let explain = self.explain.as_mut()?;
        let &(template, class) = explain.provenance.get(&node)?;
        let saturation = explain.saturations.get_mut(&template)?;
        let original = &explain.templates[template].graph;
        let class = saturation.egraph.find(class);
        let origin = saturation
            .classes
            .iter()
            .filter(|(_, c)| saturation.egraph.find(**c) == class)
            .map(|(n, _)| *n)
            .max();
        let proof = match origin {
            Some(origin) => saturate::explain(saturation, original, origin, class, explain.target),
            None => Vec::new(),
        };
        Some(Explanation {
            proof,
            segment: format!("{:?}", explain.templates[template].place),
            fired: saturation
                .reports
                .iter()
                .map(|r| (r.name, r.applied.clone()))
                .collect(),
        })
    }
}

fn timed<T>(timings: &mut Vec<(String, Duration)>, name: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let value = f();
    timings.push((name.to_string(), start.elapsed()));
    value
}

/// Optimizes a graph for a target.
pub fn optimize(graph: &Graph, options: &Options) -> Result<Optimized, OptimizeError> {
    verify(graph).map_err(OptimizeError::Input)?;
    let mut timings = Vec::new();
    let stages = saturate::stages(options.target, &options.tiles);

    // Segments and their distinct templates.
    let (templates, distinct_of) = timed(&mut timings, "share", || {
        let templates = share::templates(graph);
        let mut first: HashMap<&str, usize> = HashMap::new();
        let distinct_of: Vec<usize> = templates
            .iter()
            .enumerate()
            .map(|(i, t)| *first.entry(t.signature.as_str()).or_insert(i))
            .collect();
        (templates, distinct_of)
    });
    let distinct: Vec<usize> = {
        let mut d: Vec<usize> = distinct_of.clone();
        d.sort_unstable();
        d.dedup();
        d
    };

    // Saturation, stage by stage, of each distinct template.
    let mut saturations: HashMap<usize, Saturation> = distinct
        .iter()
        .map(|&i| (i, saturate::load(&templates[i].graph, options.explain)))
        .collect();
    let mut stage_graphs: Vec<(String, Graph)> = Vec::new();
    if options.keep_stages {
        stage_graphs.push(("lower".into(), graph.clone()));
    }
    for stage in &stages {
        timed(&mut timings, stage.name, || {
            for &i in &distinct {
                saturate::run(
                    saturations.get_mut(&i).expect("loaded"),
                    stage,
                    options.limits,
                );
            }
        });
        if options.keep_stages {
            let extracted = extract_all(&templates, &distinct, &saturations, options.target);
            let assembled = assemble(graph, &templates, &distinct_of, &extracted.graphs);
            stage_graphs.push((stage.name.to_string(), assembled.0));
        }
    }

    let extracted = timed(&mut timings, "extract", || {
        extract_all(&templates, &distinct, &saturations, options.target)
    });
    let (mut optimized, segment_maps) = timed(&mut timings, "instantiate", || {
        assemble(graph, &templates, &distinct_of, &extracted.graphs)
    });
    timed(&mut timings, "verify", || verify(&optimized)).map_err(|errors| {
        OptimizeError::Output {
            stage: "opt".into(),
            errors,
        }
    })?;
    optimized.remove_dead();
    if options.keep_stages {
        stage_graphs.push(("opt".into(), optimized.clone()));
    }
    let reports = distinct
        .iter()
        .map(|&i| {
            (
                format!("{:?}", templates[i].place),
                saturations[&i].reports.clone(),
            )
        })
        .collect();
    let explain = options.explain.then(|| {
        let mut provenance = HashMap::new();
        for (segment, map) in segment_maps.iter().enumerate() {
            let template = distinct_of[segment];
            for (template_node, new_node) in map {
                if let Some(&class) = extracted.origins[&template].get(template_node) {
                    provenance.insert(*new_node, (template, class));
                }
            }
        }
        Explain {
            templates,
            saturations,
            provenance,
            target: options.target,
        }
    });
    Ok(Optimized {
        graph: optimized,
        timings,
        stages: stage_graphs,
        reports,
        segments: distinct_of.len(),
        distinct: distinct.len(),
        explain,
    })
}

struct Extracted {
    /// The optimized graph of each distinct template, by template index.
    graphs: HashMap<usize, Graph>,
    /// For each optimized template node, its e-class.
    origins: HashMap<usize, HashMap<NodeId, Id>>,
}

fn extract_all(
    templates: &[Template],
    distinct: &[usize],
    saturations: &HashMap<usize, Saturation>,
    target: Target,
) -> Extracted {
    let mut graphs = HashMap::new();
    let mut origins = HashMap::new();
    for &i in distinct {
        let (graph, origin) = saturate::extract(&saturations[&i], &templates[i].graph, target);
        graphs.insert(i, graph);
        origins.insert(i, origin);
    }
    Extracted { graphs, origins }
}

/// Builds the full graph from the optimized templates. Also returns, per segment, which
/// template node became which new node (for explanations).
fn assemble(
    original: &Graph,
    templates: &[Template],
    distinct_of: &[usize],
    optimized: &HashMap<usize, Graph>,
) -> (Graph, Vec<HashMap<NodeId, NodeId>>) {
    let mut full = Graph::new(original.name.clone());
    full.layers = original.layers.clone();
    let mut value_of: HashMap<NodeId, NodeId> = HashMap::new();
    let mut shared: HashMap<String, NodeId> = HashMap::new();
    let mut segment_maps = Vec::new();
    for (segment, template) in templates.iter().enumerate() {
        let graph = &optimized[&distinct_of[segment]];
        let externals: Vec<NodeId> = template.externals.iter().map(|e| value_of[e]).collect();
        let map = share::instantiate(&mut full, graph, template.place, &externals, &mut shared);
        for (original_node, (_, template_node)) in template.outputs.iter().zip(graph.outputs()) {
            value_of.insert(*original_node, map[template_node]);
        }
        segment_maps.push(map);
    }
    for (name, id) in original.outputs() {
        full.add_output(name.clone(), value_of[id]);
    }
    (full, segment_maps)
}
