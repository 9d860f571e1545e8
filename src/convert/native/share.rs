//! How the conversions running in one process share its cores.
//!
//! A daemon runs up to MAX_CONCURRENT jobs at once, and each pipeline used to keep one worker
//! per core busy, so N jobs ran N × cores CPU-bound workers. Now every pipeline registers a
//! [`Ticket`] while it runs, and may have at most [`share`] of its workers working on a chunk
//! at a time: the process's cores split between the running pipelines in proportion to their
//! *demand*, the fraction of its workers' time spent on the CPU (the rest is spent waiting in
//! `read` for a slow source, or for the writer). Equal CPU-bound jobs get `cores / jobs`
//! each (never less than one); a lone job, like `hyper2kvm convert` or the last job of a
//! batch, gets every core; a job waiting on a slow source keeps one worker, and the cores it
//! leaves go to the jobs that can use them. The split follows the jobs as they start and end:
//! it is looked at again before each chunk.
//!
//! The split is by the jobs actually running, not by MAX_CONCURRENT: with one job running, a
//! fixed `cores / MAX_CONCURRENT` would leave cores idle for nothing (docs/DECISIONS.md has the
//! figures).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Demand assumed for a pipeline before it has timed a chunk: CPU-bound, the safe guess.
const INITIAL_DEMAND: f64 = 1.0;
/// The lowest demand counted, so that an idle-looking job still gets its one worker's worth.
const MIN_DEMAND: f64 = 0.05;
/// Weight of the newest chunk in a pipeline's demand (an exponential moving average).
const SMOOTHING: f64 = 0.25;

/// The running pipelines of this process: (ticket id, demand).
struct Registry {
    next_id: u64,
    jobs: Vec<(u64, f64)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { next_id: 0, jobs: Vec::new() });

fn registry() -> MutexGuard<'static, Registry> {
    // The registry holds plain numbers: a panic elsewhere cannot leave it inconsistent.
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Workers one pipeline may have working at once: its part of `cores` in proportion to its
/// `demand` among the `demands` of every running pipeline (its own included), rounded to the
/// nearest, at least 1 and at most `cores`.
pub fn share(cores: usize, demand: f64, demands: &[f64]) -> usize {
    let cores = cores.max(1);
    let mine = demand.max(MIN_DEMAND);
    let total: f64 = demands.iter().map(|d| d.max(MIN_DEMAND)).sum::<f64>().max(mine);
    let part = (cores as f64 * mine / total).round() as usize;
    part.clamp(1, cores)
}

/// One running pipeline's place in the split; leaves it when dropped.
pub struct Ticket {
    id: u64,
    cores: usize,
}

impl Ticket {
    /// Registers a pipeline that may use up to `cores` workers.
    pub fn register(cores: usize) -> Ticket {
        let mut registry = registry();
        let id = registry.next_id;
        registry.next_id += 1;
        registry.jobs.push((id, INITIAL_DEMAND));
        Ticket { id, cores }
    }

    /// How many of this pipeline's workers may work on a chunk now ([`share`]).
    pub fn allowed(&self) -> usize {
        let registry = registry();
        let demands: Vec<f64> = registry.jobs.iter().map(|(_, d)| *d).collect();
        let mine = registry.jobs.iter().find(|(id, _)| *id == self.id).map_or(INITIAL_DEMAND, |(_, d)| *d);
        share(self.cores, mine, &demands)
    }

    /// Records one chunk of a worker: `cpu` of CPU time over `wall` of wall time.
    pub fn record(&self, cpu: Duration, wall: Duration) {
        if wall.is_zero() {
            return;
        }
        let fraction = (cpu.as_secs_f64() / wall.as_secs_f64()).clamp(0.0, 1.0);
        let mut registry = registry();
        if let Some((_, demand)) = registry.jobs.iter_mut().find(|(id, _)| *id == self.id) {
            *demand += SMOOTHING * (fraction - *demand);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        registry().jobs.retain(|(id, _)| *id != self.id);
    }
}

/// CPU time the calling thread has used so far (zero where the clock cannot be read, which
/// then reads as "not CPU-bound" for that chunk only).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the struct it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_cpu_bound_jobs_split_the_cores() {
        assert_eq!(share(2, 1.0, &[1.0]), 2, "a lone job gets every core");
        assert_eq!(share(2, 1.0, &[1.0, 1.0]), 1);
        assert_eq!(share(8, 1.0, &[1.0, 1.0]), 4);
        assert_eq!(share(8, 1.0, &[1.0; 4]), 2);
        assert_eq!(share(16, 1.0, &[1.0; 3]), 5);
    }

    #[test]
    fn every_job_keeps_one_worker_however_many_run() {
        assert_eq!(share(2, 1.0, &[1.0; 4]), 1);
        assert_eq!(share(2, 1.0, &[1.0; 200]), 1);
        assert_eq!(share(0, 1.0, &[]), 1);
        assert_eq!(share(2, 0.0, &[0.0, 0.0]), 1);
    }

    #[test]
    fn a_job_waiting_on_its_source_leaves_its_cores_to_a_cpu_bound_one() {
        // The CPU-bound job's workers spend 95 % of their time on the CPU, the slow source's 10 %.
        let demands = [0.95, 0.10];
        assert_eq!(share(2, 0.95, &demands), 2);
        assert_eq!(share(2, 0.10, &demands), 1);
        assert_eq!(share(8, 0.95, &demands), 7);
        assert_eq!(share(8, 0.10, &demands), 1);
        // Two jobs both half waiting: the split stays even.
        assert_eq!(share(8, 0.5, &[0.5, 0.5]), 4);
    }

    #[test]
    fn demand_follows_the_recorded_chunks_and_tickets_leave_when_dropped() {
        let slow = Ticket::register(64);
        let busy = Ticket::register(64);
        for _ in 0..30 {
            slow.record(Duration::from_millis(5), Duration::from_millis(100));
            busy.record(Duration::from_millis(100), Duration::from_millis(100));
        }
        // Other tests' tickets may be registered meanwhile: compare, do not pin.
        assert!(busy.allowed() > 4 * slow.allowed(), "busy {} slow {}", busy.allowed(), slow.allowed());
        let alone_before = busy.allowed();
        drop(slow);
        assert!(busy.allowed() >= alone_before);
        let id = busy.id;
        drop(busy);
        assert!(registry().jobs.iter().all(|(i, _)| *i != id));
    }

    #[test]
    fn thread_cpu_time_advances_with_work() {
        let before = thread_cpu_time();
        let mut x = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time() > before);
    }
}
