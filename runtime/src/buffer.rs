//! Host buffers for the kernels: zeroed, and aligned to a cache line so that the kernels'
//! vector loads never straddle two lines (a `Vec<u64>` is only 8- or 16-byte aligned, and a
//! misaligned 32-byte load costs about 15% in the attention kernel's inner loop).

use std::ops::{Deref, DerefMut};

/// One cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u64; 8]);

/// A zeroed, cache-line-aligned buffer of `u64` words.
#[derive(Clone, Default)]
pub struct Buffer {
    lines: Vec<Line>,
}

impl Buffer {
    /// A buffer of at least `words` zeroed words.
    pub fn zeroed(words: usize) -> Buffer {
        Buffer {
            lines: vec![Line([0; 8]); words.div_ceil(8)],
        }
    }

    /// As [`Buffer::zeroed`], or an error where the allocator cannot give that much.
    pub fn try_zeroed(words: usize) -> Result<Buffer, std::collections::TryReserveError> {
        let mut lines = Vec::new();
        lines.try_reserve_exact(words.div_ceil(8))?;
        lines.resize(words.div_ceil(8), Line([0; 8]));
        Ok(Buffer { lines })
    }
}

impl Deref for Buffer {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        // SAFETY: `Line` is `repr(C)` over `[u64; 8]`, so the lines are contiguous words.
        unsafe {
            std::slice::from_raw_parts(self.lines.as_ptr().cast::<u64>(), self.lines.len() * 8)
        }
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in `deref`, and the borrow is unique.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.lines.as_mut_ptr().cast::<u64>(),
                self.lines.len() * 8,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Buffer;

    #[test]
    fn buffers_are_zeroed_and_line_aligned() {
        for words in [0, 1, 7, 8, 9, 1000] {
            let b = Buffer::zeroed(words);
            assert!(b.len() >= words && b.len() < words + 8);
            assert!(b.iter().all(|&w| w == 0));
            assert_eq!(b.as_ptr() as usize % 64, 0);
            let t = Buffer::try_zeroed(words).unwrap();
            assert_eq!((t.len(), t.as_ptr() as usize % 64), (b.len(), 0));
        }
        assert!(Buffer::try_zeroed(usize::MAX).is_err());
    }
}
