//! The parser: tokens to a syntax tree, recovering after errors so that one run reports every
//! syntax error it can. After an error inside a field it skips to the next line; after an
//! error between items it skips to the next `attention`, `model` or `let`.

use crate::ast::*;
use crate::diag::{Diagnostic, Span};
use crate::lexer::{Token, TokenKind, lex};

/// Parses a source file. The tree holds every item that parsed; the diagnostics say what did
/// not.
pub fn parse(source: &str) -> (File, Vec<Diagnostic>) {
    let (tokens, diagnostics) = lex(source);
    let mut parser = Parser {
        tokens,
        pos: 0,
        diagnostics,
    };
    let file = parser.file();
    (file, parser.diagnostics)
}

/// Expressions nest at most this deep; deeper input is refused rather than overflowing the
/// stack.
const MAX_DEPTH: usize = 200;

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    diagnostics: Vec<Diagnostic>,
}

/// A parse failure whose diagnostic has already been recorded.
struct Reported;

type PResult<T> = Result<T, Reported>;

const ITEM_KEYWORDS: [&str; 3] = ["attention", "model", "let"];

impl Parser {
    fn peek(&self) -> &Token {
        &self.tokens[self.pos]
    }

    fn peek_at(&self, offset: usize) -> &Token {
        let last = self.tokens.len() - 1;
        &self.tokens[(self.pos + offset).min(last)]
    }

    fn advance(&mut self) -> Token {
        let token = self.tokens[self.pos].clone();
        if token.kind != TokenKind::Eof {
            self.pos += 1;
        }
        token
    }

    fn at_eof(&self) -> bool {
        self.peek().kind == TokenKind::Eof
    }

    fn error(&mut self, diagnostic: Diagnostic) -> Reported {
        self.diagnostics.push(diagnostic);
        Reported
    }

    fn unexpected(&mut self, what: &str) -> Reported {
        let token = self.peek().clone();
        let found = token.describe();
        self.error(
            Diagnostic::error(token.span, format!("expected {what}, found {found}"))
                .label(format!("expected {what}")),
        )
    }

    fn eat_punct(&mut self, punct: &str) -> Option<Span> {
        if self.peek().is_punct(punct) {
            Some(self.advance().span)
        } else {
            None
        }
    }

    fn expect_punct(&mut self, punct: &str) -> PResult<Span> {
        match self.eat_punct(punct) {
            Some(span) => Ok(span),
            None => Err(self.unexpected(&format!("`{punct}`"))),
        }
    }

    fn ident(&mut self, what: &str) -> PResult<Ident> {
        match &self.peek().kind {
            TokenKind::Ident(name) => {
                let name = name.clone();
                let span = self.advance().span;
                Ok(Ident { name, span })
            }
            _ => Err(self.unexpected(what)),
        }
    }

    /// Skips to the next token that starts a line (or a closing brace, or the end).
    fn skip_line(&mut self) {
        self.advance();
        while !self.at_eof() && !self.peek().line_start && !self.peek().is_punct("}") {
            self.advance();
        }
    }

    /// Skips to the next item keyword at the start of a line.
    fn skip_to_item(&mut self) {
        self.advance();
        while !self.at_eof() {
            let token = self.peek();
            if token.line_start && ITEM_KEYWORDS.iter().any(|k| token.is_ident(k)) {
                return;
            }
            self.advance();
        }
    }

    fn file(&mut self) -> File {
        let mut file = File::default();
        while !self.at_eof() {
            let token = self.peek().clone();
            let item = if token.is_ident("let") {
                self.let_item().map(Item::Let)
            } else if token.is_ident("attention") {
                self.attention().map(Item::Attention)
            } else if token.is_ident("model") {
                self.model().map(Item::Model)
            } else {
                let found = token.describe();
                let mut d = Diagnostic::error(
                    token.span,
                    format!("expected `attention`, `model` or `let`, found {found}"),
                )
                .label("not the start of an item");
                if token.is_punct("}") {
                    d = d.with_note("this `}` closes nothing");
                }
                Err(self.error(d))
            };
            match item {
                Ok(item) => file.items.push(item),
                Err(Reported) => self.skip_to_item(),
            }
        }
        file
    }

