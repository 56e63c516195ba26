//! Reads the text form that `print::print_graph` writes.

use std::collections::HashMap;

use crate::expr::Expr;
use crate::expr::parse_expr;
use crate::graph::{Graph, LayerInfo, Loc, Node, NodeId};
use crate::op::{AttentionKernel, BinaryOp, CeGradOf, CmpOp, GradOf, Op, ReduceOp, UnaryOp};
use crate::rope::{Rope, RopeScaling};
use crate::types::{DType, Dim, Shape, Sym, TensorType};

/// A syntax error in the text form, with its 1-based line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// Parses a graph from its text form. Types are taken as written; run the verifier to check
/// them.
pub fn parse_graph(text: &str) -> Result<Graph, ParseError> {
    parse_graph_lines(text).map(|(graph, _)| graph)
}

/// Parses a graph and returns the 1-based line of every node, for diagnostics.
pub fn parse_graph_lines(text: &str) -> Result<(Graph, HashMap<NodeId, usize>), ParseError> {
    let mut lines: HashMap<NodeId, usize> = HashMap::new();
    let mut graph = Graph::default();
    let mut names: HashMap<String, NodeId> = HashMap::new();
    let mut kernels: HashMap<String, AttentionKernel> = HashMap::new();
    let mut layer: Option<u32> = None;
    let mut state = State::Start;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let err = |message: String| ParseError { line, message };
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with("//") {
            continue;
        }
        let mut cur = Cursor::new(trimmed);
        match state {
            State::Start => {
                cur.keyword("graph").map_err(err)?;
                graph.name = cur.ident().map_err(err)?;
                cur.punct("{").map_err(err)?;
                cur.end().map_err(err)?;
                state = State::Body;
            }
            State::Done => return Err(err("text after the end of the graph".into())),
            State::Body => {
                if trimmed == "}" {
                    if layer.take().is_none() {
                        state = State::Done;
                    }
                    continue;
                }
                if cur.try_keyword("layers") {
                    cur.punct("[").map_err(err)?;
                    let kinds = cur.list("]", |c| c.string()).map_err(err)?;
                    graph.layers = kinds.into_iter().map(|kind| LayerInfo { kind }).collect();
                } else if cur.try_keyword("kernel") {
                    cur.punct("@").map_err(err)?;
                    let name = cur.ident().map_err(err)?;
                    cur.punct("=").map_err(err)?;
                    cur.keyword("attention").map_err(err)?;
                    let attrs = cur.attrs().map_err(err)?;
                    let loc = cur.loc().map_err(err)?;
                    let kernel = build_kernel(&name, &attrs, loc).map_err(err)?;
                    if kernels.insert(name.clone(), kernel).is_some() {
                        return Err(err(format!("kernel `@{name}` is defined twice")));
                    }
                } else if cur.try_keyword("layer") {
                    if layer.is_some() {
                        return Err(err("layer blocks do not nest".into()));
                    }
                    layer = Some(cur.number::<u32>().map_err(err)?);
                    cur.punct("{").map_err(err)?;
                } else if cur.try_keyword("output") {
                    let name = cur.ident().map_err(err)?;
                    cur.punct("=").map_err(err)?;
                    let value = cur.value_name().map_err(err)?;
                    let id = *names
                        .get(&value)
                        .ok_or_else(|| err(format!("`{value}` is not defined")))?;
                    graph.add_output(name, id);
                } else {
                    let (name, node, operands) =
                        node_line(&mut cur, &names, &kernels).map_err(err)?;
                    let node = Node { layer, ..node };
                    if names.contains_key(&name) {
                        return Err(err(format!("`{name}` is defined twice")));
                    }
                    let id = graph.add(node, &operands);
                    names.insert(name, id);
                    lines.insert(id, line);
                }
                cur.end().map_err(err)?;
            }
        }
    }
    if state != State::Done {
        return Err(ParseError {
            line: text.lines().count(),
            message: "the graph is not closed with `}`".into(),
        });
    }
    Ok((graph, lines))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Body,
    Done,
}

fn node_line(
    cur: &mut Cursor,
    names: &HashMap<String, NodeId>,
    kernels: &HashMap<String, AttentionKernel>,
) -> Result<(String, Node, Vec<NodeId>), String> {
    let name = cur.value_name()?;
    cur.punct("=")?;
    let op_name = cur.ident()?;
    let mut operands = Vec::new();
    if cur.try_punct("(") {
        for value in cur.list(")", |c| c.value_name())? {
            let id = names
                .get(&value)
                .ok_or_else(|| format!("`{value}` is used before it is defined"))?;
            operands.push(*id);
        }
    }
    let attrs = if cur.rest().trim_start().starts_with('{') {
        cur.attrs()?
    } else {
        HashMap::new()
    };
    cur.punct(":")?;
    let ty = cur.tensor_type()?;
    let loc = cur.loc()?;
    let op = build_op(&op_name, &attrs, kernels)?;
    Ok((
        name,
        Node {
            op,
            ty,
            layer: None,
            loc,
        },
        operands,
    ))
}

