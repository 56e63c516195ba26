//! Tile schedules: the classification of tiles into empty (skipped), full (no mask
//! evaluation) and partial is never wrong, checked exhaustively on small lengths, and it is
//! tight: it visits exactly the tiles with a visible element, as the formulas say.

use std::ops::Range;
use zebra_ir::expr::{Env, Expr, Scalar, Var, parse_expr};

use zebra_ir::schedule::{
    Schedule, ScheduleInput, SideValues, Support, TileKind, build, build_heads,
};

const HEADS: usize = 2;

struct Point<'a> {
    q: usize,
    k: usize,
    h: usize,
    doc: &'a [i64],
}

impl Env for Point<'_> {
    fn var(&self, var: Var) -> Scalar {
        Scalar::Int(match var {
            Var::Q => self.q as i64,
            Var::K => self.k as i64,
            Var::H => self.h as i64,
            _ => 0,
        })
    }
    fn side(&self, _: &str, index: Var) -> i64 {
        self.doc[if index == Var::Q { self.q } else { self.k }]
    }
}

/// The static masks of the examples, with small parameters.
const MASKS: [(&str, &str); 10] = [
    ("causal", "k <= q"),
    ("sliding window", "k <= q && q - k < 5"),
    ("sinks", "k <= q && (q - k < 6 || k < 3)"),
    ("chunked", "k <= q && q / 8 == k / 8"),
    ("dilated", "k <= q && q - k < 4 * 2 && (q - k) % 2 == 0"),
    ("prefix-LM", "k <= q || k < 6"),
    ("bidirectional local", "abs(q - k) <= 3"),
    ("head-dependent", "k <= q && q - k < 4 * (h + 1)"),
    (
        "per-head tables",
        "k <= q && ([0, 1][h] == 1 || q - k < [3, 7][h] || k < [2, 0][h])",
    ),
    ("distance table", "k <= q && [1, 1, 0, 1, 0][q - k] == 1"),
];

fn schedule(
    mask: &Expr,
    t: usize,
    (bq, bk): (usize, usize),
    refine: bool,
    doc: Option<&[i64]>,
) -> Schedule {
    let support = Support::of(mask);
    let names = vec!["doc".to_string()];
    let values = doc.map(|d| SideValues {
        names: &names,
        values: vec![d],
    });
    build(&ScheduleInput {
        mask,
        support: &support,
        heads: HEADS,
        block_q: bq,
        block_k: bk,
        seq_len: t,
        sides: values.as_ref(),
        batch_row: 0,
        refine,
    })
}

/// How many elements of a tile are visible to `heads`, and how many it has.
fn visible(
    mask: &Expr,
    t: usize,
    (bq, bk): (usize, usize),
    (qt, kt): (usize, usize),
    doc: &[i64],
    heads: Range<usize>,
) -> (usize, usize) {
    let (mut seen, mut all) = (0, 0);
    for h in heads {
        for q in qt * bq..((qt + 1) * bq).min(t) {
            for k in kt * bk..((kt + 1) * bk).min(t) {
                all += 1;
                seen += usize::from(mask.eval(&Point { q, k, h, doc }).as_bool());
            }
        }
    }
    (seen, all)
}

/// Checks a schedule against the mask, tile by tile. Returns (non-empty, full) tile counts.
fn check_never_wrong(what: &str, mask: &Expr, s: &Schedule, doc: &[i64]) -> (usize, usize) {
    check_heads(what, mask, s, doc, 0..HEADS)
}

/// [`check_never_wrong`] for the schedule of some of the heads.
fn check_heads(
    what: &str,
    mask: &Expr,
    s: &Schedule,
    doc: &[i64],
    heads: Range<usize>,
) -> (usize, usize) {
    let (t, blocks) = (s.seq_len, (s.block_q, s.block_k));
    let (mut non_empty, mut full) = (0, 0);
    for qt in 0..t.div_ceil(blocks.0) {
        for kt in 0..t.div_ceil(blocks.1) {
            let (seen, all) = visible(mask, t, blocks, (qt, kt), doc, heads.clone());
            non_empty += usize::from(seen > 0);
            full += usize::from(seen == all);
            match s.rows[qt].tiles.iter().find(|(k, _)| *k as usize == kt) {
                None => assert_eq!(
                    seen, 0,
                    "{what}: tile ({qt}, {kt}) skipped but has visible elements"
                ),
                Some((_, TileKind::Full)) => assert_eq!(
                    seen, all,
                    "{what}: tile ({qt}, {kt}) marked full but has hidden elements"
                ),
                Some((_, TileKind::Partial)) => {}
            }
        }
    }
    (non_empty, full)
}