    fn let_item(&mut self) -> PResult<Let> {
        let start = self.advance().span;
        let name = self.ident("a name after `let`")?;
        self.expect_punct("=")?;
        let value = self.expr_field()?;
        Ok(Let {
            span: start.to(value.span),
            name,
            value,
        })
    }

    fn attention(&mut self) -> PResult<Attention> {
        let start = self.advance().span;
        let name = self.ident("the attention's name")?;
        let mut params = Vec::new();
        if self.eat_punct("(").is_some() {
            while self.eat_punct(")").is_none() {
                params.push(self.param()?);
                if self.eat_punct(",").is_none() {
                    self.expect_punct(")")?;
                    break;
                }
            }
        }
        let causality = match &self.peek().kind {
            TokenKind::Ident(word) if word == "causal" => {
                Some((Causality::Causal, self.advance().span))
            }
            TokenKind::Ident(word) if word == "bidirectional" => {
                Some((Causality::Bidirectional, self.advance().span))
            }
            TokenKind::Punct("{") => {
                let span = self.peek().span;
                self.error(
                    Diagnostic::error(
                        span,
                        format!(
                            "say whether attention `{}` is `causal` or `bidirectional`",
                            name.name
                        ),
                    )
                    .label("expected `causal` or `bidirectional` before `{`"),
                );
                None
            }
            _ => return Err(self.unexpected("`causal`, `bidirectional` or `(`")),
        };
        let (fields, end) = self.block()?;
        Ok(Attention {
            name,
            params,
            causality,
            fields,
            span: start.to(end),
        })
    }

    fn param(&mut self) -> PResult<Param> {
        let name = self.ident("a parameter name")?;
        let mut span = name.span;
        let mut ty = None;
        if self.eat_punct(":").is_some() {
            let word = self.ident("a type (`int`, `float` or `int[T]`)")?;
            let mut ty_span = word.span;
            let kind = match word.name.as_str() {
                "int" if self.peek().is_punct("[") => {
                    self.advance();
                    let t = self.ident("`T`")?;
                    if t.name != "T" {
                        return Err(self.error(
                            Diagnostic::error(t.span, "side inputs are per token: write `int[T]`")
                                .label("expected `T`"),
                        ));
                    }
                    ty_span = ty_span.to(self.expect_punct("]")?);
                    ParamType::Side
                }
                "int" => ParamType::Int,
                "float" => ParamType::Float,
                other => {
                    return Err(self.error(
                        Diagnostic::error(word.span, format!("unknown type `{other}`"))
                            .label("expected `int`, `float` or `int[T]`"),
                    ));
                }
            };
            span = span.to(ty_span);
            ty = Some((kind, ty_span));
        }
        let mut default = None;
        if self.eat_punct("=").is_some() {
            let value = self.expr(0)?;
            span = span.to(value.span);
            default = Some(value);
        }
        if ty.is_none() && default.is_none() {
            return Err(self.error(
                Diagnostic::error(
                    name.span,
                    format!("parameter `{}` needs a type or a default", name.name),
                )
                .label("write `name: int`, `name: float`, `name: int[T]` or `name = value`"),
            ));
        }
        Ok(Param {
            name,
            ty,
            default,
            span,
        })
    }

    fn model(&mut self) -> PResult<Model> {
        let start = self.advance().span;
        let name = self.ident("the model's name")?;
        let (fields, end) = self.block()?;
        Ok(Model {
            name,
            fields,
            span: start.to(end),
        })
    }

    /// `{ field* }`: returns the fields that parsed and the closing brace's span.
    fn block(&mut self) -> PResult<(Vec<Field>, Span)> {
        let open = self.expect_punct("{")?;
        let mut fields = Vec::new();
        loop {
            if let Some(close) = self.eat_punct("}") {
                return Ok((fields, close));
            }
            if self.at_eof()
                || (self.peek().line_start
                    && ITEM_KEYWORDS.iter().any(|k| self.peek().is_ident(k))
                    && self.peek_at(1).kind != TokenKind::Punct("="))
            {
                let here = self.peek().span;
                return Err(self.error(
                    Diagnostic::error(open, "this `{` is never closed")
                        .label("unclosed `{`")
                        .with_secondary(here, "expected `}` before this"),
                ));
            }
            let before = self.pos;
            let parsed = self.field();
            let stuck = parsed.is_err() && self.pos == before;
            if let Ok(field) = parsed {
                fields.push(field);
            }
            // Resynchronize on the next line; always move past a token that failed to start
            // a field, or this loop would never end.
            if stuck || (!self.peek().line_start && !self.peek().is_punct("}")) {
                self.skip_line();
            }
        }
    }