/// Typed access to the attributes of one line.
struct Attrs<'a> {
    what: &'a str,
    attrs: &'a HashMap<String, String>,
}

impl Attrs<'_> {
    fn get(&self, key: &str) -> Result<&str, String> {
        self.attrs
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| format!("`{}` needs the attribute `{key}`", self.what))
    }

    fn float(&self, key: &str) -> Result<f64, String> {
        parse_float(self.get(key)?)
    }

    fn optional_float(&self, key: &str) -> Result<Option<f64>, String> {
        self.attrs.get(key).map(|v| parse_float(v)).transpose()
    }

    /// A RoPE: its base and, if given, its quoted scaling.
    fn rope(&self, base: &str, scaling: &str) -> Result<Rope, String> {
        let scaling = match self.attrs.get(scaling) {
            None => RopeScaling::None,
            Some(_) => self.string(scaling)?.parse()?,
        };
        Ok(Rope {
            base: self.float(base)?,
            scaling,
        })
    }

    fn number(&self, key: &str) -> Result<u64, String> {
        Cursor::new(self.get(key)?).number::<u64>()
    }

    fn boolean(&self, key: &str) -> Result<bool, String> {
        match self.attrs.get(key).map(String::as_str) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(format!("`{key}` is `true` or `false`, found `{other}`")),
        }
    }

    fn string(&self, key: &str) -> Result<String, String> {
        Cursor::new(self.get(key)?).string()
    }

    fn expr(&self, key: &str) -> Result<Expr, String> {
        parse_expr(&self.string(key)?).map_err(|e| format!("in `{key}`: {e}"))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, String> {
        match self.attrs.get(key) {
            None => Ok(vec![]),
            Some(text) => {
                let mut c = Cursor::new(text);
                c.punct("[")?;
                c.list("]", |c| c.string())
            }
        }
    }
}

fn parse_float(text: &str) -> Result<f64, String> {
    match text {
        "inf" => Ok(f64::INFINITY),
        "-inf" => Ok(f64::NEG_INFINITY),
        "nan" => Ok(f64::NAN),
        _ => text.parse().map_err(|_| format!("bad number `{text}`")),
    }
}

fn build_kernel(
    name: &str,
    attrs: &HashMap<String, String>,
    loc: Option<Loc>,
) -> Result<AttentionKernel, String> {
    let a = Attrs {
        what: "kernel",
        attrs,
    };
    let kernel = AttentionKernel {
        name: name.to_string(),
        mask: a.expr("mask")?,
        score: if attrs.contains_key("score") {
            Some(a.expr("score")?)
        } else {
            None
        },
        sides: a.strings("sides")?,
        scale: a.float("scale")?,
        heads: a.number("heads")?,
        kv_heads: a.number("kv_heads")?,
        head_dim: a.number("head_dim")?,
        block_q: a.number("block_q")?,
        block_k: a.number("block_k")?,
        merge_heads: a.boolean("merge_heads")?,
        loc,
    };
    let known: Vec<&str> = crate::print::kernel_attributes(&kernel)
        .iter()
        .map(|(k, _)| *k)
        .collect();
    if let Some(extra) = attrs.keys().filter(|k| !known.contains(&k.as_str())).min() {
        return Err(format!("a kernel has no attribute `{extra}`"));
    }
    Ok(kernel)
}