#[test]
fn classification_is_never_wrong_and_refined_schedules_are_exact() {
    for (name, text) in MASKS {
        let mask = parse_expr(text).unwrap();
        for blocks in [(4, 4), (8, 4), (4, 8), (8, 8), (16, 16)] {
            for t in 1..=40 {
                let what = format!("{name}, T = {t}, blocks {blocks:?}");
                let coarse = schedule(&mask, t, blocks, false, None);
                let (non_empty, full) = check_never_wrong(&what, &mask, &coarse, &[]);
                let exact = schedule(&mask, t, blocks, true, None);
                check_never_wrong(&what, &mask, &exact, &[]);
                assert_eq!(
                    exact.visited(),
                    non_empty,
                    "{what}: refined schedule visits an empty tile"
                );
                assert_eq!(
                    exact.count(TileKind::Full),
                    full,
                    "{what}: refined schedule misses a full tile"
                );
            }
        }
    }
}

/// Masks that read `h` get a schedule per head: each is never wrong for its head, exact
/// when refined, tight from value ranges alone for the per-head tables, and together they
/// visit fewer tiles than the one schedule shared by every head would.
#[test]
fn per_head_schedules_are_never_wrong_and_exact() {
    let per_head = MASKS
        .iter()
        .filter(|(_, m)| parse_expr(m).unwrap().depends_on_head());
    for (name, text) in per_head {
        let mask = parse_expr(text).unwrap();
        let mut fewer = false;
        for blocks in [(4, 4), (8, 4), (8, 8)] {
            for t in 1..=40 {
                for refine in [false, true] {
                    let support = Support::of(&mask);
                    let heads = build_heads(&ScheduleInput {
                        mask: &mask,
                        support: &support,
                        heads: HEADS,
                        block_q: blocks.0,
                        block_k: blocks.1,
                        seq_len: t,
                        sides: None,
                        batch_row: 0,
                        refine,
                    });
                    assert_eq!(heads.of_head.len(), HEADS, "{name}");
                    for h in 0..HEADS {
                        let what = format!("{name}, head {h}, T = {t}, blocks {blocks:?}");
                        let (non_empty, full) =
                            check_heads(&what, &mask, heads.of(h), &[], h..h + 1);
                        if refine || *name == "per-head tables" {
                            assert_eq!(heads.of(h).visited(), non_empty, "{what}");
                        }
                        if refine {
                            assert_eq!(heads.of(h).count(TileKind::Full), full, "{what}");
                        }
                    }
                    let shared = schedule(&mask, t, blocks, refine, None).visited() * HEADS;
                    let own = heads.visited_by_heads(HEADS);
                    assert!(own <= shared, "{name}, T = {t}: {own} > {shared}");
                    fewer |= own < shared;
                }
            }
        }
        assert!(fewer, "{name}: per-head schedules never visit fewer tiles");
    }
}

/// For these masks the value ranges alone are tight: no tile is visited that has nothing
/// visible, without evaluating any element (per-head tables: case by case). (Full tiles can hide behind correlated
/// conditions, `q - k < 6 || k < 3`; refined schedules find those.)
#[test]
fn value_ranges_alone_are_tight_for_band_masks() {
    for (name, text) in MASKS.iter().filter(|(n, _)| {
        [
            "causal",
            "sliding window",
            "sinks",
            "chunked",
            "prefix-LM",
            "bidirectional local",
            "per-head tables",
        ]
        .contains(n)
    }) {
        let mask = parse_expr(text).unwrap();
        for blocks in [(4, 4), (8, 4), (8, 8)] {
            for t in 1..=40 {
                let what = format!("{name}, T = {t}, blocks {blocks:?}");
                let coarse = schedule(&mask, t, blocks, false, None);
                let (non_empty, _) = check_never_wrong(&what, &mask, &coarse, &[]);
                assert_eq!(coarse.visited(), non_empty, "{what}");
            }
        }
    }
}

