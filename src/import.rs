//! `zebra import`: a model's source (.zb) from a Hugging Face configuration (`config.json`)
//! of the Llama family, optionally with its layers rearranged into Zebra's groups of local
//! layers and one global layer, the paper's starting point for long-context adaptation.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use zebra_ir::rope::{Rope, RopeScaling};

/// How the imported model's layers attend.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layout {
    /// As the configuration says: every layer global, or every layer a sliding window when
    /// it has one (Mistral's `sliding_window`).
    AsConfigured,
    /// Zebra: groups of `group` layers, one global and the others a window of `window` keys
    /// (the query included); the global layer first in each group (the authors' layout) or
    /// last (Gemma 3's).
    Zebra {
        group: usize,
        window: usize,
        global_last: bool,
    },
}

/// Parses `--zebra G:W`.
pub fn parse_zebra(text: &str) -> Result<(usize, usize), String> {
    let bad = || {
        format!(
            "`{text}` is not a Zebra layout: give the group size and the window as G:W, e.g. \
             4:513 (groups of 4 layers, windows of 513 keys)"
        )
    };
    let (g, w) = text.split_once(':').ok_or_else(bad)?;
    let group: usize = g.trim().parse().map_err(|_| bad())?;
    let window: usize = w.trim().parse().map_err(|_| bad())?;
    if group < 2 {
        return Err(format!(
            "a Zebra group needs at least 2 layers (one global, the rest local), found {group}"
        ));
    }
    if window == 0 {
        return Err("a window of 0 keys lets no query see anything".into());
    }
    Ok((group, window))
}

/// The configuration file of `path`: `path` itself, or `config.json` in a model folder.
pub fn config_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    }
}

/// A model name from a folder's name (`Llama-2-7b-hf` → `llama_2_7b_hf`).
pub fn name_from(path: &Path) -> String {
    let folder = if path.is_dir() {
        path.canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_owned()))
    } else {
        path.canonicalize()
            .ok()
            .and_then(|p| p.parent().and_then(|p| p.file_name()).map(|n| n.to_owned()))
    };
    let raw = folder.map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    name = name.trim_matches('_').to_string();
    if name.is_empty() {
        return "imported".into();
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        name.insert_str(0, "m_");
    }
    name
}

/// The configuration's settings a Llama-family model needs.
struct Config<'a> {
    json: &'a serde_json::Map<String, Value>,
    path: &'a Path,
}

