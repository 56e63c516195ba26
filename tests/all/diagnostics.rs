//! Every bad-input fixture gets diagnostics, snapshotted as rendered for the user: file, line,
//! column, the source line and a caret.

use crate::common::{relative, zb_files};
use crate::snapshots::snapshot_name;
use zebra_frontend::{check_source, render};

#[test]
fn every_bad_input_is_diagnosed() {
    let fixtures = zb_files("tests/fixtures/err");
    assert!(
        fixtures.len() >= 25,
        "only {} bad-input fixtures",
        fixtures.len()
    );
    for path in fixtures {
        let source = std::fs::read_to_string(&path).expect("readable");
        let checked = check_source(&source);
        assert!(
            checked.has_errors(),
            "{} produced no error",
            relative(&path)
        );
        let rendered = render(&relative(&path), &source, &checked.diagnostics);
        for d in &checked.diagnostics {
            let (line, col) = zebra_frontend::diag::line_col(&source, d.primary.span.start);
            let location = format!("{}:{line}:{col}", relative(&path));
            assert!(
                rendered.contains(&location),
                "{location} is not in:\n{rendered}"
            );
        }
        insta::with_settings!({ description => relative(&path), omit_expression => true }, {
            insta::assert_snapshot!(snapshot_name("diagnostics", &path), rendered);
        });
    }
}

#[test]
fn a_parse_error_does_not_hide_later_errors() {
    let source = "attention a causal {\n    mask = k <= )\n}\nattention b2 causal {\n    mask = k <= q + (k < q)\n}\nmodel m {\n    dim = 0\n}\n";
    let checked = check_source(source);
    let messages: Vec<&str> = checked
        .diagnostics
        .iter()
        .map(|d| d.message.as_str())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("expected an expression")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("needs a number, found a bool")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("`dim` must be positive")),
        "{messages:?}"
    );
}
