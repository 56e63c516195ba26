//! Weight packing for the projection kernels: `[N, K]` weights into panels of `nr` output
//! columns, `[N' / nr][K][nr]`, with a norm weight folded in when the kernel fuses RMSNorm.

use crate::plan::PackSpec;

/// Packs `w [N, K]` (row-major) as `spec` says, multiplying column `k` by `norm[k]`.
pub fn pack(w: &[f32], norm: Option<&[f32]>, spec: &PackSpec) -> Vec<f32> {
    let mut out = vec![0.0f32; spec.packed_len()];
    pack_into(w, norm, spec, &mut out);
    out
}

/// [`pack`] into `out` (`spec.packed_len()` values, zeroed: the padding is not written).
pub fn pack_into(w: &[f32], norm: Option<&[f32]>, spec: &PackSpec, out: &mut [f32]) {
    let (k, nr, group) = (spec.k, spec.nr, spec.group);
    let panels_per_group = group.div_ceil(nr);
    for g in 0..spec.n / group {
        for p in 0..panels_per_group {
            let panel = g * panels_per_group + p;
            for c in 0..nr {
                let col = p * nr + c;
                if col >= group {
                    continue;
                }
                let n = g * group + col;
                for kk in 0..k {
                    let x = if spec.transposed {
                        w[kk * spec.n + n]
                    } else {
                        w[n * k + kk]
                    };
                    let scale = norm.map_or(1.0, |g| g[kk]);
                    out[(panel * k + kk) * nr + c] = x * scale;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_interleave_columns_and_pad_groups() {
        // N = 3 (one group of 3, padded to a panel of 4), K = 2.
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let spec = PackSpec {
            weight: 0,
            norm: None,
            transposed: false,
            n: 3,
            k: 2,
            group: 3,
            nr: 4,
            bf16: false,
        };
        assert_eq!(
            pack(&w, None, &spec),
            vec![1.0, 3.0, 5.0, 0.0, 2.0, 4.0, 6.0, 0.0]
        );
        let scaled = pack(&w, Some(&[10.0, 1.0]), &spec);
        assert_eq!(scaled, vec![10.0, 30.0, 50.0, 0.0, 2.0, 4.0, 6.0, 0.0]);
        // The same matrix stored transposed, [K, N] = [2, 3].
        let wt = [1.0, 3.0, 5.0, 2.0, 4.0, 6.0];
        let transposed = PackSpec {
            transposed: true,
            ..spec
        };
        assert_eq!(
            pack(&wt, None, &transposed),
            vec![1.0, 3.0, 5.0, 0.0, 2.0, 4.0, 6.0, 0.0]
        );
    }
}
