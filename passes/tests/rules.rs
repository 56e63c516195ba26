//! Every rewrite rule has an equivalence test: two expressions, written in the IR's text
//! form, that the rules prove equal (or, for recognized forms, a class that comes to hold
//! the form).

use egg::{Id, Runner};
use zebra_ir::parse_graph;
use zebra_passes::lang::{ZAnalysis, ZNode, ZOp};
use zebra_passes::rules::{self, ZRewrite};
use zebra_passes::saturate;

/// Every rule, as the pipeline stages hold them.
fn all_rules() -> Vec<ZRewrite> {
    let mut rules = rules::algebra::rules();
    rules.extend(rules::recognize::rules());
    rules.extend(rules::attention::rules(
        zebra_passes::Target::Cpu,
        Default::default(),
    ));
    rules.extend(rules::epilogue::rules());
    rules
}

/// Loads a graph, saturates it, and returns the e-graph with the class of each output.
fn saturate(text: &str) -> (egg::EGraph<ZNode, ZAnalysis>, Vec<(String, Id)>) {
    let graph = parse_graph(text).unwrap_or_else(|e| panic!("{e}"));
    zebra_ir::verify(&graph).unwrap_or_else(|e| panic!("{e}"));
    let saturation = saturate::load(&graph, false);
    let runner = Runner::<ZNode, ZAnalysis, ()>::new(ZAnalysis::default())
        .with_egraph(saturation.egraph)
        .with_iter_limit(20)
        .run(&all_rules());
    let egraph = runner.egraph;
    let outputs = graph
        .outputs()
        .iter()
        .zip(&saturation.roots)
        .map(|((name, _), &root)| (name.clone(), egraph.find(root)))
        .collect();
    (egraph, outputs)
}

/// Asserts that outputs `a` and `b` are proven equal.
fn check(text: &str, a: &str, b: &str) {
    let (_, outputs) = saturate(text);
    let class = |name: &str| {
        outputs
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no output {name}"))
            .1
    };
    assert_eq!(class(a), class(b), "`{a}` and `{b}` were not proven equal");
}

/// Asserts that output `a` is not proven equal to `b` (a rule's side condition held back).
fn check_not(text: &str, a: &str, b: &str) {
    let (_, outputs) = saturate(text);
    let class = |name: &str| outputs.iter().find(|(n, _)| n == name).expect("output").1;
    assert_ne!(class(a), class(b), "`{a}` and `{b}` should not be equal");
}

/// Asserts that the class of output `a` holds a node of the recognized form `op`.
fn check_form(text: &str, a: &str, op: ZOp) {
    let (egraph, outputs) = saturate(text);
    let class = outputs.iter().find(|(n, _)| n == a).expect("output").1;
    assert!(
        egraph[class].nodes.iter().any(|n| n.op == op),
        "`{a}` was not recognized as {op:?}"
    );
}

// ---------------------------------------------------------------------------- algebra

#[test]
fn transpose_of_transpose() {
    check(
        r#"graph g {
  %0 = input {name = "x"} : f32[B, T, 4, 8]
  %1 = transpose(%0) {perm = [0, 2, 1, 3]} : f32[B, 4, T, 8]
  %2 = transpose(%1) {perm = [0, 1, 3, 2]} : f32[B, 4, 8, T]
  %3 = transpose(%0) {perm = [0, 2, 3, 1]} : f32[B, 4, 8, T]
  output a = %2
  output b = %3
}"#,
        "a",
        "b",
    );
}

#[test]
fn transpose_identity() {
    check(
        r#"graph g {
  %0 = input {name = "x"} : f32[B, T]
  %1 = transpose(%0) {perm = [0, 1]} : f32[B, T]
  output a = %1
  output b = %0
}"#,
        "a",
        "b",
    );
}

#[test]
fn reshape_of_reshape_and_identity() {
    check(
        r#"graph g {
  %0 = input {name = "x"} : f32[B, T, 64]
  %1 = reshape(%0) {shape = [B, T, 4, 16]} : f32[B, T, 4, 16]
  %2 = reshape(%1) {shape = [B, T, 64]} : f32[B, T, 64]
  output a = %2
  output b = %0
}"#,
        "a",
        "b",
    );
}