fn build_op(
    name: &str,
    attrs: &HashMap<String, String>,
    kernels: &HashMap<String, AttentionKernel>,
) -> Result<Op, String> {
    let a = Attrs { what: name, attrs };
    let attr = |key: &str| a.get(key);
    let shape = |key: &str| -> Result<Shape, String> {
        let mut c = Cursor::new(attr(key)?);
        c.punct("[")?;
        c.list("]", |c| c.dim())
    };
    let op = match name {
        "input" => Op::Input {
            name: a.string("name")?,
        },
        "weight" => Op::Weight {
            name: a.string("name")?,
        },
        "constant" => Op::Constant {
            value: a.float("value")?,
        },
        "positions" => Op::Positions,
        "embedding" => Op::Embedding,
        "matmul" => Op::MatMul,
        "select" => Op::Select,
        "reshape" => Op::Reshape {
            shape: shape("shape")?,
        },
        "expand" => Op::Expand {
            shape: shape("shape")?,
        },
        "transpose" => {
            let mut c = Cursor::new(attr("perm")?);
            c.punct("[")?;
            Op::Transpose {
                perm: c.list("]", |c| c.number::<usize>())?,
            }
        }
        "rope" => Op::Rope {
            rope: a.rope("base", "scaling")?,
        },
        "rmsnorm" => Op::RmsNorm {
            eps: a.float("eps")?,
        },
        "linear" => Op::Linear {
            norm_eps: a.optional_float("norm_eps")?,
            residual: a.boolean("residual")?,
        },
        "swiglu" => Op::SwiGlu {
            norm_eps: a.optional_float("norm_eps")?,
        },
        "heads_proj" => Op::HeadsProj {
            heads: a.number("heads")?,
            head_dim: a.number("head_dim")?,
            norm_eps: a.optional_float("norm_eps")?,
            bias: a.boolean("bias")?,
            qk_norm: a.optional_float("qk_norm_eps")?,
            rope: match a.attrs.contains_key("rope_base") {
                true => Some(a.rope("rope_base", "rope_scaling")?),
                false => None,
            },
        },
        "tile_ranges" => Op::TileRanges {
            block: a.number("block")?,
        },
        "attention" | "attention_lse" | "attention_grad" => {
            let reference = attr("kernel")?;
            let kernel_name = reference.strip_prefix('@').ok_or_else(|| {
                format!("`kernel` names a kernel as `@name`, found `{reference}`")
            })?;
            let kernel = Box::new(
                kernels
                    .get(kernel_name)
                    .ok_or_else(|| format!("kernel `@{kernel_name}` is not defined above"))?
                    .clone(),
            );
            match name {
                "attention" => Op::Attention(kernel),
                "attention_lse" => Op::AttentionLse(kernel),
                _ => {
                    let wrt = a.string("wrt")?;
                    let wrt = GradOf::ALL
                        .into_iter()
                        .find(|g| g.name() == wrt)
                        .ok_or_else(|| format!("`wrt` is \"q\", \"k\" or \"v\", found `{wrt}`"))?;
                    Op::AttentionGrad { kernel, wrt }
                }
            }
        }
        "embedding_grad" => Op::EmbeddingGrad {
            vocab: a.number("vocab")?,
        },
        "rope_grad" => Op::RopeGrad {
            rope: a.rope("base", "scaling")?,
        },
        "ce_lse" => Op::CeLse,
        "ce_loss" => Op::CeLoss,
        "ce_grad" => {
            let wrt = a.string("wrt")?;
            let wrt = CeGradOf::ALL
                .into_iter()
                .find(|g| g.name() == wrt)
                .ok_or_else(|| format!("`wrt` is \"hidden\" or \"weight\", found `{wrt}`"))?;
            Op::CeGrad { wrt }
        }
        "mask" | "score_mod" => {
            let expr = a.expr("expr")?;
            let sides = a.strings("sides")?;
            if name == "mask" {
                Op::Mask { expr, sides }
            } else {
                Op::ScoreMod { expr, sides }
            }
        }
        other => {
            if let Some(u) = UnaryOp::ALL.into_iter().find(|u| u.name() == other) {
                Op::Unary(u)
            } else if let Some(b) = BinaryOp::ALL.into_iter().find(|b| b.name() == other) {
                Op::Binary(b)
            } else if let Some(c) = CmpOp::ALL.into_iter().find(|c| c.name() == other) {
                Op::Compare(c)
            } else if let Some(r) = ReduceOp::ALL.into_iter().find(|r| r.name() == other) {
                Op::Reduce {
                    op: r,
                    axis: Cursor::new(attr("axis")?).number::<usize>()?,
                }
            } else {
                return Err(format!("unknown operation `{other}`"));
            }
        }
    };
    if let Some(extra) = attrs
        .keys()
        .filter(|k| !crate::print::attributes(&op).iter().any(|(n, _)| n == k))
        .min()
    {
        return Err(format!("`{name}` has no attribute `{extra}`"));
    }
    Ok(op)
}

