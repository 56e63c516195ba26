//! A warp emulator: runs the tensor-core kernels on the CPU, so that they are tested on
//! every machine, GPU or not.
//!
//! The kernel is generated exactly as for the GPU, with the warp-level operations lowered to
//! calls into this module ([`Lowering::Emulated`]) instead of inline PTX, compiled for the
//! host through MLIR's JIT, and run with one OS thread per GPU thread: a block's threads
//! share its shared memory and its barrier, a warp's 32 threads exchange their registers
//! through the warp's slots for `mma.sync`, `ldmatrix` and shuffles, with the semantics the
//! PTX ISA gives them (fragment layouts of `m16n8k16`, the lane-to-row map of `ldmatrix`,
//! `.trans`, bf16/f16 rounding to nearest even). `cp.async` copies wait in their group until
//! `cp.async.wait_group`, as on the GPU, so a read of shared memory before its wait sees
//! stale data here too. Misaligned or out-of-range shared-memory accesses are errors that
//! name the operation, the thread and the address, and so are races: a thread reading what
//! another wrote, or writing what another read or wrote, with no barrier between (a
//! `cp.async` may land any time from its issue to its wait).
//!
//! It is slow (every warp operation is two barrier waits of 32 OS threads), made for tests
//! at small sizes; speed is measured on a GPU.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use melior::ExecutionEngine;
use zebra_runtime::artifact::AttentionEntry;
use zebra_runtime::attention_check::{bf16_bits, bf16_value, f16_bits, f16_value};

use crate::CodegenError;
use crate::backend::Mlir;
use crate::kernels::attention_mma::{Half, MmaTiles, THREADS, attention_mma};
use crate::kernels::warp::Lowering;

/// A barrier whose waiters yield the processor instead of sleeping on a futex: with a few
/// hundred emulated threads on a few cores, most waits end within one round of the
/// scheduler, and waking sleepers costs more than that.
struct YieldBarrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

impl YieldBarrier {
    fn new(threads: usize) -> YieldBarrier {
        YieldBarrier {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
        }
    }

    fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        while self.generation.load(Ordering::Acquire) == generation {
            std::thread::yield_now();
        }
    }
}

/// Words a lane contributes to a warp exchange (at most: six for `mma`).
const SLOT_WORDS: usize = 8;

/// One warp's meeting point: two sets of slots, used by turns, so that one barrier per
/// exchange suffices (a lane can write a set again only after every lane has passed the
/// next exchange's barrier, and so has read it).
struct WarpState {
    barrier: YieldBarrier,
    slots: [Mutex<[[u32; SLOT_WORDS]; 32]>; 2],
}

/// One warpgroup's meeting point for `wgmma` (four warps), as [`WarpState`] for a warp.
struct GroupState {
    barrier: YieldBarrier,
    slots: [Mutex<Vec<[u32; SLOT_WORDS]>>; 2],
}

/// Threads per warpgroup.
const GROUP_THREADS: usize = 128;

/// One block's state, shared by its threads.
struct Block {
    shared: *mut u8,
    shared_bytes: usize,
    barrier: YieldBarrier,
    warps: Vec<WarpState>,
    groups: Vec<GroupState>,
    error: Mutex<Option<String>>,
    /// Per 4 bytes of shared memory, its last write and its last read, as `(interval << 32)
    /// | (thread + 1)`, where an interval is the time between two block barriers (0: none).
    written: Vec<AtomicU64>,
    read: Vec<AtomicU64>,
    /// Per 4 bytes of shared memory, when it was last written, and per thread, when it last
    /// ran `fence.proxy.async`, on one clock: what a thread wrote is visible to `wgmma` once
    /// it has fenced after the write.
    write_time: Vec<AtomicU64>,
    fenced: Vec<AtomicU64>,
    clock: AtomicU64,
}

/// An access to shared memory in an interval between barriers, by a thread, as the shadow
/// arrays hold it.
fn access(interval: usize, thread: usize) -> u64 {
    ((interval as u64) << 32) | (thread as u64 + 1)
}

// SAFETY: the shared-memory pointer is only dereferenced inside bounds checks, by the
// block's threads, which the kernel orders with its barriers as it does on the GPU.
unsafe impl Sync for Block {}

/// A pending `cp.async`.
struct Copy {
    to: u32,
    from: *const u8,
    size: u32,
    /// The interval it was issued in.
    since: usize,
}

/// What a `wgmma` read from shared memory: (address, value) pairs, checked again when the
/// thread waits for it (the operands must not change while it is in flight).
type Operands = Vec<(u32, u16)>;