#[test]
fn fold_scales_and_division_by_a_constant() {
    check(
        r#"graph g {
  %0 = input {name = "x"} : f32[B, T]
  %1 = constant {value = 0.5} : f32[]
  %2 = mul(%0, %1) : f32[B, T]
  %3 = constant {value = 4.0} : f32[]
  %4 = div(%2, %3) : f32[B, T]
  %5 = constant {value = 0.125} : f32[]
  %6 = mul(%0, %5) : f32[B, T]
  output a = %4
  output b = %6
}"#,
        "a",
        "b",
    );
}

#[test]
fn multiplying_by_one_is_nothing_unless_it_broadcasts() {
    let text = |shape: &str| {
        format!(
            r#"graph g {{
  %0 = input {{name = "x"}} : f32[{shape}]
  %1 = constant {{value = 1.0}} : f32[]
  %2 = mul(%0, %1) : f32[{shape}]
  output a = %2
  output b = %0
}}"#
        )
    };
    check(&text("B, T"), "a", "b");
    check(&text(""), "a", "b");
}

// ---------------------------------------------------------------------------- recognize

const SOFTMAX_GUARDED: &str = r#"graph g {
  %0 = input {name = "s"} : f32[B, 4, T, T]
  %1 = reduce_max(%0) {axis = 3} : f32[B, 4, T, 1]
  %2 = constant {value = -3.4028234663852886e38} : f32[]
  %3 = max(%1, %2) : f32[B, 4, T, 1]
  %4 = sub(%0, %3) : f32[B, 4, T, T]
  %5 = exp(%4) : f32[B, 4, T, T]
  %6 = reduce_sum(%5) {axis = 3} : f32[B, 4, T, 1]
  %7 = constant {value = 1.1754943508222875e-38} : f32[]
  %8 = max(%6, %7) : f32[B, 4, T, 1]
  %9 = div(%5, %8) : f32[B, 4, T, T]
  output a = %9
}"#;

#[test]
fn softmax_guarded() {
    check_form(SOFTMAX_GUARDED, "a", ZOp::Softmax);
}

#[test]
fn softmax_with_a_harmful_guard_is_not_softmax() {
    // A max floor of 0 changes the result for rows whose scores are all negative.
    let text = SOFTMAX_GUARDED.replace("-3.4028234663852886e38", "0.0");
    let (egraph, outputs) = saturate(&text);
    assert!(
        !egraph[outputs[0].1]
            .nodes
            .iter()
            .any(|n| n.op == ZOp::Softmax)
    );
}

#[test]
fn softmax_plain_and_with_a_reciprocal() {
    let plain = r#"graph g {
  %0 = input {name = "s"} : f32[B, T, T]
  %1 = reduce_max(%0) {axis = 2} : f32[B, T, 1]
  %2 = sub(%0, %1) : f32[B, T, T]
  %3 = exp(%2) : f32[B, T, T]
  %4 = reduce_sum(%3) {axis = 2} : f32[B, T, 1]
  %5 = div(%3, %4) : f32[B, T, T]
  %6 = recip(%4) : f32[B, T, 1]
  %7 = mul(%3, %6) : f32[B, T, T]
  output a = %5
  output b = %7
}"#;
    check_form(plain, "a", ZOp::Softmax);
    check_form(plain, "b", ZOp::Softmax);
    check(plain, "a", "b");
}

#[test]
fn softmax_over_another_axis_is_not_recognized() {
    let text = r#"graph g {
  %0 = input {name = "s"} : f32[B, T, T]
  %1 = reduce_max(%0) {axis = 1} : f32[B, 1, T]
  %2 = sub(%0, %1) : f32[B, T, T]
  %3 = exp(%2) : f32[B, T, T]
  %4 = reduce_sum(%3) {axis = 1} : f32[B, 1, T]
  %5 = div(%3, %4) : f32[B, T, T]
  output a = %5
}"#;
    let (egraph, outputs) = saturate(text);
    assert!(
        !egraph[outputs[0].1]
            .nodes
            .iter()
            .any(|n| n.op == ZOp::Softmax)
    );
}

const REPEAT_KV: &str = r#"graph g {
  %0 = input {name = "k"} : f32[B, 2, T, 16]
  %1 = reshape(%0) {shape = [B, 2, 1, T, 16]} : f32[B, 2, 1, T, 16]
  %2 = expand(%1) {shape = [B, 2, 3, T, 16]} : f32[B, 2, 3, T, 16]
  %3 = reshape(%2) {shape = [B, 6, T, 16]} : f32[B, 6, T, 16]
  output a = %3
}"#;