impl Config<'_> {
    fn error(&self, message: String) -> anyhow::Error {
        anyhow!("{}: {message}", self.path.display())
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn count(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) if n > 0 => Ok(Some(n)),
                _ => Err(self.error(format!("`{key}` must be a positive integer, found {v}"))),
            },
        }
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.count(key)?
            .ok_or_else(|| self.error(format!("it has no `{key}`")))
    }

    fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x > 0.0 && x.is_finite() => Ok(Some(x)),
                _ => Err(self.error(format!("`{key}` must be a positive number, found {v}"))),
            },
        }
    }

    fn flag(&self, key: &str) -> Result<bool> {
        match self.get(key) {
            None => Ok(false),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.error(format!("`{key}` must be true or false, found {v}"))),
        }
    }

    /// The RoPE: its base (`rope_theta`, or `rope_parameters.rope_theta` in transformers 5)
    /// and its scaling (`rope_scaling`, or `rope_parameters` in transformers 5): `linear`,
    /// `llama3` and `yarn` are computed as transformers computes them; others are refused.
    fn rope(&self) -> Result<Rope> {
        let mut scaling = RopeScaling::None;
        for key in ["rope_scaling", "rope_parameters"] {
            let Some(params) = self.get(key) else {
                continue;
            };
            let kind = params
                .get("rope_type")
                .or_else(|| params.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind == "default" {
                continue;
            }
            if let Some(partial) = params
                .get("partial_rotary_factor")
                .or_else(|| self.get("partial_rotary_factor"))
                .and_then(Value::as_f64)
                .filter(|p| *p != 1.0)
            {
                return Err(self.error(format!(
                    "its RoPE rotates part of each head (`partial_rotary_factor` {partial}); \
                     Zebra's rotates all of it"
                )));
            }
            scaling = self.rope_scaling(key, kind, params)?;
        }
        let nested = self
            .get("rope_parameters")
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64);
        let base = match nested {
            Some(theta) if theta > 1.0 && theta.is_finite() => theta,
            Some(theta) => {
                return Err(self.error(format!(
                    "`rope_parameters.rope_theta` must be a number above 1, found {theta}"
                )));
            }
            None => self.number("rope_theta")?.unwrap_or(10000.0),
        };
        Ok(Rope { base, scaling })
    }

    /// The scaling `kind` that `params` (the configuration's `key`) describe.
    fn rope_scaling(&self, key: &str, kind: &str, params: &Value) -> Result<RopeScaling> {
        let number = |name: &str| params.get(name).and_then(Value::as_f64);
        let max_position = self.number("max_position_embeddings")?;
        let (factor, original) = match kind {
            "linear" | "llama3" => (number("factor"), number("original_max_position_embeddings")),
            "yarn" => {
                // As transformers reads it: the original context defaults to the model's,
                // the factor to the ratio of the two.
                let original = number("original_max_position_embeddings").or(max_position);
                let factor =
                    number("factor").or_else(|| max_position.zip(original).map(|(m, o)| m / o));
                (factor, original)
            }
            _ => {
                return Err(self.error(format!(
                    "its RoPE is scaled by `{kind}` (`{key}`); Zebra computes the `linear`, \
                     `llama3` and `yarn` scalings, so this model would not compute what it \
                     was trained to"
                )));
            }
        };
        // DeepSeek's: the ratio of two `mscale`s where both are given (else YaRN's default).
        let attention_factor = number("attention_factor").or_else(|| {
            let (f, m, all) = (factor?, number("mscale")?, number("mscale_all_dim")?);
            let mscale = |m: f64| {
                if f <= 1.0 {
                    1.0
                } else {
                    0.1 * m * f.ln() + 1.0
                }
            };
            (m != 0.0 && all != 0.0).then(|| mscale(m) / mscale(all))
        });
        let truncate = match params.get("truncate") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(f64::from(u8::from(*b))),
            Some(other) => {
                return Err(self.error(format!(
                    "`{key}.truncate` must be true or false, found {other}"
                )));
            }
        };
        RopeScaling::from_values(kind, |name| match name {
            "factor" => factor,
            "original_max_position" => original,
            "low_freq_factor" => number("low_freq_factor"),
            "high_freq_factor" => number("high_freq_factor"),
            "beta_fast" => number("beta_fast"),
            "beta_slow" => number("beta_slow"),
            "attention_factor" => attention_factor,
            "truncate" => truncate,
            _ => None,
        })
        .map_err(|e| {
            let e = e.replace("original_max_position", "original_max_position_embeddings");
            self.error(format!("its RoPE scaling (`{key}`): {e}"))
        })
    }

    /// A list of `layers` entries under `key`, if the configuration has one.
    fn per_layer(&self, key: &str, layers: usize) -> Result<Option<&Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(list)) if list.len() == layers => Ok(Some(list)),
            Some(other) => Err(self.error(format!(
                "`{key}` must list each of the {layers} layers, found {other}"
            ))),
        }
    }

    /// Whether each layer rotates its queries and keys: all of them, except SmolLM3's NoPE
    /// layers (`no_rope_layers`, 0 for none; by default every `no_rope_layer_interval`-th,
    /// 4, as transformers makes them).
    fn layers_with_rope(&self, model_type: &str, layers: usize) -> Result<Vec<bool>> {
        if model_type != "smollm3" {
            return Ok(vec![true; layers]);
        }
        match self.per_layer("no_rope_layers", layers)? {
            Some(list) => list
                .iter()
                .map(|v| match v.as_u64() {
                    Some(0) => Ok(false),
                    Some(1) => Ok(true),
                    _ => Err(self.error(format!(
                        "`no_rope_layers` holds 1 (RoPE) or 0 (none) per layer, found {v}"
                    ))),
                })
                .collect(),
            None => {
                let interval = self.count("no_rope_layer_interval")?.unwrap_or(4);
                Ok((0..layers).map(|l| (l + 1) % interval != 0).collect())
            }
        }
    }

    /// Whether each layer attends through the sliding window, as transformers' class for
    /// `model_type` reads it: none in Llama (which has no window), all in Mistral when it has
    /// a window (its class reads no `layer_types`); in Ministral, SmolLM3 and the Qwens as
    /// `layer_types` says (`full_attention` or `sliding_attention`), without it every layer
    /// when the model has a window in Ministral, in SmolLM3 its NoPE layers when
    /// `use_sliding_window`, and in the Qwens the layers from `max_window_layers` (28) on.
    /// (`window` is the window in effect: a Qwen's only with `use_sliding_window`.)
    fn sliding_layers(
        &self,
        model_type: &str,
        layers: usize,
        window: Option<usize>,
        with_rope: &[bool],
    ) -> Result<Vec<bool>> {
        let layer_types = match model_type {
            "llama" => return Ok(vec![false; layers]),
            "mistral" => None,
            _ => self.per_layer("layer_types", layers)?,
        };
        let windowed: Vec<bool> = match layer_types {
            Some(list) => list
                .iter()
                .map(|v| match v.as_str() {
                    Some("full_attention") => Ok(false),
                    Some("sliding_attention") => Ok(true),
                    _ => Err(self.error(format!(
                        "`layer_types` holds `full_attention` or `sliding_attention` per layer, \
                         found {v}"
                    ))),
                })
                .collect::<Result<_>>()?,
            None if model_type == "smollm3" => {
                let on = self.flag("use_sliding_window")? && window.is_some();
                with_rope.iter().map(|r| on && !r).collect()
            }
            None if is_qwen(model_type) => {
                let first = self.count("max_window_layers")?.unwrap_or(28);
                (0..layers)
                    .map(|l| window.is_some() && l >= first)
                    .collect()
            }
            None => vec![window.is_some(); layers],
        };
        if window.is_none() && windowed.contains(&true) {
            return Err(self.error(
                "`layer_types` has sliding layers but the model has no `sliding_window`".into(),
            ));
        }
        Ok(windowed)
    }
}