/// What a thread knows of itself.
struct Lane {
    block: *const Block,
    warp: usize,
    lane: usize,
    open: Vec<Copy>,
    groups: VecDeque<Vec<Copy>>,
    results: [u32; RESULTS],
    /// Which set of the warp's slots the next exchange uses.
    turn: usize,
    /// The same for the warpgroup's slots.
    group_turn: usize,
    /// The accumulators of the next `wgmma`.
    accumulators: [f32; RESULTS],
    /// `wgmma`s issued and not committed, and committed batches not waited for.
    open_wgmma: Vec<Operands>,
    wgmma_batches: VecDeque<Vec<Operands>>,
}

/// Results a warp operation gives a thread (at most: 128 accumulators of `wgmma` m64n256).
const RESULTS: usize = 128;

impl Lane {
    fn thread(&self) -> usize {
        self.warp * 32 + self.lane
    }
}

thread_local! {
    static LANE: RefCell<Option<Lane>> = const { RefCell::new(None) };
}

fn with_lane<R>(f: impl FnOnce(&mut Lane, &Block) -> R) -> R {
    LANE.with(|cell| {
        let mut lane = cell.borrow_mut();
        let lane = lane
            .as_mut()
            .expect("a warp operation outside an emulated kernel");
        // SAFETY: the block outlives its threads (they run in a scope that borrows it).
        let block = unsafe { &*lane.block };
        f(lane, block)
    })
}

impl Block {
    fn fail(&self, message: String) {
        let mut error = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if error.is_none() {
            *error = Some(message);
        }
    }

    /// The interval between barriers the block is in.
    fn interval(&self) -> usize {
        self.barrier.generation.load(Ordering::Acquire) + 1
    }

    /// Records that `thread` reads the `len` bytes at `address` now; a write of them by
    /// another thread in this interval (no barrier between) is a race.
    fn check_read(&self, thread: usize, what: &str, address: u32, len: usize) {
        let now = self.interval();
        for word in address as usize / 4..(address as usize + len).div_ceil(4) {
            let written = self.written[word].load(Ordering::Acquire);
            if written >> 32 == now as u64 && written & 0xffff_ffff != thread as u64 + 1 {
                self.fail(format!(
                    "{what} in thread {thread} reads shared memory at byte {address}, which \
                     thread {} wrote with no barrier between",
                    (written & 0xffff_ffff) - 1
                ));
            }
            self.read[word].store(access(now, thread), Ordering::Release);
        }
    }

    /// Records that `thread` writes the `len` bytes at `address` now, the write having
    /// started in interval `since` (a `cp.async` lands any time from its issue to its wait);
    /// a read or write of them by another thread in that time is a race.
    fn check_write(&self, thread: usize, what: &str, address: u32, len: usize, since: usize) {
        let now = self.interval();
        let time = self.clock.fetch_add(1, Ordering::AcqRel) + 1;
        for word in address as usize / 4..(address as usize + len).div_ceil(4) {
            for (shadow, verb) in [(&self.read, "reads"), (&self.written, "writes")] {
                let other = shadow[word].load(Ordering::Acquire);
                let (when, who) = ((other >> 32) as usize, other & 0xffff_ffff);
                if who != 0 && who != thread as u64 + 1 && (since..=now).contains(&when) {
                    self.fail(format!(
                        "{what} in thread {thread} writes shared memory at byte {address}, \
                         which thread {} {verb} with no barrier between",
                        who - 1
                    ));
                }
            }
            self.written[word].store(access(now, thread), Ordering::Release);
            self.write_time[word].store(time, Ordering::Release);
        }
    }

    /// Checks that what `wgmma` reads at `address` (2 bytes) was fenced for the async proxy
    /// by the thread that wrote it.
    fn check_async_read(&self, thread: usize, address: u32) {
        let word = address as usize / 4;
        let writer = self.written[word].load(Ordering::Acquire) & 0xffff_ffff;
        if writer == 0 {
            return;
        }
        let writer = writer as usize - 1;
        let written = self.write_time[word].load(Ordering::Acquire);
        if self.fenced[writer].load(Ordering::Acquire) < written {
            self.fail(format!(
                "wgmma in thread {thread} reads shared memory at byte {address}, which thread \
                 {writer} wrote with no fence.proxy.async after it"
            ));
        }
    }

    /// The shared memory at `address`, `len` bytes, aligned to `align`, or an error.
    fn at(
        &self,
        lane: &Lane,
        what: &str,
        address: u32,
        len: usize,
        align: usize,
    ) -> Option<*mut u8> {
        let address = address as usize;
        if !address.is_multiple_of(align) || address + len > self.shared_bytes {
            self.fail(format!(
                "{what} in thread {} reads or writes shared memory at byte {address} ({len} \
                 bytes, aligned to {align}) of a block's {} bytes",
                lane.warp * 32 + lane.lane,
                self.shared_bytes
            ));
            return None;
        }
        // SAFETY: in bounds, checked above.
        Some(unsafe { self.shared.add(address) })
    }
}