#[test]
fn repeat_kv() {
    check_form(REPEAT_KV, "a", ZOp::RepeatKv);
}

#[test]
fn qk_and_scores() {
    let text = r#"graph g {
  %0 = input {name = "q"} : f32[B, 4, T, 16]
  %1 = input {name = "x"} : f32[B, T, 4, 16]
  %2 = transpose(%1) {perm = [0, 2, 3, 1]} : f32[B, 4, 16, T]
  %3 = matmul(%0, %2) : f32[B, 4, T, T]
  %4 = constant {value = 0.25} : f32[]
  %5 = mul(%3, %4) : f32[B, 4, T, T]
  %6 = mul(%0, %4) : f32[B, 4, T, 16]
  %7 = matmul(%6, %2) : f32[B, 4, T, T]
  output unscaled = %3
  output scaled = %5
  output scaled_query = %7
}"#;
    check_form(text, "unscaled", ZOp::Qk);
    check_form(text, "unscaled", ZOp::Scores);
    check_form(text, "scaled", ZOp::Scores);
    check_form(text, "scaled_query", ZOp::Scores);
}

#[test]
fn rmsnorm_and_linear() {
    let text = r#"graph g {
  %0 = input {name = "x"} : f32[B, T, 8]
  %1 = weight {name = "g"} : f32[8]
  %2 = mul(%0, %0) : f32[B, T, 8]
  %3 = reduce_mean(%2) {axis = 2} : f32[B, T, 1]
  %4 = constant {value = 1e-5} : f32[]
  %5 = add(%3, %4) : f32[B, T, 1]
  %6 = rsqrt(%5) : f32[B, T, 1]
  %7 = mul(%0, %6) : f32[B, T, 8]
  %8 = mul(%7, %1) : f32[B, T, 8]
  %9 = rmsnorm(%0, %1) {eps = 1e-5} : f32[B, T, 8]
  %10 = weight {name = "w"} : f32[4, 8]
  %11 = transpose(%10) {perm = [1, 0]} : f32[8, 4]
  %12 = matmul(%0, %11) : f32[B, T, 4]
  %13 = linear(%0, %10) : f32[B, T, 4]
  output norm_primitives = %8
  output norm = %9
  output product = %12
  output linear = %13
}"#;
    check(text, "norm_primitives", "norm");
    check(text, "product", "linear");
}

// ---------------------------------------------------------------------------- attention

/// Attention written the plain way; `{mod}` and `{mask}` lines vary per test.
fn plain_attention(score_mod_first: bool, modifier: &str, fused: &str) -> String {
    let (scores, masked, softmax_in) = if score_mod_first {
        (
            format!(r#"  %8 = score_mod(%7) {{expr = "{modifier}"}} : f32[B, 4, T, T]"#),
            "  %9 = select(%10, %8, %11) : f32[B, 4, T, T]".to_string(),
            "%9",
        )
    } else {
        (
            "  %8 = select(%10, %7, %11) : f32[B, 4, T, T]".to_string(),
            format!(r#"  %9 = score_mod(%8) {{expr = "{modifier}"}} : f32[B, 4, T, T]"#),
            "%9",
        )
    };
    format!(
        r#"graph g {{
  kernel @fused = attention {{{fused}}}
  %0 = input {{name = "q"}} : f32[B, 4, T, 16]
  %1 = input {{name = "k"}} : f32[B, 2, T, 16]
  %2 = input {{name = "v"}} : f32[B, 2, T, 16]
  %10 = mask {{expr = "k <= q"}} : bool[1, 1, T, T]
  %11 = constant {{value = -inf}} : f32[]
  %3 = reshape(%1) {{shape = [B, 2, 1, T, 16]}} : f32[B, 2, 1, T, 16]
  %4 = expand(%3) {{shape = [B, 2, 2, T, 16]}} : f32[B, 2, 2, T, 16]
  %5 = reshape(%4) {{shape = [B, 4, T, 16]}} : f32[B, 4, T, 16]
  %20 = reshape(%2) {{shape = [B, 2, 1, T, 16]}} : f32[B, 2, 1, T, 16]
  %21 = expand(%20) {{shape = [B, 2, 2, T, 16]}} : f32[B, 2, 2, T, 16]
  %22 = reshape(%21) {{shape = [B, 4, T, 16]}} : f32[B, 4, T, 16]
  %6 = transpose(%5) {{perm = [0, 1, 3, 2]}} : f32[B, 4, 16, T]
  %12 = matmul(%0, %6) : f32[B, 4, T, T]
  %13 = constant {{value = 0.25}} : f32[]
  %7 = mul(%12, %13) : f32[B, 4, T, T]
{scores}
{masked}
  %14 = reduce_max({softmax_in}) {{axis = 3}} : f32[B, 4, T, 1]
  %15 = sub({softmax_in}, %14) : f32[B, 4, T, T]
  %16 = exp(%15) : f32[B, 4, T, T]
  %17 = reduce_sum(%16) {{axis = 3}} : f32[B, 4, T, 1]
  %18 = div(%16, %17) : f32[B, 4, T, T]
  %19 = matmul(%18, %22) : f32[B, 4, T, 16]
  %30 = attention(%0, %1, %2) {{kernel = @fused}} : f32[B, 4, T, 16]
  output plain = %19
  output fused = %30
}}"#
    )
}

