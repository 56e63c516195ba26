//! Rotary position embedding: its base and how its frequencies are scaled to extend a
//! model's context (position interpolation, Llama 3's per-frequency scaling, YaRN), as Hugging
//! Face transformers computes them, so that checkpoints trained with them run as trained.
//!
//! Every RoPE in Zebra is a table of cosines and sines per position and frequency pair; the
//! scaling only changes the pairs' frequencies (and, for YaRN, multiplies the table), so
//! everything downstream (kernels, KV caches, the backward) is the same for all of them.

use std::f64::consts::PI;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::expr::fmt_float;

/// A rotary position embedding: pair `i` of a head dim `D` turns by `p * inv_freq(i)` at
/// position `p`, with `inv_freq(i) = base^(-2i / D)` before scaling.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub base: f64,
    #[serde(default, skip_serializing_if = "RopeScaling::is_none")]
    pub scaling: RopeScaling,
}

/// How a RoPE's frequencies are scaled (Hugging Face's `rope_scaling`/`rope_parameters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    #[default]
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's: frequencies whose wavelength is longer than
    /// `original_max_position / low_freq_factor` divided by `factor`, those shorter than
    /// `original_max_position / high_freq_factor` kept, those between blended smoothly.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: u64,
    },
    /// YaRN: frequencies that turn fewer than `beta_slow` times over `original_max_position`
    /// positions divided by `factor`, those that turn more than `beta_fast` times kept, a
    /// linear ramp between (its ends rounded outwards when `truncate`); cosines and sines
    /// multiplied by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position: u64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
}

/// The parameters of each scaling, in the order the text forms write them.
pub const SCALINGS: [(&str, &[&str]); 3] = [
    ("linear", &["factor"]),
    (
        "llama3",
        &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position",
        ],
    ),
    (
        "yarn",
        &[
            "factor",
            "original_max_position",
            "beta_fast",
            "beta_slow",
            "attention_factor",
            "truncate",
        ],
    ),
];

/// The parameters of the scaling named `kind`, if there is one.
pub fn parameters(kind: &str) -> Option<&'static [&'static str]> {
    SCALINGS.iter().find(|(k, _)| *k == kind).map(|(_, p)| *p)
}

/// YaRN's default `attention_factor` for a scaling `factor`: `0.1 ln(factor) + 1`.
pub fn yarn_attention_factor(factor: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * factor.ln() + 1.0
    }
}

impl Rope {
    /// An unscaled RoPE.
    pub fn new(base: f64) -> Rope {
        Rope {
            base,
            scaling: RopeScaling::None,
        }
    }