/// Every lane's `words`, exchanged among the warp's 32 threads.
fn exchange(lane: &mut Lane, block: &Block, words: [u32; SLOT_WORDS]) -> [[u32; SLOT_WORDS]; 32] {
    let warp = &block.warps[lane.warp];
    let slots = &warp.slots[lane.turn];
    lane.turn ^= 1;
    slots.lock().unwrap_or_else(|e| e.into_inner())[lane.lane] = words;
    warp.barrier.wait();
    *slots.lock().unwrap_or_else(|e| e.into_inner())
}

fn half_of(word: u32, high: bool) -> u16 {
    if high {
        (word >> 16) as u16
    } else {
        word as u16
    }
}

fn mma(half: Half, a: [u32; 4], b: [u32; 2], c: [f32; 4]) {
    let value = |h: u16| match half {
        Half::Bf16 => bf16_value(h),
        Half::F16 => f16_value(h),
    };
    with_lane(|lane, block| {
        let all = exchange(lane, block, [a[0], a[1], a[2], a[3], b[0], b[1], 0, 0]);
        // A is 16 x 16 (row-major), B 16 x 8 (k by n): lane l, group g = l / 4, t = l % 4,
        // holds A[g][2t..], A[g + 8][2t..], A[g][2t + 8..], A[g + 8][2t + 8..] and
        // B[2t..][g], B[2t + 8..][g], two consecutive elements per register.
        let mut am = [[0f32; 16]; 16];
        let mut bm = [[0f32; 8]; 16];
        for (l, words) in all.iter().enumerate() {
            let (g, t) = (l / 4, l % 4);
            for (r, (row, col)) in [
                (g, 2 * t),
                (g + 8, 2 * t),
                (g, 2 * t + 8),
                (g + 8, 2 * t + 8),
            ]
            .into_iter()
            .enumerate()
            {
                am[row][col] = value(half_of(words[r], false));
                am[row][col + 1] = value(half_of(words[r], true));
            }
            for (r, k) in [2 * t, 2 * t + 8].into_iter().enumerate() {
                bm[k][g] = value(half_of(words[4 + r], false));
                bm[k + 1][g] = value(half_of(words[4 + r], true));
            }
        }
        let (g, t) = (lane.lane / 4, lane.lane % 4);
        for (i, (row, col)) in [
            (g, 2 * t),
            (g, 2 * t + 1),
            (g + 8, 2 * t),
            (g + 8, 2 * t + 1),
        ]
        .into_iter()
        .enumerate()
        {
            let dot: f32 = (0..16).map(|k| am[row][k] * bm[k][col]).sum();
            lane.results[i] = (c[i] + dot).to_bits();
        }
    });
}

/// The `extern "C"` entry of `mma` for one 16-bit type.
macro_rules! emu_mma {
    ($name:ident, $half:expr) => {
        extern "C" fn $name(
            a0: u32,
            a1: u32,
            a2: u32,
            a3: u32,
            b0: u32,
            b1: u32,
            c0: f32,
            c1: f32,
            c2: f32,
            c3: f32,
        ) {
            mma($half, [a0, a1, a2, a3], [b0, b1], [c0, c1, c2, c3]);
        }
    };
}

emu_mma!(emu_mma_bf16, Half::Bf16);
emu_mma!(emu_mma_f16, Half::F16);

extern "C" fn emu_ldmatrix(address: u32, count: u32, trans: u32) {
    with_lane(|lane, block| {
        let count = count as usize;
        // Lanes 8m..8m + 8 give the rows of matrix m: eight 16-bit values, 16 bytes.
        let mut row = [0u32; SLOT_WORDS];
        if lane.lane < 8 * count
            && let Some(at) = block.at(lane, "ldmatrix", address, 16, 16)
        {
            block.check_read(lane.thread(), "ldmatrix", address, 16);
            for (i, word) in row.iter_mut().take(4).enumerate() {
                // SAFETY: `at` has 16 bytes in bounds.
                *word = unsafe { at.add(4 * i).cast::<u32>().read_unaligned() };
            }
        }
        let all = exchange(lane, block, row);
        let element = |l: usize, i: usize| half_of(all[l][i / 2], i % 2 == 1);
        let (r, c) = (lane.lane / 4, 2 * (lane.lane % 4));
        for m in 0..count {
            let (lo, hi) = if trans == 0 {
                (element(8 * m + r, c), element(8 * m + r, c + 1))
            } else {
                (element(8 * m + c, r), element(8 * m + c + 1, r))
            };
            lane.results[m] = u32::from(lo) | (u32::from(hi) << 16);
        }
    });
}

extern "C" fn emu_result(index: u32) -> u32 {
    with_lane(|lane, _| lane.results[index as usize % RESULTS])
}

extern "C" fn emu_pack_bf16(lo: f32, hi: f32) -> u32 {
    u32::from(bf16_bits(lo)) | (u32::from(bf16_bits(hi)) << 16)
}