fn kernel(score: &str) -> String {
    format!(
        r#"mask = "k <= q", score = "{score}", scale = 0.25, heads = 4, kv_heads = 2, head_dim = 16, block_q = 64, block_k = 64, merge_heads = false"#
    )
}

#[test]
fn fuse_attention_with_gqa_and_a_score_modifier() {
    let alibi = "score - 0.5 * (q - k)";
    check(
        &plain_attention(true, alibi, &kernel(alibi)),
        "plain",
        "fused",
    );
}

#[test]
fn mask_before_score_mod_when_the_modifier_keeps_masked_scores() {
    let alibi = "score - 0.5 * (q - k)";
    check(
        &plain_attention(false, alibi, &kernel(alibi)),
        "plain",
        "fused",
    );
}

#[test]
fn mask_before_softcap_is_not_the_same_and_is_not_fused() {
    let softcap = "50.0 * tanh(score / 50.0)";
    check_not(
        &plain_attention(false, softcap, &kernel(softcap)),
        "plain",
        "fused",
    );
}

#[test]
fn additive_masks() {
    let text = r#"graph g {
  %0 = input {name = "s"} : f32[B, 4, T, T]
  %1 = mask {expr = "k <= q"} : bool[1, 1, T, T]
  %2 = constant {value = 0.0} : f32[]
  %3 = constant {value = -inf} : f32[]
  %4 = select(%1, %2, %3) : f32[1, 1, T, T]
  %5 = add(%0, %4) : f32[B, 4, T, T]
  %6 = add(%4, %0) : f32[B, 4, T, T]
  %7 = select(%1, %0, %3) : f32[B, 4, T, T]
  output right = %5
  output left = %6
  output select = %7
}"#;
    check(text, "right", "select");
    check(text, "left", "select");
}

#[test]
fn merge_heads() {
    let text = r#"graph g {
  kernel @a = attention {mask = "k <= q", scale = 0.25, heads = 4, kv_heads = 4, head_dim = 16, block_q = 64, block_k = 64, merge_heads = false}
  kernel @merged = attention {mask = "k <= q", scale = 0.25, heads = 4, kv_heads = 4, head_dim = 16, block_q = 64, block_k = 64, merge_heads = true}
  %0 = input {name = "q"} : f32[B, 4, T, 16]
  %1 = attention(%0, %0, %0) {kernel = @a} : f32[B, 4, T, 16]
  %2 = transpose(%1) {perm = [0, 2, 1, 3]} : f32[B, T, 4, 16]
  %3 = reshape(%2) {shape = [B, T, 64]} : f32[B, T, 64]
  %4 = attention(%0, %0, %0) {kernel = @merged} : f32[B, T, 64]
  output a = %3
  output b = %4
}"#;
    check(text, "a", "b");
}

// ---------------------------------------------------------------------------- epilogue