/// A layer pattern for one attention kind per layer: the shortest group that repeats, its
/// runs of one kind counted (`8 * [global, 3 * local]`).
fn pattern(kinds: &[&str]) -> String {
    let n = kinds.len();
    let period = (1..=n)
        .find(|p| n.is_multiple_of(*p) && (0..n).all(|l| kinds[l] == kinds[l % p]))
        .unwrap_or(n);
    let mut runs: Vec<String> = Vec::new();
    let mut l = 0;
    while l < period {
        let run = kinds[l..period]
            .iter()
            .take_while(|k| **k == kinds[l])
            .count();
        runs.push(match run {
            1 => kinds[l].to_string(),
            _ => format!("{run} * {}", kinds[l]),
        });
        l += run;
    }
    match n / period {
        1 if n > 1 => format!("[{}]", runs.join(", ")),
        repeats => format!("{repeats} * [{}]", runs.join(", ")),
    }
}

/// Whether `model_type` is one of the Qwens Zebra reads, whose window is in effect only with
/// `use_sliding_window`.
fn is_qwen(model_type: &str) -> bool {
    matches!(model_type, "qwen2" | "qwen3")
}

/// The attention projections with a bias, as transformers' class for `model_type` builds
/// them: Q, K and V in Qwen2; all four with `attention_bias` in Llama, SmolLM3 and Qwen3;
/// none in Mistral and Ministral.
fn attention_biases(config: &Config, model_type: &str) -> Result<&'static str> {
    Ok(match model_type {
        "qwen2" => "[q, k, v]",
        "llama" | "smollm3" | "qwen3" if config.flag("attention_bias")? => "[q, k, v, o]",
        _ => "",
    })
}