extern "C" fn emu_pack_f16(lo: f32, hi: f32) -> u32 {
    u32::from(f16_bits(lo)) | (u32::from(f16_bits(hi)) << 16)
}

extern "C" fn emu_exp2(x: f32) -> f32 {
    let y = x.exp2();
    if y.is_subnormal() { 0.0 } else { y }
}

extern "C" fn emu_log2(x: f32) -> f32 {
    x.log2()
}

extern "C" fn emu_shfl_xor(x: f32, mask: u32) -> f32 {
    with_lane(|lane, block| {
        let all = exchange(lane, block, [x.to_bits(), 0, 0, 0, 0, 0, 0, 0]);
        f32::from_bits(all[(lane.lane ^ mask as usize) & 31][0])
    })
}

extern "C" fn emu_barrier() {
    with_lane(|_, block| {
        block.barrier.wait();
    });
}

extern "C" fn emu_cp_async(to: u32, from: *const u8, size: u32) {
    with_lane(|lane, block| {
        let since = block.interval();
        lane.open.push(Copy {
            to,
            from,
            size,
            since,
        });
    });
}

extern "C" fn emu_commit() {
    with_lane(|lane, _| {
        let group = std::mem::take(&mut lane.open);
        lane.groups.push_back(group);
    });
}

extern "C" fn emu_wait(pending: u32) {
    with_lane(|lane, block| {
        while lane.groups.len() > pending as usize {
            for copy in lane.groups.pop_front().unwrap_or_default() {
                let Some(at) = block.at(lane, "cp.async", copy.to, 16, 16) else {
                    continue;
                };
                block.check_write(lane.thread(), "cp.async", copy.to, 16, copy.since);
                let size = (copy.size as usize).min(16);
                // SAFETY: `at` has 16 bytes in bounds; a copy of no bytes reads nothing (its
                // source may lie past the buffer, as on the GPU), any other's source is a
                // buffer of the launch, padded past its end.
                unsafe {
                    if size > 0 {
                        std::ptr::copy_nonoverlapping(copy.from, at, size);
                    }
                    std::ptr::write_bytes(at.add(size), 0, 16 - size);
                }
            }
        }
    });
}

extern "C" fn emu_st_shared(address: u32, w0: u32, w1: u32, w2: u32, w3: u32) {
    with_lane(|lane, block| {
        if let Some(at) = block.at(lane, "st.shared", address, 16, 16) {
            block.check_write(lane.thread(), "st.shared", address, 16, block.interval());
            for (i, w) in [w0, w1, w2, w3].into_iter().enumerate() {
                // SAFETY: `at` has 16 bytes in bounds.
                unsafe { at.add(4 * i).cast::<u32>().write_unaligned(w) };
            }
        }
    });
}

extern "C" fn emu_st_shared32(address: u32, word: u32) {
    with_lane(|lane, block| {
        if let Some(at) = block.at(lane, "st.shared.b32", address, 4, 4) {
            block.check_write(lane.thread(), "st.shared.b32", address, 4, block.interval());
            // SAFETY: `at` has 4 bytes in bounds.
            unsafe { at.cast::<u32>().write_unaligned(word) };
        }
    });
}

extern "C" fn emu_ld_shared32(address: u32) -> u32 {
    with_lane(|lane, block| {
        let Some(at) = block.at(lane, "ld.shared.b32", address, 4, 4) else {
            return 0;
        };
        block.check_read(lane.thread(), "ld.shared.b32", address, 4);
        // SAFETY: `at` has 4 bytes in bounds.
        unsafe { at.cast::<u32>().read_unaligned() }
    })
}

extern "C" fn emu_fence_proxy_async() {
    with_lane(|lane, block| {
        let time = block.clock.fetch_add(1, Ordering::AcqRel) + 1;
        block.fenced[lane.thread()].store(time, Ordering::Release);
    });
}

extern "C" fn emu_wgmma_fence() {}

extern "C" fn emu_wgmma_acc(index: u32, value: f32) {
    with_lane(|lane, _| lane.accumulators[index as usize % RESULTS] = value);
}

