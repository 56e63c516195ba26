//! Choosing the next token from logits: greedy (temperature 0), or sampling at a temperature
//! from the `top_k` most likely tokens and the smallest set whose probability reaches
//! `top_p` (nucleus sampling), with a seeded generator so that a seed repeats a sample.

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// How to pick tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0: always the most likely token.
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the most likely tokens until their probability reaches `top_p` (1: all).
    pub top_p: f64,
}

impl Sampling {
    /// Checks the settings, naming the flag that is wrong.
    pub fn check(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "--temperature must be 0 (greedy) or positive, found {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p must be in (0, 1], found {}", self.top_p));
        }
        Ok(())
    }
}

/// A seeded sampler.
pub struct Sampler {
    pub sampling: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(sampling: Sampling, seed: u64) -> Sampler {
        Sampler {
            sampling,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The next token for these logits.
    pub fn next(&mut self, logits: &[f32]) -> usize {
        let greedy = || {
            logits
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
                    if x > best.1 { (i, x) } else { best }
                })
                .0
        };
        let s = self.sampling;
        if s.temperature == 0.0 {
            return greedy();
        }
        let mut order: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        if order.is_empty() {
            return greedy();
        }
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if s.top_k > 0 {
            order.truncate(s.top_k);
        }
        let top = f64::from(logits[order[0]]);
        let mut weights: Vec<f64> = order
            .iter()
            .map(|&i| ((f64::from(logits[i]) - top) / s.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut kept = 0.0;
        let mut keep = weights.len();
        for (n, w) in weights.iter().enumerate() {
            kept += w / total;
            if kept >= s.top_p {
                keep = n + 1;
                break;
            }
        }
        weights.truncate(keep);
        let total: f64 = weights.iter().sum();
        let mut pick = self.rng.random::<f64>() * total;
        for (n, w) in weights.iter().enumerate() {
            if pick < *w {
                return order[n];
            }
            pick -= w;
        }
        order[keep - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f64, top_k: usize, top_p: f64, seed: u64) -> Sampler {
        Sampler::new(
            Sampling {
                temperature,
                top_k,
                top_p,
            },
            seed,
        )
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut s = sampler(0.0, 0, 1.0, 1);
        assert_eq!(s.next(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn top_k_and_top_p_limit_the_choice() {
        let logits = [2.0, 1.9, 1.8, -5.0, 1.7];
        let mut k = sampler(5.0, 2, 1.0, 3);
        let mut p = sampler(1.0, 0, 0.2, 3);
        for _ in 0..200 {
            assert!(k.next(&logits) < 2);
            assert_eq!(p.next(&logits), 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_repeats_with_a_seed() {
        let logits = [0.0f32, (3.0f32).ln()];
        let mut s = sampler(1.0, 0, 1.0, 9);
        let ones = (0..4000).filter(|_| s.next(&logits) == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
        let draw = |seed| {
            let mut s = sampler(0.8, 0, 0.9, seed);
            (0..50)
                .map(|_| s.next(&[0.3, 0.1, 0.2, 0.0]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(4), draw(4));
        assert_ne!(draw(4), draw(5));
    }

    #[test]
    fn bad_settings_name_their_flag() {
        let bad = Sampling {
            temperature: -1.0,
            top_k: 0,
            top_p: 1.0,
        };
        assert!(bad.check().unwrap_err().contains("--temperature"));
        let bad = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.0,
        };
        assert!(bad.check().unwrap_err().contains("--top-p"));
    }
}