    fn field(&mut self) -> PResult<Field> {
        let name = self.ident("a field name")?;
        let mut qualifier = None;
        if self.eat_punct(".").is_some() {
            qualifier = Some(self.ident("an attention kind after `.`")?);
        }
        let equals = if self.peek().is_punct(":") {
            // `vocab: 256`: report it, then read on as if it were `=`.
            let span = self.advance().span;
            self.error(
                Diagnostic::error(
                    span,
                    format!("expected `=` after `{}`, found `:`", name.name),
                )
                .label("fields are written `name = value`"),
            );
            span
        } else {
            self.expect_punct("=")?
        };
        // A value that fails to parse still records the field, so that the checker does not
        // also report it missing.
        let value = self
            .expr_field()
            .unwrap_or_else(|Reported| Expr::new(ExprKind::Error, equals));
        Ok(Field {
            span: name.span.to(value.span),
            name,
            qualifier,
            value,
        })
    }

    /// An expression that ends a field: the next token must start a new line (or be `}`).
    fn expr_field(&mut self) -> PResult<Expr> {
        let value = self.expr(0)?;
        self.eat_punct(";");
        let next = self.peek();
        if !next.line_start && !next.is_punct("}") {
            return Err(self.unexpected("an operator or a new line"));
        }
        Ok(value)
    }

    fn binop(&self) -> Option<BinOp> {
        match &self.peek().kind {
            TokenKind::Punct(p) => BinOp::from_symbol(p),
            _ => None,
        }
    }

    fn expr(&mut self, depth: usize) -> PResult<Expr> {
        self.binary(0, depth)
    }

    fn check_depth(&mut self, depth: usize) -> PResult<()> {
        if depth > MAX_DEPTH {
            let span = self.peek().span;
            return Err(self.error(Diagnostic::error(span, "the expression nests too deeply")));
        }
        Ok(())
    }

