//! File-driven snapshots of each stage: the syntax tree and the graph IR of every program in
//! `examples/` and `tests/fixtures/ok/`, and the syntax tree of every bad-input fixture.
//! Invariants are checked before a snapshot is taken: no diagnostics for good programs, and
//! the IR verifier on every graph.

use std::path::Path;

use crate::common::{check_ok, lower, relative, zb_files};

/// The snapshot name of a file: its path with `/` as `__` and no extension.
pub fn snapshot_name(stage: &str, path: &Path) -> String {
    let rel = relative(path);
    let stem = rel.strip_suffix(".zb").unwrap_or(&rel);
    format!("{stage}@{}", stem.replace('/', "__"))
}

fn good_programs() -> Vec<std::path::PathBuf> {
    crate::common::programs()
}

#[test]
fn ast_of_every_program() {
    for path in good_programs()
        .iter()
        .chain(&zb_files("tests/fixtures/err"))
    {
        let source = std::fs::read_to_string(path).expect("readable");
        let (file, _) = zebra_frontend::parser::parse(&source);
        let dump = zebra_frontend::ast::dump(&file, &source);
        insta::with_settings!({ description => relative(path), omit_expression => true }, {
            insta::assert_snapshot!(snapshot_name("ast", path), dump);
        });
    }
}

#[test]
fn ir_of_every_program() {
    for path in good_programs() {
        let (_, checked) = check_ok(&path);
        assert!(
            !checked.program.models.is_empty(),
            "{} defines no model",
            relative(&path)
        );
        let mut text = String::new();
        for spec in &checked.program.models {
            text.push_str(&zebra_ir::print_graph(&lower(spec)));
        }
        insta::with_settings!({ description => relative(&path), omit_expression => true }, {
            insta::assert_snapshot!(snapshot_name("ir", &path), text);
        });
    }
}

#[test]
fn good_programs_have_no_diagnostics_at_all() {
    for path in good_programs() {
        let (_, checked) = check_ok(&path);
        assert!(
            checked.diagnostics.is_empty(),
            "{} has warnings: {:?}",
            relative(&path),
            checked.diagnostics
        );
    }
}
