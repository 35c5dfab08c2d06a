//! How the kernels share out their work over candle's thread pool.
//!
//! Candle's `execute_chunked` hands out sixteenths of the work (8 grabs per thread on 2 threads),
//! so the thread that takes the last one runs alone for half a sixteenth on average: measured as
//! 4-5% of a 448² image encode spent waiting at the barrier (docs/benchmarks.md, session 11).
//! [`parallel_for`] hands out a share of what is left instead (guided scheduling): large pieces
//! first, single units at the end, so the threads finish within one unit of each other. It runs on
//! the same pool as candle's own operations, so there is still one set of threads.

use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    /// Set while this thread runs a piece of a [`parallel_for`]: a nested call runs inline (the
    /// pool takes one call at a time; waiting for it from inside would never end).
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Clears [`INSIDE`] when a piece ends, even by a panic (which the pool carries to the caller).
struct Inside(bool);

impl Inside {
    fn enter() -> Self {
        Inside(INSIDE.replace(true))
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.set(self.0);
    }
}

/// Calls `f` on ranges that cover `0..n` once, spread over candle's thread pool; each thread makes
/// its own scratch state with `init` the first time it takes a range (once per call, not per range).
pub fn parallel_for_with<S>(
    n: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, Range<usize>) + Sync,
) {
    if n == 0 {
        return;
    }
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    if threads == 1 || n == 1 || INSIDE.get() {
        let _inside = Inside::enter();
        return f(&mut init(), 0..n);
    }
    let cursor = AtomicUsize::new(0);
    pool.execute(|_| {
        let _inside = Inside::enter();
        let mut state = None;
        let mut start = cursor.load(Ordering::Relaxed);
        while start < n {
            // A share of what is left: each thread's next grab is at most half of its fair part.
            let take = ((n - start) / (2 * threads)).max(1);
            match cursor.compare_exchange_weak(
                start,
                start + take,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    f(state.get_or_insert_with(&init), start..start + take);
                    start = cursor.load(Ordering::Relaxed);
                }
                Err(now) => start = now,
            }
        }
    });
}

/// Calls `f(i, row)` once for every row of every matrix `i` (`rows[i]` rows), in blocks of `block`
/// rows numbered across the matrices and spread over candle's thread pool (the matrix-vector
/// products: the weights of q, k and v, or gate and up, shared out as one piece of work).
pub fn for_each_row(rows: &[usize], block: usize, f: impl Fn(usize, usize) + Sync) {
    let block = block.max(1);
    let mut starts = Vec::with_capacity(rows.len());
    let mut total = 0;
    for &r in rows {
        starts.push(total);
        total += r.div_ceil(block);
    }
    parallel_for(total, |units| {
        for unit in units {
            let i = starts.partition_point(|&s| s <= unit) - 1;
            let r0 = (unit - starts[i]) * block;
            for row in r0..(r0 + block).min(rows[i]) {
                f(i, row);
            }
        }
    });
}

/// [`parallel_for_with`] without scratch state.
pub fn parallel_for(n: usize, f: impl Fn(Range<usize>) + Sync) {
    parallel_for_with(n, || (), |_, range| f(range))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Every index is given out exactly once, for sizes around the schedule's edges, and a nested
    /// call (run inline) covers all of its own range inside each outer range.
    #[test]
    fn ranges_cover_every_index_once() {
        for n in [0, 1, 2, 3, 7, 16, 17, 100, 1001] {
            let seen = Mutex::new(vec![0u32; n]);
            let (ranges, nested) = (AtomicUsize::new(0), AtomicUsize::new(0));
            parallel_for(n, |range| {
                assert!(!range.is_empty() && range.end <= n);
                ranges.fetch_add(1, Ordering::Relaxed);
                parallel_for(3, |r| {
                    nested.fetch_add(r.len(), Ordering::Relaxed);
                });
                let mut s = seen.lock().unwrap();
                range.for_each(|i| s[i] += 1);
            });
            assert!(
                seen.into_inner().unwrap().iter().all(|&c| c == 1),
                "n = {n}"
            );
            assert_eq!(nested.into_inner(), 3 * ranges.into_inner(), "n = {n}");
        }
    }

    /// Each thread's scratch state is made once per call, however many ranges it takes.
    #[test]
    fn state_is_made_once_per_thread() {
        let made = AtomicUsize::new(0);
        let covered = AtomicUsize::new(0);
        parallel_for_with(
            500,
            || made.fetch_add(1, Ordering::Relaxed),
            |_, range| {
                covered.fetch_add(range.len(), Ordering::Relaxed);
            },
        );
        assert_eq!(covered.into_inner(), 500);
        let threads = candle_core::utils::barrier_pool().n_workers() + 1;
        assert!((1..=threads).contains(&made.into_inner()));
    }
}