    /// The frequency of each pair of a head dim `dim` (even), in radians per position.
    pub fn inv_freqs(&self, dim: usize) -> Vec<f64> {
        let unscaled = |i: usize| self.base.powf(-2.0 * i as f64 / dim as f64);
        let half = dim / 2;
        match self.scaling {
            RopeScaling::None => (0..half).map(unscaled).collect(),
            RopeScaling::Linear { factor } => (0..half).map(|i| unscaled(i) / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let old = original_max_position as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                (0..half)
                    .map(|i| {
                        let f = unscaled(i);
                        let wavelen = 2.0 * PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                // The pair index at which a frequency turns `rotations` times over the
                // original context.
                let correction = |rotations: f64| {
                    dim as f64 * (original_max_position as f64 / (rotations * 2.0 * PI)).ln()
                        / (2.0 * self.base.ln())
                };
                let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
                if low == high {
                    high += 0.001;
                }
                (0..half)
                    .map(|i| {
                        let f = unscaled(i);
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        f / factor * (1.0 - extrapolation) + f * extrapolation
                    })
                    .collect()
            }
        }
    }

    /// What cosines and sines are multiplied by (YaRN's attention factor; 1 otherwise).
    pub fn attention_factor(&self) -> f64 {
        match self.scaling {
            RopeScaling::Yarn {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        }
    }

    /// The cosine and sine tables `[len, dim / 2]` for positions `offset..offset + len`,
    /// in f64.
    pub fn tables(&self, dim: usize, offset: usize, len: usize) -> (Vec<f64>, Vec<f64>) {
        let freqs = self.inv_freqs(dim);
        let scale = self.attention_factor();
        let mut cos = Vec::with_capacity(len * freqs.len());
        let mut sin = Vec::with_capacity(len * freqs.len());
        for t in offset..offset + len {
            for f in &freqs {
                let angle = t as f64 * f;
                cos.push(angle.cos() * scale);
                sin.push(angle.sin() * scale);
            }
        }
        (cos, sin)
    }

    /// What is wrong with it, if anything: a base at most 1, a scaling factor below 1, ...
    pub fn check(&self) -> Result<(), String> {
        if self.base <= 1.0 || !self.base.is_finite() {
            return Err(format!(
                "the RoPE base must be above 1, found {}",
                self.base
            ));
        }
        self.scaling.check()
    }

    /// A key for identity: equal RoPEs, and only they, have equal keys (the base's bits,
    /// the scaling's place in [`SCALINGS`], its parameters' bits).
    pub fn key(&self) -> Vec<u64> {
        let (kind, values) = self.scaling.values();
        let tag = SCALINGS
            .iter()
            .position(|(k, _)| *k == kind)
            .map_or(0, |i| i as u64 + 1);
        [self.base.to_bits(), tag]
            .into_iter()
            .chain(values.iter().map(|v| v.to_bits()))
            .collect()
    }
}

impl RopeScaling {
    pub fn is_none(&self) -> bool {
        matches!(self, RopeScaling::None)
    }

    /// The scaling's name and its parameters' values, in the order of [`SCALINGS`] (a flag
    /// as 0 or 1).
    pub fn values(&self) -> (&'static str, Vec<f64>) {
        match *self {
            RopeScaling::None => ("none", vec![]),
            RopeScaling::Linear { factor } => ("linear", vec![factor]),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => (
                "llama3",
                vec![
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position as f64,
                ],
            ),
            RopeScaling::Yarn {
                factor,
                original_max_position,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => (
                "yarn",
                vec![
                    factor,
                    original_max_position as f64,
                    beta_fast,
                    beta_slow,
                    attention_factor,
                    f64::from(u8::from(truncate)),
                ],
            ),
        }
    }

    /// The scaling named `kind` with `value(name)` for each of its parameters, `None` where
    /// one is not given: YaRN's `beta_fast` (32), `beta_slow` (1), `attention_factor`
    /// ([`yarn_attention_factor`]) and `truncate` (1, true) then take their defaults, and
    /// any other is an error. An error names what is wrong.
    pub fn from_values(
        kind: &str,
        mut value: impl FnMut(&str) -> Option<f64>,
    ) -> Result<RopeScaling, String> {
        let Some(names) = parameters(kind) else {
            return Err(format!(
                "unknown RoPE scaling `{kind}`: the scalings are `linear`, `llama3` and `yarn`"
            ));
        };
        let factor = value("factor");
        let default = |name: &str| match (kind, name) {
            ("yarn", "beta_fast") => Some(32.0),
            ("yarn", "beta_slow") => Some(1.0),
            ("yarn", "attention_factor") => factor.map(yarn_attention_factor),
            ("yarn", "truncate") => Some(1.0),
            _ => None,
        };
        let mut get = |name: &str| {
            value(name)
                .or_else(|| default(name))
                .ok_or_else(|| format!("RoPE scaling `{kind}` needs `{name}`"))
        };
        let mut values = Vec::new();
        for name in names.iter() {
            values.push(get(name)?);
        }
        let position = |v: f64, name: &str| {
            if v.fract() == 0.0 && v >= 1.0 && v <= u32::MAX as f64 {
                Ok(v as u64)
            } else {
                Err(format!(
                    "`{name}` must be a positive whole number of positions, found {v}"
                ))
            }
        };
        let scaling = match kind {
            "linear" => RopeScaling::Linear { factor: values[0] },
            "llama3" => RopeScaling::Llama3 {
                factor: values[0],
                low_freq_factor: values[1],
                high_freq_factor: values[2],
                original_max_position: position(values[3], "original_max_position")?,
            },
            _ => RopeScaling::Yarn {
                factor: values[0],
                original_max_position: position(values[1], "original_max_position")?,
                beta_fast: values[2],
                beta_slow: values[3],
                attention_factor: values[4],
                truncate: match values[5] {
                    0.0 => false,
                    1.0 => true,
                    other => return Err(format!("`truncate` is 0 or 1, found {other}")),
                },
            },
        };
        scaling.check()?;
        Ok(scaling)
    }

    /// What is wrong with its parameters, if anything.
    pub fn check(&self) -> Result<(), String> {
        let (kind, values) = self.values();
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(format!("RoPE scaling `{kind}` has a parameter of {v}"));
        }
        match *self {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor }
            | RopeScaling::Llama3 { factor, .. }
            | RopeScaling::Yarn { factor, .. }
                if factor < 1.0 =>
            {
                Err(format!(
                    "a RoPE scaling factor must be at least 1 (it stretches the context), found {}",
                    fmt_float(factor)
                ))
            }
            RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } if !(low_freq_factor > 0.0 && high_freq_factor > low_freq_factor) => Err(format!(
                "llama3's `high_freq_factor` must be above its `low_freq_factor`, above 0 \
                 (found {} and {})",
                fmt_float(high_freq_factor),
                fmt_float(low_freq_factor)
            )),
            RopeScaling::Yarn {
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            } if !(beta_slow > 0.0 && beta_fast > 0.0 && attention_factor > 0.0) => Err(format!(
                "yarn's `beta_fast`, `beta_slow` and `attention_factor` must be above 0 (found \
                 {}, {} and {})",
                fmt_float(beta_fast),
                fmt_float(beta_slow),
                fmt_float(attention_factor)
            )),
            _ => Ok(()),
        }
    }
}

/// `linear(factor = 8.0)`, `llama3(factor = 8.0, ...)`: the language's form, which the IR's
/// text form quotes.
impl fmt::Display for RopeScaling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, values) = self.values();
        let Some(names) = parameters(kind) else {
            return f.write_str(kind);
        };
        let args: Vec<String> = names
            .iter()
            .zip(values)
            .map(|(name, v)| match *name {
                "original_max_position" => format!("{name} = {v}"),
                "truncate" => format!("{name} = {}", v != 0.0),
                _ => format!("{name} = {}", fmt_float(v)),
            })
            .collect();
        write!(f, "{kind}({})", args.join(", "))
    }
}

