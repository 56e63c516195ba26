//! The lexer: source text to tokens with spans. Comments run from `#` to the end of the line.

use crate::diag::{Diagnostic, Span};

#[derive(Clone, Debug, PartialEq)]
pub enum TokenKind {
    Ident(String),
    Int(i64),
    Float(f64),
    /// An integer literal too large for 64 bits; reported once, then treated as 0.
    BadInt,
    Punct(&'static str),
    Eof,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub kind: TokenKind,
    pub span: Span,
    /// Whether the token is the first on its line (the parser resynchronizes on these).
    pub line_start: bool,
}

impl Token {
    pub fn describe(&self) -> String {
        match &self.kind {
            TokenKind::Ident(name) => format!("`{name}`"),
            TokenKind::Int(v) => format!("`{v}`"),
            TokenKind::Float(v) => format!("`{v}`"),
            TokenKind::BadInt => "a number".into(),
            TokenKind::Punct(p) => format!("`{p}`"),
            TokenKind::Eof => "the end of the file".into(),
        }
    }

    pub fn is_punct(&self, punct: &str) -> bool {
        matches!(self.kind, TokenKind::Punct(p) if p == punct)
    }

    pub fn is_ident(&self, name: &str) -> bool {
        matches!(&self.kind, TokenKind::Ident(n) if n == name)
    }
}

const PUNCTS: [&str; 25] = [
    "==", "!=", "<=", ">=", "&&", "||", "(", ")", "[", "]", "{", "}", ",", ":", ";", "=", ".", "+",
    "-", "*", "/", "%", "<", ">", "!",
];

/// Splits the source into tokens; the last is always `Eof`. Unknown characters and bad
/// numbers become diagnostics, and lexing goes on.
pub fn lex(source: &str) -> (Vec<Token>, Vec<Diagnostic>) {
    let mut tokens = Vec::new();
    let mut diagnostics = Vec::new();
    let bytes = source.as_bytes();
    let mut i = 0;
    let mut line_start = true;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'\n' {
            line_start = true;
            i += 1;
            continue;
        }
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'#' {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        let start = i;
        let kind = if c.is_ascii_alphabetic() || c == b'_' {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            TokenKind::Ident(source[start..i].to_string())
        } else if c.is_ascii_digit() {
            let (kind, end, problem) = number(source, start);
            i = end;
            if let Some(problem) = problem {
                diagnostics.push(Diagnostic::error(Span::new(start, end), problem));
            }
            kind
        } else if let Some(p) = PUNCTS.iter().find(|p| source[i..].starts_with(**p)) {
            i += p.len();
            TokenKind::Punct(p)
        } else {
            let ch = source[i..].chars().next().unwrap_or('?');
            i += ch.len_utf8();
            let message = if ch == '"' || ch == '\'' {
                "the language has no strings".to_string()
            } else if ch == '&' || ch == '|' {
                format!("unexpected `{ch}`; did you mean `{ch}{ch}`?")
            } else {
                format!("unexpected character `{}`", ch.escape_debug())
            };
            diagnostics.push(Diagnostic::error(Span::new(start, i), message));
            continue;
        };
        tokens.push(Token {
            kind,
            span: Span::new(start, i),
            line_start,
        });
        line_start = false;
    }
    tokens.push(Token {
        kind: TokenKind::Eof,
        span: Span::new(source.len(), source.len()),
        line_start: true,
    });
    (tokens, diagnostics)
}

/// Reads a number starting at `start`: `4096`, `4_096`, `1e-5`, `10000.0`, `1e6`.
fn number(source: &str, start: usize) -> (TokenKind, usize, Option<String>) {
    let bytes = source.as_bytes();
    let mut i = start;
    let mut is_float = false;
    let digits = |i: &mut usize| {
        while *i < bytes.len() && (bytes[*i].is_ascii_digit() || bytes[*i] == b'_') {
            *i += 1;
        }
    };
    digits(&mut i);
    if i + 1 < bytes.len() && bytes[i] == b'.' && bytes[i + 1].is_ascii_digit() {
        is_float = true;
        i += 1;
        digits(&mut i);
    }
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        let mut j = i + 1;
        if j < bytes.len() && (bytes[j] == b'+' || bytes[j] == b'-') {
            j += 1;
        }
        if j < bytes.len() && bytes[j].is_ascii_digit() {
            is_float = true;
            i = j;
            digits(&mut i);
        }
    }
    // A number glued to letters (`12ab`) is one bad token, not a number and a name.
    let mut bad_suffix = false;
    while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
        bad_suffix = true;
        i += 1;
    }
    let text: String = source[start..i].chars().filter(|&c| c != '_').collect();
    if bad_suffix {
        return (
            TokenKind::BadInt,
            i,
            Some(format!("`{}` is not a number", &source[start..i])),
        );
    }
    if is_float {
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() => (TokenKind::Float(v), i, None),
            _ => (
                TokenKind::BadInt,
                i,
                Some(format!("`{}` is too large", &source[start..i])),
            ),
        }
    } else {
        match text.parse::<i64>() {
            Ok(v) => (TokenKind::Int(v), i, None),
            Err(_) => (
                TokenKind::BadInt,
                i,
                Some(format!(
                    "the integer `{}` does not fit in 64 bits",
                    &source[start..i]
                )),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(source: &str) -> Vec<TokenKind> {
        lex(source).0.into_iter().map(|t| t.kind).collect()
    }

    #[test]
    fn lexes_numbers_and_operators() {
        assert_eq!(
            kinds("q-k<=4_096 # comment\n1e-5 2.5"),
            vec![
                TokenKind::Ident("q".into()),
                TokenKind::Punct("-"),
                TokenKind::Ident("k".into()),
                TokenKind::Punct("<="),
                TokenKind::Int(4096),
                TokenKind::Float(1e-5),
                TokenKind::Float(2.5),
                TokenKind::Eof,
            ]
        );
    }

    #[test]
    fn bad_characters_are_reported_and_skipped() {
        let (tokens, diagnostics) = lex("a @ b & c");
        assert_eq!(tokens.len(), 4);
        assert_eq!(diagnostics.len(), 2);
        assert!(diagnostics[1].message.contains("did you mean `&&`"));
    }

    #[test]
    fn huge_integers_are_reported() {
        let (_, diagnostics) = lex("99999999999999999999999");
        assert_eq!(diagnostics.len(), 1);
    }
}
