//! The Zebra DSL: models and attention variants in `.zb` files, checked with diagnostics that
//! point at the source, and lowered to the graph IR.

pub mod ast;
pub mod check;
pub mod diag;
pub mod init;
pub mod lexer;
pub mod lower;
pub mod parser;
pub mod spec;

pub use diag::{Diagnostic, Severity, Span, render};
pub use spec::{AttentionKind, ModelSpec, Program};

/// A source file with everything the frontend learned about it.
pub struct Checked {
    pub file: ast::File,
    pub program: Program,
    pub diagnostics: Vec<Diagnostic>,
}

impl Checked {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Parses and checks a source file, collecting every diagnostic. Never panics.
pub fn check_source(source: &str) -> Checked {
    let (file, mut diagnostics) = parser::parse(source);
    let (program, check_diagnostics) = check::check(&file, source);
    diagnostics.extend(check_diagnostics);
    diagnostics.sort_by_key(|d| (d.primary.span.start, d.primary.span.end));
    Checked {
        file,
        program,
        diagnostics,
    }
}
