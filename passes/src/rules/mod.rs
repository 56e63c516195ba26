//! Rewrite rules, one family per file. Each family's `rules()` returns its rules; `RULES.md`
//! states the identity each relies on and the analysis facts it needs.

pub mod algebra;
pub mod attention;
pub mod epilogue;
pub mod recognize;

use egg::{Applier, EGraph, Id, PatternAst, Rewrite, Subst, Symbol, Var};
use zebra_ir::TensorType;

use crate::lang::{Attr, ZAnalysis, ZNode, ZOp};

pub type ZGraph = EGraph<ZNode, ZAnalysis>;
pub type ZRewrite = Rewrite<ZNode, ZAnalysis>;

/// A pattern variable.
pub fn var(name: &str) -> Var {
    name.parse().expect("a valid pattern variable")
}

/// The attribute of an attribute leaf class.
pub fn attr(egraph: &ZGraph, id: Id) -> Option<&Attr> {
    egraph[id].data.attr.as_ref()
}

/// The type of a class.
pub fn ty(egraph: &ZGraph, id: Id) -> Option<&TensorType> {
    egraph[id].data.ty.as_ref()
}

/// The value of a scalar constant class.
pub fn constant(egraph: &ZGraph, id: Id) -> Option<f64> {
    egraph[id].data.constant
}

/// Adds an attribute leaf.
pub fn add_attr(egraph: &mut ZGraph, attr: Attr) -> Id {
    egraph.add(ZNode::leaf(ZOp::Attr(attr)))
}

/// An applier written as a function: it builds the replacement (or declines with `None`),
/// and the match is unioned with it under the rule's name.
pub struct Build<F>(pub F);

impl<F> Applier<ZNode, ZAnalysis> for Build<F>
where
    F: Fn(&mut ZGraph, Id, &Subst) -> Option<Id> + Send + Sync + 'static,
{
    fn apply_one(
        &self,
        egraph: &mut ZGraph,
        eclass: Id,
        subst: &Subst,
        _searcher_ast: Option<&PatternAst<ZNode>>,
        rule_name: Symbol,
    ) -> Vec<Id> {
        match (self.0)(egraph, eclass, subst) {
            Some(new) if egraph.union_trusted(eclass, new, rule_name) => vec![new],
            _ => vec![],
        }
    }
}

/// A rule whose right-hand side is computed: `rewrite(name, pattern, |egraph, class, subst| ...)`.
pub fn rewrite<F>(name: &str, lhs: &str, build: F) -> ZRewrite
where
    F: Fn(&mut ZGraph, Id, &Subst) -> Option<Id> + Send + Sync + 'static,
{
    let pattern: egg::Pattern<ZNode> = lhs.parse().unwrap_or_else(|e| panic!("rule {name}: {e}"));
    Rewrite::new(name, pattern, Build(build)).unwrap_or_else(|e| panic!("rule {name}: {e}"))
}

/// A rule from one pattern to another, applied when `condition` holds.
pub fn rewrite_if<C>(name: &str, lhs: &str, rhs: &str, condition: C) -> ZRewrite
where
    C: Fn(&ZGraph, Id, &Subst) -> bool + Send + Sync + 'static,
{
    let lhs: egg::Pattern<ZNode> = lhs.parse().unwrap_or_else(|e| panic!("rule {name}: {e}"));
    let rhs: egg::Pattern<ZNode> = rhs.parse().unwrap_or_else(|e| panic!("rule {name}: {e}"));
    let applier = egg::ConditionalApplier {
        condition: move |egraph: &mut ZGraph, class: Id, subst: &Subst| {
            condition(egraph, class, subst)
        },
        applier: rhs,
    };
    Rewrite::new(name, lhs, applier).unwrap_or_else(|e| panic!("rule {name}: {e}"))
}

/// A rule from one pattern to another.
pub fn rewrite_to(name: &str, lhs: &str, rhs: &str) -> ZRewrite {
    rewrite_if(name, lhs, rhs, |_, _, _| true)
}

/// Whether the class is a scalar constant.
pub fn is_scalar_constant(egraph: &ZGraph, id: Id) -> bool {
    constant(egraph, id).is_some()
}

/// Whether the attribute at `axis` is the last axis of the tensor at `x`.
pub fn is_last_axis(egraph: &ZGraph, axis: Id, x: Id) -> bool {
    match (attr(egraph, axis), ty(egraph, x)) {
        (Some(Attr::Int(a)), Some(t)) => *a as usize + 1 == t.rank(),
        _ => false,
    }
}