impl std::str::FromStr for RopeScaling {
    type Err = String;

    /// Reads what `Display` writes.
    fn from_str(text: &str) -> Result<RopeScaling, String> {
        let text = text.trim();
        let bad =
            || format!("expected a RoPE scaling such as `linear(factor = 4.0)`, found `{text}`");
        let (kind, rest) = text.split_once('(').ok_or_else(bad)?;
        let kind = kind.trim();
        let inner = rest.strip_suffix(')').ok_or_else(bad)?;
        let mut given = Vec::new();
        for arg in inner.split(',').filter(|a| !a.trim().is_empty()) {
            let (name, value) = arg.split_once('=').ok_or_else(bad)?;
            let value = match value.trim() {
                "true" => 1.0,
                "false" => 0.0,
                v => v.parse::<f64>().map_err(|_| bad())?,
            };
            given.push((name.trim().to_string(), value));
        }
        let scaling = RopeScaling::from_values(kind, |name| {
            given.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
        })?;
        let known = parameters(kind).unwrap_or_default();
        if let Some((name, _)) = given.iter().find(|(n, _)| !known.contains(&n.as_str())) {
            return Err(format!("RoPE scaling `{kind}` has no parameter `{name}`"));
        }
        Ok(scaling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3() -> RopeScaling {
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192,
        }
    }

    fn yarn() -> RopeScaling {
        RopeScaling::Yarn {
            factor: 4.0,
            original_max_position: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: yarn_attention_factor(4.0),
            truncate: true,
        }
    }

    #[test]
    fn unscaled_frequencies_are_powers_of_the_base() {
        let f = Rope::new(10000.0).inv_freqs(8);
        assert_eq!(f.len(), 4);
        for (i, x) in f.iter().enumerate() {
            assert!((x - 10f64.powi(-(i as i32))).abs() < 1e-12, "{i}: {x}");
        }
    }

    #[test]
    fn linear_divides_every_frequency() {
        let plain = Rope::new(500000.0).inv_freqs(64);
        let scaled = Rope {
            base: 500000.0,
            scaling: RopeScaling::Linear { factor: 4.0 },
        }
        .inv_freqs(64);
        for (a, b) in plain.iter().zip(&scaled) {
            assert!((a / 4.0 - b).abs() <= 1e-15 * a);
        }
    }

    #[test]
    fn llama3_keeps_high_frequencies_and_divides_low_ones() {
        // Llama 3.1 8B: base 500000, head dim 128.
        let rope = Rope {
            base: 500000.0,
            scaling: llama3(),
        };
        let plain = Rope::new(500000.0).inv_freqs(128);
        let scaled = rope.inv_freqs(128);
        let (mut kept, mut divided, mut blended) = (0, 0, 0);
        for (a, b) in plain.iter().zip(&scaled) {
            let wavelen = 2.0 * PI / a;
            if wavelen < 8192.0 / 4.0 {
                assert_eq!(a, b);
                kept += 1;
            } else if wavelen > 8192.0 {
                assert!((a / 8.0 - b).abs() <= 1e-15 * a);
                divided += 1;
            } else {
                assert!(*b < *a && *b > a / 8.0, "{a} -> {b}");
                blended += 1;
            }
        }
        assert!(
            kept > 0 && divided > 0 && blended > 0,
            "{kept} {divided} {blended}"
        );
        // Monotone: a longer wavelength never gets a higher frequency.
        assert!(scaled.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn yarn_ramps_from_kept_to_divided_and_scales_the_tables() {
        let rope = Rope {
            base: 10000.0,
            scaling: yarn(),
        };
        let plain = Rope::new(10000.0).inv_freqs(64);
        let scaled = rope.inv_freqs(64);
        assert_eq!(plain[0], scaled[0]);
        assert!((plain[31] / 4.0 - scaled[31]).abs() <= 1e-15 * plain[31]);
        let (cos, sin) = rope.tables(64, 0, 2);
        let m = yarn_attention_factor(4.0);
        assert!((cos[0] - m).abs() < 1e-15 && sin[0] == 0.0);
        assert!((cos[32] - m * scaled[0].cos()).abs() < 1e-15);
    }

    #[test]
    fn text_form_round_trips_and_errors_name_the_problem() {
        for s in [llama3(), yarn(), RopeScaling::Linear { factor: 2.5 }] {
            let text = s.to_string();
            assert_eq!(text.parse::<RopeScaling>().unwrap(), s, "{text}");
        }
        assert_eq!(
            llama3().to_string(),
            "llama3(factor = 8.0, low_freq_factor = 1.0, high_freq_factor = 4.0, \
             original_max_position = 8192)"
        );
        let err = |t: &str| t.parse::<RopeScaling>().unwrap_err();
        assert!(err("ntk(factor = 2.0)").contains("unknown RoPE scaling `ntk`"));
        assert!(err("linear()").contains("needs `factor`"));
        assert!(err("linear(factor = 0.5)").contains("at least 1"));
        assert!(err("linear(factor = 2.0, beta = 1.0)").contains("no parameter `beta`"));
        assert!(
            err("llama3(factor = 8.0, low_freq_factor = 4.0, high_freq_factor = 1.0, original_max_position = 8192)")
                .contains("high_freq_factor")
        );
        assert!(
            err("llama3(factor = 8.0, low_freq_factor = 1.0, high_freq_factor = 4.0, original_max_position = 0.5)")
                .contains("whole number")
        );
    }

    #[test]
    fn keys_tell_scalings_apart() {
        let a = Rope::new(10000.0);
        let b = Rope {
            base: 10000.0,
            scaling: RopeScaling::Linear { factor: 2.0 },
        };
        assert_ne!(a.key(), b.key());
        assert_eq!(b.key(), b.key());
    }
}