/// Every thread of the warpgroup's `words`, exchanged (as [`exchange`] for a warp).
fn exchange_group(
    lane: &mut Lane,
    block: &Block,
    words: [u32; SLOT_WORDS],
) -> Vec<[u32; SLOT_WORDS]> {
    let thread = lane.thread();
    let group = &block.groups[thread / GROUP_THREADS];
    let slots = &group.slots[lane.group_turn];
    lane.group_turn ^= 1;
    slots.lock().unwrap_or_else(|e| e.into_inner())[thread % GROUP_THREADS] = words;
    group.barrier.wait();
    slots.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A shared-memory matrix descriptor of `wgmma`, decoded: start, leading (K) and stride
/// (M or N) byte offsets between 8 x 16-byte core matrices; `None` for layouts the emulator
/// does not take (swizzled, or a base offset).
fn descriptor(desc: u64) -> Option<(u32, u32, u32)> {
    let field = |shift: u32| (((desc >> shift) & 0x3fff) as u32) << 4;
    let swizzle = desc >> 62;
    let base_offset = (desc >> 49) & 7;
    (swizzle == 0 && base_offset == 0).then(|| (field(0), field(16), field(32)))
}

/// The byte address of element (`mn`, `k`) of a K-major operand without swizzling: core
/// matrices of 8 rows (M or N) by 8 elements of K, each 128 contiguous bytes, `lbo` apart
/// along K and `sbo` apart along M or N.
fn k_major_address((start, lbo, sbo): (u32, u32, u32), mn: usize, k: usize) -> u32 {
    start + (mn / 8) as u32 * sbo + (k / 8) as u32 * lbo + (mn % 8) as u32 * 16 + (k % 8) as u32 * 2
}

/// The byte address of element (`n`, `k`) of an N-major B operand without swizzling: core
/// matrices of 8 rows of K by 8 elements of N, each 128 contiguous bytes, `lbo` apart along
/// K and `sbo` apart along N (the PTX ISA's canonical layout `((T,1,m),(8,k)) :
/// ((1,T,SBO),(1T,LBO))`).
fn n_major_address((start, lbo, sbo): (u32, u32, u32), n: usize, k: usize) -> u32 {
    start + (n / 8) as u32 * sbo + (k / 8) as u32 * lbo + (k % 8) as u32 * 16 + (n % 8) as u32 * 2
}

#[allow(clippy::too_many_arguments)]
extern "C" fn emu_wgmma(
    kind: u32,
    n: u32,
    from_registers: u32,
    a_desc: u64,
    a0: u32,
    a1: u32,
    a2: u32,
    a3: u32,
    b_desc: u64,
) {
    // Bit 0: f16 (else bf16); bit 1: B is N-major (else K-major).
    let half = if kind & 1 == 1 { Half::F16 } else { Half::Bf16 };
    let n_major_b = kind & 2 != 0;
    let value = |h: u16| match half {
        Half::Bf16 => bf16_value(h),
        Half::F16 => f16_value(h),
    };
    with_lane(|lane, block| {
        let thread = lane.thread();
        let words = [
            a0,
            a1,
            a2,
            a3,
            a_desc as u32,
            (a_desc >> 32) as u32,
            b_desc as u32,
            (b_desc >> 32) as u32,
        ];
        let all = exchange_group(lane, block, words);
        let first = thread - thread % GROUP_THREADS;
        if all
            .iter()
            .any(|w| w[6..] != words[6..] || (from_registers == 0 && w[4..6] != words[4..6]))
        {
            block.fail(format!(
                "wgmma in thread {thread}: the threads of its warpgroup gave different descriptors"
            ));
            return;
        }
        let (Some(bd), Some(ad)) = (
            descriptor(b_desc),
            if from_registers == 0 {
                descriptor(a_desc)
            } else {
                Some((0, 0, 0))
            },
        ) else {
            block.fail(format!(
                "wgmma in thread {thread}: a descriptor with swizzling or a base offset, which the emulator does not take"
            ));
            return;
        };
        let mut operands: Operands = Vec::new();
        let mut read = |address: u32, lane: &Lane| -> f32 {
            let Some(at) = block.at(lane, "wgmma", address, 2, 2) else {
                return 0.0;
            };
            block.check_async_read(thread, address);
            block.check_read(thread, "wgmma", address, 2);
            // SAFETY: `at` has 2 bytes in bounds.
            let h = unsafe { at.cast::<u16>().read_unaligned() };
            operands.push((address, h));
            value(h)
        };
        let warp = (thread % GROUP_THREADS) / 32;
        let (g, t) = (lane.lane / 4, lane.lane % 4);
        // The thread's two rows of A (of the warp's 16: g and g + 8), 16 values each.
        let mut a = [[0f32; 16]; 2];
        for (r, row) in a.iter_mut().enumerate() {
            let local = g + 8 * r;
            for (k, x) in row.iter_mut().enumerate() {
                *x = if from_registers == 1 {
                    // Lane (local % 8) * 4 + (k % 8) / 2 of the warp holds it, in register
                    // (local >= 8) + 2 (k >= 8), half k % 2.
                    let owner = first + warp * 32 + (local % 8) * 4 + (k % 8) / 2;
                    let reg = usize::from(local >= 8) + 2 * usize::from(k >= 8);
                    value(half_of(all[owner - first][reg], k % 2 == 1))
                } else {
                    read(k_major_address(ad, 16 * warp + local, k), lane)
                };
            }
        }
        for j in 0..n as usize / 8 {
            for c in 0..2 {
                let col = 8 * j + 2 * t + c;
                let column: Vec<f32> = (0..16)
                    .map(|k| {
                        let at = if n_major_b {
                            n_major_address(bd, col, k)
                        } else {
                            k_major_address(bd, col, k)
                        };
                        read(at, lane)
                    })
                    .collect();
                for (r, row) in a.iter().enumerate() {
                    let i = 4 * j + 2 * r + c;
                    let dot: f32 = row.iter().zip(&column).map(|(x, y)| x * y).sum();
                    lane.results[i] = (lane.accumulators[i] + dot).to_bits();
                }
            }
        }
        lane.open_wgmma.push(operands);
    });
}

extern "C" fn emu_wgmma_commit() {
    with_lane(|lane, _| {
        let batch = std::mem::take(&mut lane.open_wgmma);
        lane.wgmma_batches.push_back(batch);
    });
}

extern "C" fn emu_wgmma_wait(pending: u32) {
    with_lane(|lane, block| {
        while lane.wgmma_batches.len() > pending as usize {
            for operands in lane.wgmma_batches.pop_front().unwrap_or_default() {
                for (address, h) in operands {
                    let Some(at) = block.at(lane, "wgmma", address, 2, 2) else {
                        continue;
                    };
                    // SAFETY: `at` has 2 bytes in bounds.
                    if unsafe { at.cast::<u16>().read_unaligned() } != h {
                        block.fail(format!(
                            "wgmma in thread {}: shared memory at byte {address} changed while \
                             the wgmma reading it was in flight",
                            lane.thread()
                        ));
                        return;
                    }
                }
            }
        }
    });
}

/// The emulator's functions: the name the kernels call, the MLIR argument and result types
/// they declare, and the `extern "C"` function of those types.
fn functions() -> [(&'static str, &'static str, &'static str, *mut ()); 22] {
    let mma = "i32, i32, i32, i32, i32, i32, f32, f32, f32, f32";
    [
        ("zebra_emu_mma_bf16", mma, "", emu_mma_bf16 as *mut ()),
        ("zebra_emu_mma_f16", mma, "", emu_mma_f16 as *mut ()),
        (
            "zebra_emu_ldmatrix",
            "i32, i32, i32",
            "",
            emu_ldmatrix as *mut (),
        ),
        ("zebra_emu_result", "i32", "i32", emu_result as *mut ()),
        (
            "zebra_emu_pack_bf16",
            "f32, f32",
            "i32",
            emu_pack_bf16 as *mut (),
        ),
        (
            "zebra_emu_pack_f16",
            "f32, f32",
            "i32",
            emu_pack_f16 as *mut (),
        ),
        ("zebra_emu_exp2", "f32", "f32", emu_exp2 as *mut ()),
        ("zebra_emu_log2", "f32", "f32", emu_log2 as *mut ()),
        (
            "zebra_emu_ld_shared32",
            "i32",
            "i32",
            emu_ld_shared32 as *mut (),
        ),
        (
            "zebra_emu_shfl_xor",
            "f32, i32",
            "f32",
            emu_shfl_xor as *mut (),
        ),
        ("zebra_emu_barrier", "", "", emu_barrier as *mut ()),
        (
            "zebra_emu_cp_async",
            "i32, !llvm.ptr, i32",
            "",
            emu_cp_async as *mut (),
        ),
        ("zebra_emu_commit", "", "", emu_commit as *mut ()),
        ("zebra_emu_wait", "i32", "", emu_wait as *mut ()),
        (
            "zebra_emu_st_shared",
            "i32, i32, i32, i32, i32",
            "",
            emu_st_shared as *mut (),
        ),
        (
            "zebra_emu_st_shared32",
            "i32, i32",
            "",
            emu_st_shared32 as *mut (),
        ),
        (
            "zebra_emu_fence_proxy_async",
            "",
            "",
            emu_fence_proxy_async as *mut (),
        ),
        ("zebra_emu_wgmma_fence", "", "", emu_wgmma_fence as *mut ()),
        (
            "zebra_emu_wgmma_acc",
            "i32, f32",
            "",
            emu_wgmma_acc as *mut (),
        ),
        (
            "zebra_emu_wgmma",
            "i32, i32, i32, i64, i32, i32, i32, i32, i64",
            "",
            emu_wgmma as *mut (),
        ),
        (
            "zebra_emu_wgmma_commit",
            "",
            "",
            emu_wgmma_commit as *mut (),
        ),
        ("zebra_emu_wgmma_wait", "i32", "", emu_wgmma_wait as *mut ()),
    ]
}

/// The MLIR declarations of the emulator's functions.
fn declarations() -> String {
    functions()
        .iter()
        .map(|(name, args, result, _)| {
            let result = if result.is_empty() {
                String::new()
            } else {
                format!(" -> {result}")
            };
            format!("  func.func private @{name}({args}){result}\n")
        })
        .collect()
}

/// The body of a block: `(buffers, dims, block x, block y, thread)`.
type BlockFn = unsafe extern "C" fn(*const u64, *const i64, i64, i64, i64);

/// A tensor-core kernel compiled for the emulator.
pub struct EmulatedKernel {
    _engine: ExecutionEngine,
    function: BlockFn,
    threads: usize,
    shared_bytes: usize,
}

// SAFETY: after compilation the engine is only kept alive (its code is immutable), and the
// function it compiled keeps its state in the launch's blocks and threads.
unsafe impl Send for EmulatedKernel {}
unsafe impl Sync for EmulatedKernel {}

impl EmulatedKernel {
    /// Compiles the MLIR function `name(buffers, dims, x, y, thread, shared)` of `text` (a
    /// kernel generated with [`Lowering::Emulated`]).
    pub fn compile(
        function: &str,
        name: &str,
        threads: usize,
        shared_bytes: usize,
    ) -> Result<EmulatedKernel, CodegenError> {
        let wrapper = format!(
            "  func.func @{name}_emulated(%bufs: !llvm.ptr, %dims: !llvm.ptr, %x: i64, %y: i64, %tid: i64) {{
    %shared = llvm.mlir.zero : !llvm.ptr<3>
    func.call @{name}(%bufs, %dims, %x, %y, %tid, %shared) : (!llvm.ptr, !llvm.ptr, i64, i64, i64, !llvm.ptr<3>) -> ()
    return
  }}
"
        );
        let text = format!("module {{\n{}{function}{wrapper}}}\n", declarations());
        let mlir = Mlir::new();
        let module = mlir.lower(&text)?;
        let engine = ExecutionEngine::new(&module, 2, &[], false, false);
        for (symbol, _, _, address) in functions() {
            // SAFETY: each address is an `extern "C"` function with the argument and result
            // types the kernels declare for `symbol`.
            unsafe { engine.register_symbol(symbol, address) };
        }
        let address = engine.lookup(&format!("{name}_emulated"));
        if address.is_null() {
            return Err(CodegenError::Mlir(format!(
                "the emulated kernel `{name}` did not compile"
            )));
        }
        // SAFETY: the wrapper above has exactly this signature.
        let function: BlockFn = unsafe { std::mem::transmute::<*mut (), BlockFn>(address) };
        Ok(EmulatedKernel {
            _engine: engine,
            function,
            threads,
            shared_bytes,
        })
    }

    /// Runs the blocks `(x, y)` of `grid` one after the other, each with its threads on OS
    /// threads; `buffers` are host addresses, padded past their ends as for the GPU.
    pub fn launch(
        &self,
        grid: (usize, usize),
        buffers: &[u64],
        dims: &[i64],
    ) -> Result<(), CodegenError> {
        let warps = self.threads.div_ceil(32);
        let shadow = || -> Vec<AtomicU64> {
            (0..self.shared_bytes.div_ceil(4))
                .map(|_| AtomicU64::new(0))
                .collect()
        };
        for y in 0..grid.1 {
            for x in 0..grid.0 {
                let mut shared = vec![0u8; self.shared_bytes.max(16)];
                let block = Block {
                    shared: shared.as_mut_ptr(),
                    shared_bytes: self.shared_bytes,
                    barrier: YieldBarrier::new(self.threads),
                    warps: (0..warps)
                        .map(|_| WarpState {
                            barrier: YieldBarrier::new(32),
                            slots: [
                                Mutex::new([[0; SLOT_WORDS]; 32]),
                                Mutex::new([[0; SLOT_WORDS]; 32]),
                            ],
                        })
                        .collect(),
                    groups: (0..self.threads.div_ceil(GROUP_THREADS))
                        .map(|_| GroupState {
                            barrier: YieldBarrier::new(GROUP_THREADS.min(self.threads)),
                            slots: [
                                Mutex::new(vec![[0; SLOT_WORDS]; GROUP_THREADS]),
                                Mutex::new(vec![[0; SLOT_WORDS]; GROUP_THREADS]),
                            ],
                        })
                        .collect(),
                    error: Mutex::new(None),
                    written: shadow(),
                    read: shadow(),
                    write_time: shadow(),
                    fenced: (0..self.threads).map(|_| AtomicU64::new(0)).collect(),
                    clock: AtomicU64::new(0),
                };
                let block_ref = &block;
                let function = self.function;
                let (buffers, dims) = (buffers.as_ptr() as usize, dims.as_ptr() as usize);
                std::thread::scope(|scope| {
                    for tid in 0..self.threads {
                        scope.spawn(move || {
                            LANE.with(|cell| {
                                *cell.borrow_mut() = Some(Lane {
                                    block: block_ref,
                                    warp: tid / 32,
                                    lane: tid % 32,
                                    open: Vec::new(),
                                    groups: VecDeque::new(),
                                    results: [0; RESULTS],
                                    turn: 0,
                                    group_turn: 0,
                                    accumulators: [0.0; RESULTS],
                                    open_wgmma: Vec::new(),
                                    wgmma_batches: VecDeque::new(),
                                });
                            });
                            // SAFETY: the kernel reads the buffers and dims of the launch,
                            // which outlive the scope.
                            unsafe {
                                function(
                                    buffers as *const u64,
                                    dims as *const i64,
                                    x as i64,
                                    y as i64,
                                    tid as i64,
                                );
                            }
                            LANE.with(|cell| {
                                if let Some(lane) = cell.borrow_mut().take()
                                    && (!lane.open_wgmma.is_empty()
                                        || !lane.wgmma_batches.is_empty())
                                {
                                    block_ref.fail(format!(
                                        "thread {} ended with wgmma products it never waited for",
                                        lane.thread()
                                    ));
                                }
                            });
                        });
                    }
                });
                drop(shared);
                if let Some(error) = block.error.into_inner().unwrap_or_else(|e| e.into_inner()) {
                    return Err(CodegenError::Io(format!(
                        "emulated block ({x}, {y}): {error}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A tensor-core projection compiled for the emulator: launch it on the grid
/// `(ceil(B T / block_m), column_blocks)` with the CPU kernel's buffers (16-byte aligned).
pub fn compile_projection(
    name: &str,
    projection: &crate::kernels::projection_mma::ProjectionMma,
    half: Half,
) -> Result<EmulatedKernel, CodegenError> {
    let function =
        crate::kernels::projection_mma::projection_mma(name, projection, half, Lowering::Emulated);
    EmulatedKernel::compile(&function, name, THREADS, projection.shared_bytes())
}

/// A tensor-core attention kernel compiled for the emulator, with the description the
/// runtime's checks take.
pub struct EmulatedAttention {
    pub kernel: EmulatedKernel,
    pub entry: AttentionEntry,
}

impl EmulatedAttention {
    pub fn compile(
        name: &str,
        attention: &zebra_ir::op::AttentionKernel,
        half: Half,
        tiles: MmaTiles,
    ) -> Result<EmulatedAttention, CodegenError> {
        let function = attention_mma(
            name,
            attention,
            half,
            tiles,
            Lowering::Emulated,
            crate::kernels::attention_mma::AttentionIo::Half,
        );
        EmulatedAttention::from_function(&function, name, attention, tiles)
    }

    /// The same from the kernel's MLIR function as [`attention_mma`] generates it with
    /// [`Lowering::Emulated`] (or as a test altered it).
    pub fn from_function(
        function: &str,
        name: &str,
        attention: &zebra_ir::op::AttentionKernel,
        tiles: MmaTiles,
    ) -> Result<EmulatedAttention, CodegenError> {
        let kernel =
            EmulatedKernel::compile(function, name, tiles.threads(), tiles.shared_bytes())?;
        let entry = crate::artifact::attention_entry(name, attention, tiles);
        Ok(EmulatedAttention { kernel, entry })
    }

    /// Runs the kernel on 16-bit `q`, `k`, `v` (`[B, H or KV, T, D]`) into `out`, with the
    /// schedule's and side inputs' word buffers and the dims of
    /// [`zebra_runtime::attention_check::AttentionCase`]. Query tile `x` of the grid is
    /// the tile the GPU's block `tiles - 1 - x` takes; the order does not matter here.
    pub fn run(
        &self,
        [q, k, v]: [&[u16]; 3],
        out: &mut [u16],
        words: &[Vec<u64>],
        dims: [i64; 3],
    ) -> Result<(), CodegenError> {
        let (b, t) = (dims[0] as usize, dims[1] as usize);
        let e = &self.entry;
        let expect = |what: &str, len: usize, heads: usize| {
            let want = b * heads * t * e.head_dim;
            if len == want {
                Ok(())
            } else {
                Err(CodegenError::Io(format!(
                    "emulated attention: `{what}` has {len} elements, not {want}"
                )))
            }
        };
        expect("q", q.len(), e.heads)?;
        expect("k", k.len(), e.kv_heads)?;
        expect("v", v.len(), e.kv_heads)?;
        expect("out", out.len(), e.heads)?;
        // The kernel reads whole 16-byte rows clamped to the sequence, and may read a little
        // past the last one: pad as the GPU path does.
        let padded = |x: &[u16]| -> Vec<u16> {
            let mut p = x.to_vec();
            p.resize(x.len() + 64, 0);
            p
        };
        let (q, k, v) = (padded(q), padded(k), padded(v));
        let mut o = vec![0u16; out.len() + 64];
        let mut buffers: Vec<u64> = vec![
            q.as_ptr() as u64,
            k.as_ptr() as u64,
            v.as_ptr() as u64,
            o.as_mut_ptr() as u64,
        ];
        buffers.extend(words.iter().map(|w| w.as_ptr() as u64));
        self.kernel
            .launch((t.div_ceil(e.block_q), b * e.heads), &buffers, &dims)?;
        out.copy_from_slice(&o[..out.len()]);
        Ok(())
    }
}