#[test]
fn norm_and_residual_into_linear() {
    let text = r#"graph g {
  %0 = input {name = "x"} : f32[B, T, 8]
  %1 = weight {name = "g"} : f32[8]
  %2 = weight {name = "w"} : f32[8, 8]
  %3 = rmsnorm(%0, %1) {eps = 1e-5} : f32[B, T, 8]
  %4 = linear(%3, %2) : f32[B, T, 8]
  %5 = linear(%0, %2, %1) {norm_eps = 1e-5} : f32[B, T, 8]
  %6 = add(%0, %4) : f32[B, T, 8]
  %7 = linear(%0, %2, %1, %0) {norm_eps = 1e-5, residual = true} : f32[B, T, 8]
  %8 = linear(%0, %2) : f32[B, T, 8]
  %9 = add(%8, %0) : f32[B, T, 8]
  %10 = add(%0, %8) : f32[B, T, 8]
  %11 = linear(%0, %2, %0) {residual = true} : f32[B, T, 8]
  output unfused_norm = %4
  output fused_norm = %5
  output unfused_both = %6
  output fused_both = %7
  output sum_left = %9
  output sum_right = %10
  output fused_residual = %11
}"#;
    check(text, "unfused_norm", "fused_norm");
    check(text, "unfused_both", "fused_both");
    check(text, "sum_left", "fused_residual");
    check(text, "sum_right", "fused_residual");
}

#[test]
fn swiglu_plain_and_normed() {
    let text = r#"graph g {
  %0 = input {name = "x"} : f32[B, T, 8]
  %1 = weight {name = "wg"} : f32[16, 8]
  %2 = weight {name = "wu"} : f32[16, 8]
  %3 = weight {name = "g"} : f32[8]
  %4 = linear(%0, %1) : f32[B, T, 16]
  %5 = linear(%0, %2) : f32[B, T, 16]
  %6 = sigmoid(%4) : f32[B, T, 16]
  %7 = mul(%4, %6) : f32[B, T, 16]
  %8 = mul(%7, %5) : f32[B, T, 16]
  %9 = swiglu(%0, %1, %2) : f32[B, T, 16]
  %10 = rmsnorm(%0, %3) {eps = 1e-5} : f32[B, T, 8]
  %11 = linear(%10, %1) : f32[B, T, 16]
  %12 = linear(%10, %2) : f32[B, T, 16]
  %13 = sigmoid(%11) : f32[B, T, 16]
  %14 = mul(%11, %13) : f32[B, T, 16]
  %15 = mul(%14, %12) : f32[B, T, 16]
  %16 = swiglu(%0, %1, %2, %3) {norm_eps = 1e-5} : f32[B, T, 16]
  output plain = %8
  output fused = %9
  output plain_normed = %15
  output fused_normed = %16
}"#;
    check(text, "plain", "fused");
    check(text, "plain_normed", "fused_normed");
}

#[test]
fn heads_projection_with_rope() {
    let text = r#"graph g {
  %0 = input {name = "x"} : f32[B, T, 8]
  %1 = weight {name = "w"} : f32[8, 8]
  %2 = weight {name = "g"} : f32[8]
  %3 = positions : i64[T]
  %4 = linear(%0, %1) : f32[B, T, 8]
  %5 = reshape(%4) {shape = [B, T, 2, 4]} : f32[B, T, 2, 4]
  %6 = transpose(%5) {perm = [0, 2, 1, 3]} : f32[B, 2, T, 4]
  %7 = rope(%6, %3) {base = 10000.0} : f32[B, 2, T, 4]
  %8 = heads_proj(%0, %1, %3) {heads = 2, head_dim = 4, rope_base = 10000.0} : f32[B, 2, T, 4]
  %9 = rmsnorm(%0, %2) {eps = 1e-5} : f32[B, T, 8]
  %10 = linear(%9, %1) : f32[B, T, 8]
  %11 = reshape(%10) {shape = [B, T, 2, 4]} : f32[B, T, 2, 4]
  %12 = transpose(%11) {perm = [0, 2, 1, 3]} : f32[B, 2, T, 4]
  %13 = heads_proj(%0, %1, %2) {heads = 2, head_dim = 4, norm_eps = 1e-5} : f32[B, 2, T, 4]
  %14 = rope(%12, %3) {base = 10000.0} : f32[B, 2, T, 4]
  %15 = heads_proj(%0, %1, %2, %3) {heads = 2, head_dim = 4, norm_eps = 1e-5, rope_base = 10000.0} : f32[B, 2, T, 4]
  output plain_rope = %7
  output fused_rope = %8
  output plain_normed = %12
  output fused_normed = %13
  output plain_normed_rope = %14
  output fused_normed_rope = %15
}"#;
    check(text, "plain_rope", "fused_rope");
    check(text, "plain_normed", "fused_normed");
    check(text, "plain_normed_rope", "fused_normed_rope");
}