/// A model's source for the Llama-family configuration `json` (read from `path`, which
/// errors name): Llama, Mistral, Ministral, SmolLM3, Qwen2 and Qwen3 (`model_type`), with
/// SiLU SwiGLU, RMSNorm, RoPE (scaled as `linear`, `llama3` or `yarn`, or not at all;
/// SmolLM3's NoPE layers without), the attention's biases where the model has them, Qwen3's
/// QK-norm, each layer global or a sliding window (`layer_types`); anything else is refused
/// with the setting that is not supported.
pub fn source_from_config(json: &Value, path: &Path, name: &str, layout: Layout) -> Result<String> {
    let map = json
        .as_object()
        .ok_or_else(|| anyhow!("{}: not a configuration (a JSON object)", path.display()))?;
    let config = Config { json: map, path };
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| config.error("it has no `model_type`".into()))?;
    if !matches!(
        model_type,
        "llama" | "mistral" | "ministral" | "smollm3" | "qwen2" | "qwen3"
    ) {
        return Err(config.error(format!(
            "`model_type` is `{model_type}`; zebra import reads the Llama family (`llama`, \
             `mistral`, `ministral`, `smollm3`, `qwen2`, `qwen3`): RMSNorm, RoPE, SwiGLU, \
             grouped-query attention"
        )));
    }
    if matches!(model_type, "llama" | "smollm3") && config.flag("mlp_bias")? {
        return Err(config
            .error("`mlp_bias` is true; Zebra's feed-forward projections have no biases".into()));
    }
    let biases = attention_biases(&config, model_type)?;
    for key in ["hidden_act", "hidden_activation"] {
        if let Some(act) = config.get(key)
            && act.as_str() != Some("silu")
        {
            return Err(config.error(format!("`{key}` is {act}; Zebra's FFN is SwiGLU (silu)")));
        }
    }
    let vocab = config.required("vocab_size")?;
    let dim = config.required("hidden_size")?;
    let heads = config.required("num_attention_heads")?;
    let layers = config.required("num_hidden_layers")?;
    let hidden = config.required("intermediate_size")?;
    let kv_heads = config.count("num_key_value_heads")?.unwrap_or(heads);
    let head_dim = config.count("head_dim")?;
    let eps = config.number("rms_norm_eps")?.unwrap_or(1e-6);
    let smollm3 = model_type == "smollm3";
    let mut rope = config.rope()?;
    if smollm3 && config.get("rope_theta").is_none() && !config.json.contains_key("rope_parameters")
    {
        rope.base = 2_000_000.0; // SmolLM3's default
    }
    let tied = match config.get("tie_word_embeddings") {
        None => smollm3, // SmolLM3 ties them unless it says otherwise
        Some(_) => config.flag("tie_word_embeddings")?,
    };
    let mut sliding = config.count("sliding_window")?;
    if is_qwen(model_type) && !config.flag("use_sliding_window")? {
        sliding = None; // as transformers reads a Qwen's configuration
    }
    let with_rope = config.layers_with_rope(model_type, layers)?;

    let mut text = format!("# Imported by `zebra import` from {}.\n", path.display());
    // Per layer: whether it attends through a window, and to how many keys.
    let (windowed, window) = match layout {
        Layout::AsConfigured => {
            let windowed = config.sliding_layers(model_type, layers, sliding, &with_rope)?;
            // Hugging Face's sliding window of W lets a query see W keys, itself included:
            // `q - k < W`, Zebra's convention too.
            (windowed, sliding)
        }
        Layout::Zebra {
            group,
            window,
            global_last,
        } => {
            if layers % group != 0 {
                bail!(
                    "--zebra {group}:{window}: the model has {layers} layers, not a multiple of \
                     groups of {group}"
                );
            }
            let position = if global_last { "last" } else { "first" };
            text.push_str(&format!(
                "# Rearranged into Zebra's layout: groups of {group} layers, the global one \
                 {position},\n# the others a window of {window} keys (the query included). \
                 A checkpoint of this\n# configuration attends globally in every layer: \
                 continue training it to adapt\n# (zebra train this.zb --init-from WEIGHTS).\n"
            ));
            let global_at = if global_last { group - 1 } else { 0 };
            let windowed = (0..layers).map(|l| l % group != global_at).collect();
            (windowed, Some(window))
        }
    };
    if with_rope.iter().any(|r| !r) {
        text.push_str(
            "# Layers without position embeddings (NoPE) attend through kinds of their own, \
             `*_nope`,\n# whose RoPE is `none`.\n",
        );
    }
    // One attention kind per (window, RoPE) pair in use, declared in this order.
    let kind_of = |l: usize| match (windowed[l], with_rope[l]) {
        (false, true) => "global",
        (true, true) => "local",
        (false, false) => "global_nope",
        (true, false) => "local_nope",
    };
    let kinds: Vec<&str> = (0..layers).map(kind_of).collect();
    for kind in ["global", "local", "global_nope", "local_nope"] {
        if !kinds.contains(&kind) {
            continue;
        }
        if kind.starts_with("global") {
            text.push_str(&format!(
                "\nattention {kind} causal {{\n    mask = k <= q\n}}\n"
            ));
        } else {
            let w = window.expect("windowed layers have a window");
            text.push_str(&format!(
                "\n# {w} keys including the query itself: 0 <= q - k < window.\n\
                 attention {kind}(window: int = {w}) causal {{\n    mask = k <= q && q - k < window\n}}\n"
            ));
        }
    }
    text.push_str(&format!("\nmodel {name} {{\n"));
    let mut field = |key: &str, value: String| text.push_str(&format!("    {key:<10} = {value}\n"));
    field("vocab", vocab.to_string());
    field("dim", dim.to_string());
    field("heads", heads.to_string());
    if kv_heads != heads {
        field("kv_heads", kv_heads.to_string());
    }
    if head_dim.is_some_and(|d| dim % heads != 0 || d != dim / heads) {
        field("head_dim", head_dim.expect("checked").to_string());
    }
    field("ffn", format!("swiglu(hidden = {hidden})"));
    field("norm", format!("rmsnorm(eps = {eps:?})"));
    field(
        "rope",
        match rope.scaling {
            RopeScaling::None => format!("rope(base = {:?})", rope.base),
            scaling => format!("rope(base = {:?}, scaling = {scaling})", rope.base),
        },
    );
    for nope in ["global_nope", "local_nope"] {
        if kinds.contains(&nope) {
            field(&format!("rope.{nope}"), "none".into());
        }
    }
    field("embeddings", if tied { "tied" } else { "untied" }.into());
    if !biases.is_empty() {
        field("bias", biases.into());
    }
    if model_type == "qwen3" {
        field("qk_norm", format!("rmsnorm(eps = {eps:?})"));
    }
    field("layers", pattern(&kinds));
    text.push_str("}\n");
    // The front end's checks (a head dim RoPE cannot rotate, heads that do not divide the
    // model's dim, ...) apply to the configuration as they would to a source.
    crate::train::spec_from_source(&text, Path::new(&format!("{name}.zb")), None, None)
        .map_err(|e| config.error(format!("Zebra cannot build the model it describes: {e:#}")))?;
    Ok(text)
}

