//! Property tests: any input gives a result or diagnostics, never a panic. Random bytes test
//! the lexer; random sequences of the language's own tokens reach deep into the parser and
//! the checker. Whatever checks cleanly must lower to a graph that verifies.

use proptest::prelude::*;
use zebra_frontend::{check_source, render};

fn check_never_panics(source: &str) {
    let checked = check_source(source);
    for d in &checked.diagnostics {
        assert!(d.primary.span.start <= d.primary.span.end);
        assert!(d.primary.span.end as usize <= source.len());
    }
    let rendered = render("input.zb", source, &checked.diagnostics);
    assert_eq!(rendered.is_empty(), checked.diagnostics.is_empty());
    if !checked.has_errors() {
        for model in &checked.program.models {
            if model.layers.len() <= 64 {
                let graph = zebra_frontend::lower::lower(model).expect("a checked model lowers");
                zebra_ir::verify(&graph).expect("a lowered graph verifies");
            }
        }
    }
}

const WORDS: &[&str] = &[
    "attention",
    "model",
    "let",
    "causal",
    "bidirectional",
    "mask",
    "score",
    "=",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ",",
    ":",
    ".",
    "q",
    "k",
    "h",
    "b",
    "n_heads",
    "window",
    "spans",
    "doc",
    "int",
    "float",
    "int[T]",
    "T",
    "+",
    "-",
    "*",
    "/",
    "%",
    "<",
    "<=",
    "==",
    "!=",
    ">",
    ">=",
    "&&",
    "||",
    "!",
    "0",
    "1",
    "4",
    "64",
    "2.5",
    "1e-5",
    "tanh",
    "exp",
    "max",
    "abs",
    "vocab",
    "dim",
    "heads",
    "kv_heads",
    "head_dim",
    "ffn",
    "swiglu",
    "hidden",
    "norm",
    "rmsnorm",
    "eps",
    "rope",
    "base",
    "none",
    "embeddings",
    "tied",
    "layers",
    "global",
    "local",
    "true",
    "\n",
    "\n",
    "\n",
    "#",
    "@",
    "\"",
];

/// A well-formed model whose fields and attention are then perturbed.
const TEMPLATE: &str = "attention local(window: int = 4) causal {\n    mask = k <= q && q - k < window\n}\nmodel m {\n    vocab = 16\n    dim = 8\n    heads = 2\n    ffn = swiglu(hidden = 8)\n    norm = rmsnorm(eps = 1e-5)\n    rope = rope(base = 10000.0)\n    layers = 2 * local\n}\n";

/// The same with tables read per head and per distance.
const TABLES: &str = "let spans = [4, 2, 8]\nlet bias = [0.5, -1.0]\nattention local causal {\n    mask = k <= q && q - k < spans[h % 3]\n    score = score + bias[q - k]\n}\nmodel m {\n    vocab = 16\n    dim = 8\n    heads = 2\n    ffn = swiglu(hidden = 8)\n    norm = rmsnorm(eps = 1e-5)\n    rope = rope(base = 10000.0)\n    layers = 2 * local\n}\n";

fn perturb(template: &str, cut: usize, insert: &str, delete: usize) -> String {
    let mut source = template.to_string();
    let cut = cut.min(source.len());
    let cut = (0..=cut)
        .rev()
        .find(|&i| source.is_char_boundary(i))
        .unwrap_or(0);
    let end = (cut + delete).min(source.len());
    source.replace_range(cut..end, insert);
    source
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        check_never_panics(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn random_token_soup(words in proptest::collection::vec(proptest::sample::select(WORDS), 0..120)) {
        check_never_panics(&words.join(" "));
    }

    #[test]
    fn perturbed_model(cut in 0..TEMPLATE.len(), insert in proptest::sample::select(WORDS), delete in 0usize..8) {
        check_never_panics(&perturb(TEMPLATE, cut, insert, delete));
    }

    #[test]
    fn perturbed_tables(cut in 0..TABLES.len(), insert in proptest::sample::select(WORDS), delete in 0usize..8) {
        check_never_panics(&perturb(TABLES, cut, insert, delete));
    }
}

#[test]
fn the_templates_themselves_check() {
    for template in [TEMPLATE, TABLES] {
        let checked = check_source(template);
        assert!(checked.diagnostics.is_empty(), "{:?}", checked.diagnostics);
        assert_eq!(checked.program.models.len(), 1);
    }
}