#[test]
fn heads_projection_with_bias_and_qk_norm() {
    let text = r#"graph g {
  %0 = input {name = "x"} : f32[B, T, 8]
  %1 = weight {name = "w"} : f32[8, 8]
  %2 = weight {name = "g"} : f32[8]
  %3 = positions : i64[T]
  %4 = weight {name = "b"} : f32[8]
  %5 = weight {name = "gh"} : f32[4]
  %6 = linear(%0, %1) : f32[B, T, 8]
  %7 = add(%6, %4) : f32[B, T, 8]
  %8 = reshape(%7) {shape = [B, T, 2, 4]} : f32[B, T, 2, 4]
  %9 = transpose(%8) {perm = [0, 2, 1, 3]} : f32[B, 2, T, 4]
  %10 = heads_proj(%0, %1, %4) {heads = 2, head_dim = 4, bias = true} : f32[B, 2, T, 4]
  %11 = rmsnorm(%0, %2) {eps = 1e-5} : f32[B, T, 8]
  %12 = linear(%11, %1) : f32[B, T, 8]
  %13 = add(%12, %4) : f32[B, T, 8]
  %14 = reshape(%13) {shape = [B, T, 2, 4]} : f32[B, T, 2, 4]
  %15 = transpose(%14) {perm = [0, 2, 1, 3]} : f32[B, 2, T, 4]
  %16 = rmsnorm(%15, %5) {eps = 1e-6} : f32[B, 2, T, 4]
  %17 = rope(%16, %3) {base = 10000.0} : f32[B, 2, T, 4]
  %18 = heads_proj(%0, %1, %2, %4, %5, %3) {heads = 2, head_dim = 4, norm_eps = 1e-5, bias = true, qk_norm_eps = 1e-6, rope_base = 10000.0} : f32[B, 2, T, 4]
  %19 = linear(%0, %1) : f32[B, T, 8]
  %20 = reshape(%19) {shape = [B, T, 2, 4]} : f32[B, T, 2, 4]
  %21 = transpose(%20) {perm = [0, 2, 1, 3]} : f32[B, 2, T, 4]
  %22 = rmsnorm(%21, %5) {eps = 1e-6} : f32[B, 2, T, 4]
  %23 = heads_proj(%0, %1, %5) {heads = 2, head_dim = 4, qk_norm_eps = 1e-6} : f32[B, 2, T, 4]
  %24 = rope(%21, %3) {base = 10000.0} : f32[B, 2, T, 4]
  %25 = rmsnorm(%24, %5) {eps = 1e-6} : f32[B, 2, T, 4]
  %26 = heads_proj(%0, %1, %5, %3) {heads = 2, head_dim = 4, qk_norm_eps = 1e-6, rope_base = 10000.0} : f32[B, 2, T, 4]
  %27 = input {name = "r"} : f32[B, T, 8]
  %28 = add(%6, %27) : f32[B, T, 8]
  %29 = reshape(%28) {shape = [B, T, 2, 4]} : f32[B, T, 2, 4]
  %30 = transpose(%29) {perm = [0, 2, 1, 3]} : f32[B, 2, T, 4]
  output plain_biased = %9
  output fused_biased = %10
  output plain_qwen3 = %17
  output fused_qwen3 = %18
  output plain_qk_norm = %22
  output fused_qk_norm = %23
  output rope_then_norm = %25
  output norm_then_rope = %26
  output plain_residual = %30
}"#;
    check(text, "plain_biased", "fused_biased");
    check(text, "plain_qwen3", "fused_qwen3");
    check(text, "plain_qk_norm", "fused_qk_norm");
    // QK-norm comes before RoPE: a norm after RoPE is another computation.
    check_not(text, "rope_then_norm", "norm_then_rope");
    // An added tensor that is not one value per column is not a bias.
    let (egraph, outputs) = saturate(text);
    let class = outputs
        .iter()
        .find(|(n, _)| n == "plain_residual")
        .unwrap()
        .1;
    assert!(
        !egraph[class].nodes.iter().any(|n| n.op == ZOp::HeadsProj),
        "a per-token addend was fused as a bias"
    );
}