/// A cursor over one line of text.
struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Cursor<'a> {
        Cursor { text, pos: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn skip_space(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn describe_next(&self) -> String {
        match self.rest().chars().next() {
            Some(c) => format!("`{c}`"),
            None => "the end of the line".into(),
        }
    }

    fn end(&mut self) -> Result<(), String> {
        self.skip_space();
        if self.rest().is_empty() {
            Ok(())
        } else {
            Err(format!("unexpected `{}`", self.rest()))
        }
    }

    fn try_punct(&mut self, p: &str) -> bool {
        self.skip_space();
        if self.rest().starts_with(p) {
            self.pos += p.len();
            true
        } else {
            false
        }
    }

    fn punct(&mut self, p: &str) -> Result<(), String> {
        if self.try_punct(p) {
            Ok(())
        } else {
            Err(format!("expected `{p}`, found {}", self.describe_next()))
        }
    }

    fn word(&mut self) -> &'a str {
        self.skip_space();
        let rest = self.rest();
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(rest.len());
        self.pos += len;
        &rest[..len]
    }

    fn try_keyword(&mut self, keyword: &str) -> bool {
        let save = self.pos;
        if self.word() == keyword {
            true
        } else {
            self.pos = save;
            false
        }
    }

    fn keyword(&mut self, keyword: &str) -> Result<(), String> {
        if self.try_keyword(keyword) {
            Ok(())
        } else {
            Err(format!("expected `{keyword}`"))
        }
    }

    fn ident(&mut self) -> Result<String, String> {
        let word = self.word();
        if word.is_empty() || word.starts_with(|c: char| c.is_ascii_digit()) {
            Err(format!("expected a name, found {}", self.describe_next()))
        } else {
            Ok(word.to_string())
        }
    }

    fn number<T: std::str::FromStr>(&mut self) -> Result<T, String> {
        let word = self.word();
        word.parse()
            .map_err(|_| format!("expected a number, found `{word}`"))
    }

    fn value_name(&mut self) -> Result<String, String> {
        self.punct("%")?;
        let word = self.word();
        if word.is_empty() {
            return Err("expected a value name after `%`".into());
        }
        Ok(format!("%{word}"))
    }

    fn string(&mut self) -> Result<String, String> {
        self.punct("\"")?;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, c)) => out.push(c),
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err("unterminated string".into())
    }

    fn list<T>(
        &mut self,
        close: &str,
        mut item: impl FnMut(&mut Cursor<'a>) -> Result<T, String>,
    ) -> Result<Vec<T>, String> {
        let mut items = Vec::new();
        if self.try_punct(close) {
            return Ok(items);
        }
        loop {
            items.push(item(self)?);
            if self.try_punct(close) {
                return Ok(items);
            }
            self.punct(",")?;
        }
    }

    /// `{key = value, ...}`, or nothing.
    fn attrs(&mut self) -> Result<HashMap<String, String>, String> {
        let mut attrs = HashMap::new();
        if self.try_punct("{") {
            loop {
                let key = self.ident()?;
                self.punct("=")?;
                let value = self.attr_value()?;
                if attrs.insert(key.clone(), value).is_some() {
                    return Err(format!("attribute `{key}` is given twice"));
                }
                if self.try_punct("}") {
                    break;
                }
                self.punct(",")?;
            }
        }
        Ok(attrs)
    }

    /// `loc(line:col)`, or nothing.
    fn loc(&mut self) -> Result<Option<Loc>, String> {
        if !self.try_keyword("loc") {
            return Ok(None);
        }
        self.punct("(")?;
        let line = self.number::<u32>()?;
        self.punct(":")?;
        let col = self.number::<u32>()?;
        self.punct(")")?;
        Ok(Some(Loc { line, col }))
    }

    fn dim(&mut self) -> Result<Dim, String> {
        let word = self.word();
        if let Some(sym) = Sym::from_name(word) {
            if self.rest().starts_with('/') {
                self.pos += 1;
                let block = self.number::<u32>()?;
                return Ok(Dim::Blocks(sym, block));
            }
            Ok(Dim::Sym(sym))
        } else {
            word.parse()
                .map(Dim::Const)
                .map_err(|_| format!("expected a dimension, found `{word}`"))
        }
    }

    fn tensor_type(&mut self) -> Result<TensorType, String> {
        let word = self.word();
        let dtype =
            DType::from_name(word).ok_or_else(|| format!("unknown element type `{word}`"))?;
        self.punct("[")?;
        let shape = self.list("]", |c| c.dim())?;
        Ok(TensorType::new(dtype, shape))
    }

    /// The raw text of one attribute value: a string, a bracketed list or a bare word.
    fn attr_value(&mut self) -> Result<String, String> {
        self.skip_space();
        let start = self.pos;
        let rest = self.rest();
        if rest.starts_with('"') {
            self.string()?;
        } else if rest.starts_with('[') {
            let mut depth = 0usize;
            let mut in_string = false;
            let mut escaped = false;
            for (i, c) in rest.char_indices() {
                if in_string {
                    match (escaped, c) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => in_string = false,
                        _ => {}
                    }
                    continue;
                }
                match c {
                    '"' => in_string = true,
                    '[' => depth += 1,
                    ']' => {
                        depth -= 1;
                        if depth == 0 {
                            self.pos += i + 1;
                            return Ok(self.text[start..self.pos].to_string());
                        }
                    }
                    _ => {}
                }
            }
            return Err("unclosed `[`".into());
        } else {
            let len = rest
                .find(|c: char| c == ',' || c == '}' || c.is_whitespace())
                .unwrap_or(rest.len());
            if len == 0 {
                return Err(format!("expected a value, found {}", self.describe_next()));
            }
            self.pos += len;
        }
        Ok(self.text[start..self.pos].to_string())
    }
}