#[test]
fn visited_tiles_follow_the_formulas() {
    let b = 64;
    let n = |t: usize| t.div_ceil(b);
    // Causal: query tile i visits tiles 0..=i, the last one partial: n (n + 1) / 2 in all.
    let causal = parse_expr("k <= q").unwrap();
    for t in [64, 1000, 4096] {
        let s = schedule(&causal, t, (b, b), false, None);
        assert_eq!(s.visited(), n(t) * (n(t) + 1) / 2, "causal at {t}");
        assert_eq!(s.count(TileKind::Partial), n(t), "causal at {t}");
    }
    // A window of W keys: at most ceil((W - 1) / b) + 1 key tiles per query tile, whatever T.
    for w in [32i64, 64, 512, 1000] {
        let window = parse_expr(&format!("k <= q && q - k < {w}")).unwrap();
        let per_tile = ((w as usize - 1).div_ceil(b)) + 1;
        for t in [4096, 16384] {
            let s = schedule(&window, t, (b, b), false, None);
            assert!(
                s.rows.iter().all(|r| r.tiles.len() <= per_tile),
                "window {w} at {t}"
            );
            let steady = &s.rows[s.rows.len() - 1];
            assert_eq!(steady.tiles.len(), per_tile, "window {w} at {t}");
        }
        // In all: query tile i sees keys from i * b - (W - 1) to its own last one.
        for t in [8192, 16384] {
            let expected: usize = (0..n(t))
                .map(|i| {
                    let first = (i as i64 * b as i64 - (w - 1)).max(0) as usize / b;
                    i - first + 1
                })
                .sum();
            assert_eq!(
                schedule(&window, t, (b, b), false, None).visited(),
                expected,
                "window {w} at {t}"
            );
        }
    }
    // Chunked: only the diagonal chunk.
    let chunked = parse_expr("k <= q && q / 256 == k / 256").unwrap();
    let s = schedule(&chunked, 4096, (b, b), false, None);
    for (qt, row) in s.rows.iter().enumerate() {
        let chunk = qt * b / 256;
        assert!(
            row.tiles
                .iter()
                .all(|(kt, _)| *kt as usize * b / 256 == chunk),
            "query tile {qt}"
        );
        assert_eq!(row.tiles.len(), qt % 4 + 1);
    }
    // Sinks: the first tile plus the band.
    let sinks = parse_expr("k <= q && (q - k < 128 || k < 4)").unwrap();
    let s = schedule(&sinks, 4096, (b, b), false, None);
    for (qt, row) in s.rows.iter().enumerate().skip(3) {
        let tiles: Vec<u32> = row.tiles.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            tiles,
            vec![0, qt as u32 - 2, qt as u32 - 1, qt as u32],
            "query tile {qt}"
        );
    }
}

/// Masks over side inputs are classified at run time from per-tile ranges of the values.
#[test]
fn document_masks_are_classified_from_the_documents() {
    let mask = parse_expr("k <= q && doc[q] == doc[k]").unwrap();
    let mut state = 12345u64;
    for t in [1, 9, 40, 100] {
        for trial in 0..20 {
            // Documents of random lengths.
            let mut doc = Vec::with_capacity(t);
            let mut id = 0;
            for _ in 0..t {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if (state >> 33).is_multiple_of(3 + trial) {
                    id += 1;
                }
                doc.push(id);
            }
            for blocks in [(4, 4), (8, 8), (8, 4)] {
                let what = format!("documents {doc:?}, blocks {blocks:?}");
                let coarse = schedule(&mask, t, blocks, false, Some(&doc));
                check_never_wrong(&what, &mask, &coarse, &doc);
                let exact = schedule(&mask, t, blocks, true, Some(&doc));
                let (non_empty, _) = check_never_wrong(&what, &mask, &exact, &doc);
                assert_eq!(exact.visited(), non_empty, "{what}");
            }
        }
    }
    // One document per 64 tokens: each query tile visits only its own document's tiles.
    let doc: Vec<i64> = (0..4096).map(|i| i / 64).collect();
    let s = schedule(&mask, 4096, (64, 64), false, Some(&doc));
    assert_eq!(s.visited(), 64, "one tile per query tile");
}