/// Every rule of every family is exercised by the tests above.
#[test]
fn every_rule_is_tested() {
    let tested = include_str!("rules.rs");
    let mut untested = Vec::new();
    for rule in all_rules() {
        let name = rule.name.to_string();
        let covered = [
            ("transpose-of-transpose", "transpose_of_transpose"),
            ("transpose-identity", "transpose_identity"),
            ("reshape-of-reshape", "reshape_of_reshape"),
            ("reshape-identity", "reshape_of_reshape_and_identity"),
            ("fold-scales", "fold_scales"),
            ("div-by-constant", "division_by_a_constant"),
            ("mul-by-one", "multiplying_by_one"),
            ("softmax-guarded", "fn softmax_guarded"),
            ("softmax-plain", "softmax_plain"),
            ("softmax-recip", "with_a_reciprocal"),
            ("repeat-kv", "fn repeat_kv"),
            ("qk", "qk_and_scores"),
            ("scores-scaled", "qk_and_scores"),
            ("scores-scaled-query", "scaled_query"),
            ("scores-unscaled", "unscaled"),
            ("rmsnorm", "rmsnorm_and_linear"),
            ("linear", "rmsnorm_and_linear"),
            ("additive-mask", "additive_masks"),
            ("additive-mask-left", "additive_masks"),
            ("mask-before-score-mod", "mask_before_score_mod_when"),
            (
                "mask-before-score-mod-1",
                "mask_before_score_mod_with_a_side_input",
            ),
            (
                "mask-before-score-mod-2",
                "mask_before_score_mod_with_two_side_inputs",
            ),
            ("fuse-attention", "fuse_attention_with_gqa"),
            ("merge-heads", "fn merge_heads"),
            ("norm-into-linear", "norm_and_residual_into_linear"),
            ("residual-into-linear", "norm_and_residual_into_linear"),
            ("residual-into-linear-left", "norm_and_residual_into_linear"),
            (
                "residual-into-normed-linear",
                "norm_and_residual_into_linear",
            ),
            ("swiglu", "swiglu_plain_and_normed"),
            ("swiglu-normed", "swiglu_plain_and_normed"),
            ("heads-proj", "heads_projection_with_rope"),
            ("heads-proj-normed", "heads_projection_with_rope"),
            ("heads-proj-biased", "heads_projection_with_bias"),
            ("heads-proj-normed-biased", "heads_projection_with_bias"),
            (
                "qk-norm-into-heads-proj",
                "heads_projection_with_bias_and_qk_norm",
            ),
            ("rope-into-heads-proj", "heads_projection_with_rope"),
        ]
        .iter()
        .any(|(r, test)| *r == name && tested.contains(test));
        if !covered {
            untested.push(name);
        }
    }
    assert!(
        untested.is_empty(),
        "rules without an equivalence test: {untested:?}"
    );
}

#[test]
fn mask_before_score_mod_with_a_side_input() {
    let text = r#"graph g {
  %0 = input {name = "s"} : f32[B, 4, T, T]
  %1 = input {name = "bonus"} : i64[B, T]
  %2 = mask {expr = "k <= q"} : bool[1, 1, T, T]
  %3 = constant {value = -inf} : f32[]
  %4 = select(%2, %0, %3) : f32[B, 4, T, T]
  %5 = score_mod(%4, %1) {expr = "score + bonus[k]", sides = ["bonus"]} : f32[B, 4, T, T]
  %6 = score_mod(%0, %1) {expr = "score + bonus[k]", sides = ["bonus"]} : f32[B, 4, T, T]
  %7 = select(%2, %6, %3) : f32[B, 4, T, T]
  output masked_first = %5
  output modified_first = %7
}"#;
    check(text, "masked_first", "modified_first");
}

#[test]
fn mask_before_score_mod_with_two_side_inputs() {
    let text = r#"graph g {
  %0 = input {name = "s"} : f32[B, 4, T, T]
  %1 = input {name = "a"} : i64[B, T]
  %8 = input {name = "c"} : i64[B, T]
  %2 = mask {expr = "k <= q"} : bool[1, 1, T, T]
  %3 = constant {value = -inf} : f32[]
  %4 = select(%2, %0, %3) : f32[B, 4, T, T]
  %5 = score_mod(%4, %1, %8) {expr = "score + a[k] - c[q]", sides = ["a", "c"]} : f32[B, 4, T, T]
  %6 = score_mod(%0, %1, %8) {expr = "score + a[k] - c[q]", sides = ["a", "c"]} : f32[B, 4, T, T]
  %7 = select(%2, %6, %3) : f32[B, 4, T, T]
  output masked_first = %5
  output modified_first = %7
}"#;
    check(text, "masked_first", "modified_first");
}