    fn binary(&mut self, min_precedence: u8, depth: usize) -> PResult<Expr> {
        self.check_depth(depth)?;
        let mut lhs = self.unary(depth + 1)?;
        while let Some(op) = self.binop() {
            let precedence = op.precedence();
            if precedence < min_precedence {
                break;
            }
            let op_span = self.advance().span;
            let rhs = self.binary(precedence + 1, depth + 1)?;
            if op.to_ir().is_comparison() && self.binop().is_some_and(|o| o.to_ir().is_comparison())
            {
                let next = self.peek().span;
                return Err(self.error(
                    Diagnostic::error(next, "comparisons do not chain")
                        .label("a second comparison")
                        .with_secondary(op_span, "after this one")
                        .with_note("write `a < b && b < c`"),
                ));
            }
            let span = lhs.span.to(rhs.span);
            lhs = Expr::new(ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)), span);
        }
        Ok(lhs)
    }

    fn unary(&mut self, depth: usize) -> PResult<Expr> {
        self.check_depth(depth)?;
        let op = if self.peek().is_punct("-") {
            Some(UnOp::Neg)
        } else if self.peek().is_punct("!") {
            Some(UnOp::Not)
        } else {
            None
        };
        match op {
            Some(op) => {
                let start = self.advance().span;
                let operand = self.unary(depth + 1)?;
                let span = start.to(operand.span);
                Ok(Expr::new(ExprKind::Unary(op, Box::new(operand)), span))
            }
            None => self.postfix(depth),
        }
    }

    fn postfix(&mut self, depth: usize) -> PResult<Expr> {
        let token = self.peek().clone();
        match token.kind {
            TokenKind::Int(v) => {
                self.advance();
                Ok(Expr::new(ExprKind::Int(v), token.span))
            }
            TokenKind::Float(v) => {
                self.advance();
                Ok(Expr::new(ExprKind::Float(v), token.span))
            }
            TokenKind::BadInt => {
                // The lexer has reported it.
                self.advance();
                Ok(Expr::new(ExprKind::Error, token.span))
            }
            TokenKind::Ident(ref name) => {
                self.advance();
                let ident = Ident {
                    name: name.clone(),
                    span: token.span,
                };
                // A call or an index must start on the name's line.
                if self.peek().is_punct("(") && !self.peek().line_start {
                    self.call(ident, depth)
                } else if self.peek().is_punct("[") && !self.peek().line_start {
                    self.advance();
                    let index = self.expr(depth + 1)?;
                    let close = self.expect_punct("]")?;
                    Ok(Expr::new(
                        ExprKind::Index(ident, Box::new(index)),
                        token.span.to(close),
                    ))
                } else {
                    Ok(Expr::new(ExprKind::Name(name.clone()), token.span))
                }
            }
            TokenKind::Punct("(") => {
                self.advance();
                let inner = self.expr(depth + 1)?;
                let close = self.expect_punct(")")?;
                Ok(Expr::new(inner.kind, token.span.to(close)))
            }
            TokenKind::Punct("[") => {
                self.advance();
                let mut items = Vec::new();
                let close = loop {
                    if let Some(close) = self.eat_punct("]") {
                        break close;
                    }
                    items.push(self.expr(depth + 1)?);
                    if self.eat_punct(",").is_none() {
                        break self.expect_punct("]")?;
                    }
                };
                if self.peek().is_punct("[") && !self.peek().line_start {
                    let open = self.peek().span;
                    return Err(self.error(
                        Diagnostic::error(open, "a list written in place cannot be indexed")
                            .label("name it first: `let name = [...]`, then read `name[index]`"),
                    ));
                }
                Ok(Expr::new(ExprKind::List(items), token.span.to(close)))
            }
            _ => Err(self.unexpected("an expression")),
        }
    }

    fn call(&mut self, callee: Ident, depth: usize) -> PResult<Expr> {
        self.advance();
        let mut args = Vec::new();
        let close = loop {
            if let Some(close) = self.eat_punct(")") {
                break close;
            }
            let named =
                matches!(self.peek().kind, TokenKind::Ident(_)) && self.peek_at(1).is_punct("=");
            let name = if named {
                let name = self.ident("an argument name")?;
                self.advance();
                Some(name)
            } else {
                None
            };
            let value = self.expr(depth + 1)?;
            args.push(Arg { name, value });
            if self.eat_punct(",").is_none() {
                break self.expect_punct(")")?;
            }
        };
        let span = callee.span.to(close);
        Ok(Expr::new(ExprKind::Call(callee, args), span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_attention_and_a_model() {
        let source = "attention local(window: int = 4) causal {\n  mask = k <= q && q - k < window\n}\nmodel m {\n  layers = 2 * [global, local(window = 8)]\n}\n";
        let (file, diagnostics) = parse(source);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        assert_eq!(file.items.len(), 2);
    }

    #[test]
    fn reports_several_errors_in_one_run() {
        let source = "attention a causal {\n  mask = k <= )\n  score = 1 +\n}\nmodel m {\n  dim: 4\n  heads = 2\n}\n";
        let (file, diagnostics) = parse(source);
        assert_eq!(diagnostics.len(), 3, "{diagnostics:#?}");
        assert_eq!(file.items.len(), 2);
    }

    #[test]
    fn a_field_that_does_not_start_with_a_name_is_skipped() {
        let (file, diagnostics) = parse("model m {\n  5 = 3\n  dim = 4\n}\n");
        assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
        let Item::Model(model) = &file.items[0] else {
            panic!("a model")
        };
        assert_eq!(model.fields.len(), 1);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let source = format!("let x = {}1{}", "(".repeat(10_000), ")".repeat(10_000));
        let (_, diagnostics) = parse(&source);
        assert!(!diagnostics.is_empty());
    }
}