/// `zebra import`: reads the configuration, writes the source (checked by the front end
/// first) to `output` or prints it.
pub fn run(path: &Path, output: Option<&Path>, name: Option<&str>, layout: Layout) -> Result<()> {
    let config = config_path(path);
    let bytes = std::fs::read(&config).with_context(|| {
        if path.is_dir() {
            format!(
                "{} is not a Hugging Face model folder: cannot read {}",
                path.display(),
                config.display()
            )
        } else {
            format!("cannot read {}", config.display())
        }
    })?;
    let json: Value = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow!("{} is not valid JSON: {e}", config.display()))?;
    let name = match name {
        Some(name) => {
            if !name.starts_with(|c: char| c.is_ascii_alphabetic())
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                bail!(
                    "--name `{name}` is not a model name: letters, digits and `_`, starting \
                     with a letter"
                );
            }
            name.to_string()
        }
        None => name_from(path),
    };
    let text = source_from_config(&json, &config, &name, layout)?;
    let at = output.map_or_else(|| PathBuf::from("imported.zb"), Path::to_path_buf);
    let spec = crate::train::spec_from_source(&text, &at, None, None)?;
    match output {
        Some(output) => {
            zebra_ir::weights::write_atomically(output, text.as_bytes())
                .with_context(|| format!("cannot write {}", output.display()))?;
            let weights = if path.is_dir() && zebra_ir::Weights::in_folder(path) {
                path.display().to_string()
            } else {
                "WEIGHTS".to_string()
            };
            let parameters = spec.parameter_count() as f64;
            let parameters = if parameters >= 1e9 {
                format!("{:.2}B", parameters / 1e9)
            } else {
                format!("{:.2}M", parameters / 1e6)
            };
            eprintln!(
                "wrote {} (`{}`: {} layers, {parameters} parameters); run it with --weights \
                 {weights}",
                output.display(),
                spec.name,
                spec.layers.len(),
            );
        }
        None => print!("{text}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zebra_ir::rope::yarn_attention_factor;

    fn llama() -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "num_hidden_layers": 32,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": null,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "attention_bias": false
        })
    }

    fn import(json: &Value, layout: Layout) -> Result<String> {
        source_from_config(json, Path::new("config.json"), "m", layout)
    }

    fn checked(text: &str) -> zebra_frontend::ModelSpec {
        crate::train::spec_from_source(text, Path::new("m.zb"), None, None).unwrap()
    }

    #[test]
    fn llama_2_imports_as_configured_and_as_zebra() {
        let text = import(&llama(), Layout::AsConfigured).unwrap();
        assert!(text.contains("layers     = 32 * [global]"), "{text}");
        assert!(
            text.contains("eps = 1e-5") && text.contains("base = 10000.0"),
            "{text}"
        );
        assert!(
            !text.contains("kv_heads") && !text.contains("local"),
            "{text}"
        );
        let spec = checked(&text);
        assert_eq!(spec.layers.len(), 32);

        let zebra = Layout::Zebra {
            group: 4,
            window: 513,
            global_last: false,
        };
        let text = import(&llama(), zebra).unwrap();
        assert!(text.contains("8 * [global, 3 * local]"), "{text}");
        assert!(text.contains("window: int = 513"), "{text}");
        // The same model as the bundled example at Llama-2-7B's shape.
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/zebra_llama2_7b.zb"),
        )
        .unwrap();
        let expected =
            crate::train::spec_from_source(&example, Path::new("e.zb"), None, None).unwrap();
        let spec = checked(&text);
        assert_eq!(spec.parameter_count(), expected.parameter_count());
        let kinds = |s: &zebra_frontend::ModelSpec| {
            s.layers
                .iter()
                .map(|&l| (s.kinds[l].attention.clone(), s.kinds[l].args.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds(&spec), kinds(&expected));

        let last = Layout::Zebra {
            group: 4,
            window: 513,
            global_last: true,
        };
        let text = import(&llama(), last).unwrap();
        assert!(text.contains("8 * [3 * local, global]"), "{text}");
        checked(&text);
    }

    #[test]
    fn mistral_and_gqa_and_transformers_5_settings() {
        let mut json = llama();
        json["model_type"] = "mistral".into();
        json["num_key_value_heads"] = 8.into();
        json["sliding_window"] = 4096.into();
        json["tie_word_embeddings"] = true.into();
        json["head_dim"] = 128.into();
        json.as_object_mut().unwrap().remove("rope_theta");
        json["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 1e6});
        let text = import(&json, Layout::AsConfigured).unwrap();
        for want in [
            "32 * [local]",
            "window: int = 4096",
            "kv_heads   = 8",
            "base = 1000000.0",
            "embeddings = tied",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        assert!(!text.contains("head_dim"), "128 is dim / heads: {text}");
        assert!(!text.contains("attention global"), "{text}");
        checked(&text);
        json["head_dim"] = 64.into();
        let text = import(&json, Layout::AsConfigured).unwrap();
        assert!(text.contains("head_dim   = 64"), "{text}");
        checked(&text);
    }

    /// Scaled RoPEs as Llama 3.1 (transformers 5's `rope_parameters`), a linear scaling
    /// (the older `rope_scaling` with `type`) and YaRN (Qwen 2.5's, its factor and context;
    /// DeepSeek's `mscale`s) write them, each read back by the front end as the same RoPE.
    #[test]
    fn scaled_ropes_import() {
        let rope_of = |text: &str| checked(text).kinds[0].rope.expect("a RoPE");
        let mut json = llama();
        json.as_object_mut().unwrap().remove("rope_theta");
        json["rope_parameters"] = serde_json::json!({
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192
        });
        let text = import(&json, Layout::AsConfigured).unwrap();
        assert!(
            text.contains(
                "rope(base = 500000.0, scaling = llama3(factor = 8.0, low_freq_factor = 1.0, \
                 high_freq_factor = 4.0, original_max_position = 8192))"
            ),
            "{text}"
        );
        assert_eq!(rope_of(&text).base, 500000.0);

        let mut json = llama();
        json["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        let text = import(&json, Layout::AsConfigured).unwrap();
        assert_eq!(
            rope_of(&text).scaling,
            RopeScaling::Linear { factor: 2.0 },
            "{text}"
        );

        let mut json = llama();
        json["max_position_embeddings"] = 131072.into();
        json["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 32768});
        let yarn = |json: &Value| rope_of(&import(json, Layout::AsConfigured).unwrap()).scaling;
        assert_eq!(
            yarn(&json),
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position: 32768,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: yarn_attention_factor(4.0),
                truncate: true,
            }
        );
        json["rope_scaling"] = serde_json::json!({"type": "yarn",
            "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.5,
            "beta_fast": 16, "truncate": false});
        let RopeScaling::Yarn {
            factor,
            attention_factor,
            beta_fast,
            truncate,
            ..
        } = yarn(&json)
        else {
            panic!("not yarn")
        };
        assert_eq!((factor, beta_fast, truncate), (32.0, 16.0, false));
        let expected = (0.1 * 32f64.ln() + 1.0) / (0.05 * 32f64.ln() + 1.0);
        assert!(
            (attention_factor - expected).abs() < 1e-12,
            "{attention_factor}"
        );
    }

    /// Layers that differ: SmolLM3's NoPE layers (`no_rope_layers`, or every fourth by
    /// default) and `layer_types`' sliding and full layers, as configured and rearranged
    /// into Zebra's groups; lists that do not describe every layer are refused.
    #[test]
    fn layers_of_several_kinds_import() {
        let mut json = llama();
        json["model_type"] = "smollm3".into();
        json.as_object_mut().unwrap().remove("tie_word_embeddings");
        let text = import(&json, Layout::AsConfigured).unwrap();
        assert!(
            text.contains("layers     = 8 * [3 * global, global_nope]"),
            "{text}"
        );
        assert!(text.contains("rope.global_nope = none"), "{text}");
        assert!(
            text.contains("embeddings = tied"),
            "SmolLM3 ties by default: {text}"
        );
        let spec = checked(&text);
        let nope = spec
            .kinds
            .iter()
            .find(|k| k.attention == "global_nope")
            .unwrap();
        assert_eq!(nope.rope, None);
        json["num_hidden_layers"] = 4.into();
        json["no_rope_layers"] = serde_json::json!([1, 0, 1, 1]);
        json["layer_types"] = serde_json::json!([
            "full_attention",
            "sliding_attention",
            "full_attention",
            "full_attention"
        ]);
        json["sliding_window"] = 64.into();
        let text = import(&json, Layout::AsConfigured).unwrap();
        assert!(
            text.contains("layers     = [global, local_nope, 2 * global]"),
            "{text}"
        );
        checked(&text);
        let zebra = Layout::Zebra {
            group: 2,
            window: 32,
            global_last: false,
        };
        let text = import(&json, zebra).unwrap();
        assert!(
            text.contains("layers     = [global, local_nope, global, local]"),
            "{text}"
        );
        assert!(
            text.contains("attention local_nope(window: int = 32)"),
            "{text}"
        );
        checked(&text);

        let mut json = llama();
        json["model_type"] = "ministral".into();
        json["num_hidden_layers"] = 6.into();
        json["sliding_window"] = 4096.into();
        json["layer_types"] = serde_json::json!([
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention"
        ]);
        let text = import(&json, Layout::AsConfigured).unwrap();
        assert!(
            text.contains("layers     = 2 * [2 * local, global]"),
            "{text}"
        );
        assert!(!text.contains("nope"), "{text}");
        checked(&text);

        // As transformers' classes read them: Mistral's reads no `layer_types` (every layer
        // a window), Llama's no window at all.
        json["model_type"] = "mistral".into();
        let text = import(&json, Layout::AsConfigured).unwrap();
        assert!(text.contains("layers     = 6 * [local]"), "{text}");
        json["model_type"] = "llama".into();
        let text = import(&json, Layout::AsConfigured).unwrap();
        assert!(text.contains("layers     = 6 * [global]"), "{text}");
        json["model_type"] = "ministral".into();

        for (key, value, refusal) in [
            (
                "layer_types",
                serde_json::json!(["full_attention"]),
                "must list each of the 6",
            ),
            (
                "layer_types",
                Value::from(vec!["chunked_attention"; 6]),
                "`full_attention` or `sliding_attention` per layer, found \"chunked_attention\"",
            ),
            ("sliding_window", Value::Null, "has no `sliding_window`"),
        ] {
            let mut bad = json.clone();
            bad[key] = value;
            let err = import(&bad, Layout::AsConfigured).unwrap_err().to_string();
            assert!(err.contains(refusal), "{refusal}: {err}");
        }
        let mut bad = llama();
        bad["model_type"] = "smollm3".into();
        bad["no_rope_layers"] = serde_json::json!([
            1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
            1, 1, 1
        ]);
        let err = import(&bad, Layout::AsConfigured).unwrap_err().to_string();
        assert!(
            err.contains("1 (RoPE) or 0 (none) per layer, found 2"),
            "{err}"
        );
    }

    #[test]
    fn qwen_biases_qk_norm_and_windows_as_transformers_reads_them() {
        let qwen = |model_type: &str, extra: Value| {
            let mut json = llama();
            json["model_type"] = model_type.into();
            json["num_hidden_layers"] = 4.into();
            json["sliding_window"] = 4096.into();
            for (k, v) in extra.as_object().unwrap() {
                json[k] = v.clone();
            }
            let text = import(&json, Layout::AsConfigured).unwrap();
            (checked(&text), text)
        };
        // Qwen2: Q, K and V biases whatever `attention_bias` says; its window only with
        // `use_sliding_window`, from `max_window_layers` on.
        let (spec, text) = qwen("qwen2", serde_json::json!({}));
        assert!(text.contains("bias       = [q, k, v]\n"), "{text}");
        assert!(spec.biases.q && spec.biases.k && spec.biases.v && !spec.biases.o);
        assert!(
            spec.qk_norm.is_none() && text.contains("4 * [global]"),
            "{text}"
        );
        let (_, text) = qwen(
            "qwen2",
            serde_json::json!({"use_sliding_window": true, "max_window_layers": 1}),
        );
        assert!(text.contains("[global, 3 * local]"), "{text}");
        assert!(text.contains("window: int = 4096"), "{text}");
        // Qwen3: QK-norm with the model's epsilon; biases only with `attention_bias`.
        let (spec, text) = qwen("qwen3", serde_json::json!({"rms_norm_eps": 1e-6}));
        assert!(text.contains("qk_norm    = rmsnorm(eps = 1e-6)"), "{text}");
        assert_eq!(spec.qk_norm, Some(1e-6));
        assert!(!spec.biases.any() && !text.contains("bias"), "{text}");
        let (spec, _) = qwen("qwen3", serde_json::json!({"attention_bias": true}));
        assert!(spec.biases.q && spec.biases.o);
        // Llama's `attention_bias` puts a bias on all four; Mistral's class has none.
        let (spec, _) = qwen("llama", serde_json::json!({"attention_bias": true}));
        assert!(spec.biases.q && spec.biases.k && spec.biases.v && spec.biases.o);
        let (spec, _) = qwen("mistral", serde_json::json!({"attention_bias": true}));
        assert!(!spec.biases.any());
    }

    #[test]
    fn patterns_are_the_shortest_repeating_group() {
        assert_eq!(pattern(&["a", "a", "b", "a", "a", "b"]), "2 * [2 * a, b]");
        assert_eq!(pattern(&["a", "b", "b"]), "[a, 2 * b]");
        assert_eq!(pattern(&["a"; 3]), "3 * [a]");
        assert_eq!(pattern(&["a"]), "1 * [a]");
    }

    #[test]
    fn unsupported_settings_are_named() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("model_type", "gemma3".into(), "`model_type` is `gemma3`"),
            ("mlp_bias", true.into(), "`mlp_bias` is true"),
            (
                "attention_bias",
                "yes".into(),
                "`attention_bias` must be true or false",
            ),
            (
                "hidden_act",
                "gelu".into(),
                "`hidden_act` is \"gelu\"; Zebra's FFN is SwiGLU",
            ),
            (
                "hidden_activation",
                "gelu_pytorch_tanh".into(),
                "`hidden_activation` is \"gelu_pytorch_tanh\"",
            ),
            (
                "rope_scaling",
                serde_json::json!({"rope_type": "dynamic", "factor": 2.0}),
                "its RoPE is scaled by `dynamic` (`rope_scaling`)",
            ),
            (
                "rope_scaling",
                serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
                "its RoPE scaling (`rope_scaling`): RoPE scaling `llama3` needs `low_freq_factor`",
            ),
            (
                "rope_scaling",
                serde_json::json!({"type": "linear", "factor": 0.5}),
                "a RoPE scaling factor must be at least 1",
            ),
            (
                "rope_scaling",
                serde_json::json!({"type": "yarn", "factor": 4.0,
                    "original_max_position_embeddings": 64, "truncate": "yes"}),
                "`rope_scaling.truncate` must be true or false",
            ),
            (
                "rope_scaling",
                serde_json::json!({"type": "yarn", "factor": 4.0}),
                "RoPE scaling `yarn` needs `original_max_position_embeddings`",
            ),
            (
                "rope_scaling",
                serde_json::json!({"type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}),
                "`partial_rotary_factor` 0.5",
            ),
            (
                "hidden_size",
                (-3).into(),
                "`hidden_size` must be a positive integer",
            ),
            (
                "rms_norm_eps",
                "small".into(),
                "`rms_norm_eps` must be a positive number",
            ),
            ("vocab_size", Value::Null, "it has no `vocab_size`"),
            (
                "hidden_size",
                4000.into(),
                "RoPE needs an even head dim, found 125",
            ),
        ];
        for (key, value, says) in cases {
            let mut json = llama();
            json[key] = value;
            let err = import(&json, Layout::AsConfigured).unwrap_err().to_string();
            assert!(err.contains(says), "{key}: {err}");
            assert!(err.starts_with("config.json: "), "{err}");
        }
        let odd = Layout::Zebra {
            group: 5,
            window: 8,
            global_last: false,
        };
        let err = import(&llama(), odd).unwrap_err().to_string();
        assert!(
            err.contains("32 layers, not a multiple of groups of 5"),
            "{err}"
        );
        assert!(import(&serde_json::json!([1]), Layout::AsConfigured).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// Whatever the numbers, an import either names the problem or writes a source that
        /// checks.
        #[test]
        fn an_accepted_configuration_always_checks(
            vocab in 0u64..300, dim in 0u64..300, heads in 0u64..20, kv in 0u64..20,
            layers in 0u64..10, hidden in 0u64..100, head_dim in proptest::option::of(0u64..80),
            window in proptest::option::of(0u64..50), group in 2usize..5,
            zebra in proptest::bool::ANY, eps in proptest::option::of(-1.0f64..1.0),
            model_type in 0usize..4, attention_bias in proptest::bool::ANY,
            use_sliding_window in proptest::bool::ANY,
            kinds in proptest::option::of(proptest::collection::vec(0u8..4, 0..10)),
        ) {
            let model_type = ["mistral", "smollm3", "qwen2", "qwen3"][model_type];
            let mut json = serde_json::json!({
                "model_type": model_type, "vocab_size": vocab,
                "attention_bias": attention_bias, "use_sliding_window": use_sliding_window,
                "hidden_size": dim, "num_attention_heads": heads, "num_key_value_heads": kv,
                "num_hidden_layers": layers, "intermediate_size": hidden,
                "head_dim": head_dim, "sliding_window": window,
            });
            if let Some(eps) = eps {
                json["rms_norm_eps"] = eps.into();
            }
            // Per layer (of any count): bit 0 sliding, bit 1 without RoPE.
            if let Some(kinds) = kinds {
                let types: Vec<&str> = kinds
                    .iter()
                    .map(|k| if k & 1 == 1 { "sliding_attention" } else { "full_attention" })
                    .collect();
                json["layer_types"] = types.into();
                json["no_rope_layers"] = kinds.iter().map(|k| u8::from(k & 2 == 0)).collect();
            }
            let layout = if zebra {
                Layout::Zebra { group, window: 4, global_last: false }
            } else {
                Layout::AsConfigured
            };
            match import(&json, layout) {
                Ok(text) => {
                    let checked =
                        crate::train::spec_from_source(&text, Path::new("m.zb"), None, None);
                    proptest::prop_assert!(checked.is_ok(), "{json}\n{text}");
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    let named = message.starts_with("config.json: ")
                        || message.starts_with("--zebra");
                    proptest::prop_assert!(named, "{message}");
                }
            }
        }
    }

    #[test]
    fn zebra_layouts_and_names_parse() {
        assert_eq!(parse_zebra("4:513"), Ok((4, 513)));
        for bad in ["4", "a:b", "1:8", "4:0", "4:-1"] {
            assert!(parse_zebra(bad).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("Llama-2-7b-hf");
        std::fs::create_dir(&folder).unwrap();
        assert_eq!(name_from(&folder), "llama_2_7b_hf");
        let numeric = dir.path().join("7b");
        std::fs::create_dir(&numeric).unwrap();
        std::fs::write(numeric.join("config.json"), "{}").unwrap();
        assert_eq!(name_from(&numeric.join("config.json")), "m_7b");
    }
}
