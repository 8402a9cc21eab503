//! The certificate manager's bookkeeping at N hosts, without a CA: a first
//! issuance (every host pending) drained through `max_concurrent_orders`
//! slots, one manager turn per finished attempt, each turn doing with the
//! [`Queue`] what `Manager::run` does (start due hosts, count progress,
//! find the next due time). Measures that bookkeeping alone
//! (docs/PERFORMANCE.md, "ACME scheduling at 100,000 domains").
//!
//! ```text
//! acme_queue [--domains 1000,10000,100000] [--concurrency 4]
//!            [--fail-every 10] [--max-seconds 120]
//! ```
//!
//! The first attempt of every `--fail-every`-th host fails and is retried after a backoff
//! (simulated clock), so the failing counter and timer wake-ups are
//! exercised too. A drain that takes longer than `--max-seconds` stops
//! there and its total is extrapolated from the turns done (`"complete":
//! false`). Prints one JSON line per N.

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use mtasts::acme::queue::{Counts, Queue, Queued};

struct Args {
    domains: Vec<usize>,
    concurrency: usize,
    fail_every: usize,
    max_seconds: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        domains: vec![1000, 10_000, 100_000],
        concurrency: 4,
        fail_every: 10,
        max_seconds: 120.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--domains" => {
                args.domains = val()?
                    .split(',')
                    .map(|n| n.parse().map_err(|e| format!("{a}: {e}")))
                    .collect::<Result<_, _>>()?;
            }
            "--concurrency" => {
                args.concurrency = val()?.parse().map_err(|e| format!("{a}: {e}"))?;
            }
            "--fail-every" => args.fail_every = val()?.parse().map_err(|e| format!("{a}: {e}"))?,
            "--max-seconds" => {
                args.max_seconds = val()?.parse().map_err(|e| format!("{a}: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.concurrency == 0 || args.fail_every == 0 {
        return Err("--concurrency and --fail-every must be at least 1".to_owned());
    }
    Ok(args)
}

/// What the manager keeps per host, reduced to what the queue looks at.
struct Entry {
    due: SystemTime,
    valid: bool,
    failures: u32,
    /// The first attempt of this host fails.
    fails_first: bool,
}

impl Queued for Entry {
    fn due(&self) -> SystemTime {
        self.due
    }
    fn valid(&self) -> bool {
        self.valid
    }
    fn failing(&self) -> bool {
        self.failures > 0
    }
}

/// Simulated time an attempt takes, and the retry delay after a failure.
const ATTEMPT: Duration = Duration::from_secs(2);
const BACKOFF: Duration = Duration::from_secs(600);
const RENEW: Duration = Duration::from_secs(60 * 86_400);

fn run(n: usize, args: &Args) -> String {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let built = Instant::now();
    let mut queue = Queue::new();
    for i in 0..n {
        let entry = Entry {
            due: start,
            valid: false,
            failures: 0,
            fails_first: i % args.fail_every == 0,
        };
        queue.insert(format!("mta-sts.d{i}.bench.test").into(), entry);
    }
    let build_s = built.elapsed().as_secs_f64();

    let mut now = start;
    // Attempts under way, oldest first: the oldest finishes next.
    let mut in_flight: VecDeque<Box<str>> = VecDeque::new();
    let mut turns = 0usize;
    // One turn per finished attempt (plus a few timer wake-ups).
    let expected_turns = n + n.div_ceil(args.fail_every);
    let mut first_turns = Duration::ZERO;
    let mut first_count = 0usize;
    let mut complete = true;
    let drained = Instant::now();
    loop {
        let turn = Instant::now();
        // What one turn of `Manager::run` does with the queue.
        let free = args.concurrency.saturating_sub(in_flight.len());
        for host in queue.start(now, free) {
            if queue.get(&host).is_some() {
                in_flight.push_back(host);
            }
        }
        let counts = black_box(queue.counts());
        let next_due = black_box(queue.next_due());
        if turns < 100 {
            first_turns += turn.elapsed();
            first_count += 1;
        }
        turns += 1;
        if counts.valid == n && in_flight.is_empty() {
            break;
        }
        if drained.elapsed().as_secs_f64() > args.max_seconds {
            complete = false;
            break;
        }
        // The next event: the oldest attempt finishes, or (nothing under
        // way) the timer fires at the next due time.
        let Some(host) = in_flight.pop_front() else {
            match next_due {
                Some(t) => now = now.max(t),
                None => break,
            }
            continue;
        };
        now += ATTEMPT / u32::try_from(args.concurrency).unwrap_or(u32::MAX);
        queue.done(&host);
        queue.update(&host, |e| {
            if e.fails_first && e.failures == 0 {
                e.failures += 1;
                e.due = now + BACKOFF;
            } else {
                e.failures = 0;
                e.valid = true;
                e.due = now + RENEW;
            }
        });
    }
    let drain = drained.elapsed().as_secs_f64();
    let recount = Counts {
        configured: queue.len(),
        valid: queue
            .hosts()
            .filter(|h| queue.get(h).is_some_and(|e| e.valid))
            .count(),
        failing: queue
            .hosts()
            .filter(|h| queue.get(h).is_some_and(|e| e.failures > 0))
            .count(),
    };
    let counts_ok = queue.counts() == recount;
    let per_turn_us = drain / turns as f64 * 1e6;
    let total_s = if complete {
        drain
    } else {
        drain / turns as f64 * expected_turns as f64
    };
    format!(
        "{{\"domains\": {n}, \"concurrency\": {}, \"build_s\": {build_s:.3}, \
         \"first_turn_us\": {:.1}, \"per_turn_us\": {per_turn_us:.1}, \"turns\": {turns}, \
         \"expected_turns\": {expected_turns}, \"drain_s\": {drain:.3}, \
         \"total_s\": {total_s:.3}, \"complete\": {complete}, \"counts_ok\": {counts_ok}}}",
        args.concurrency,
        first_turns.as_secs_f64() / first_count.max(1) as f64 * 1e6,
    )
}

fn main() -> Result<(), String> {
    let args = parse_args()?;
    for &n in &args.domains {
        println!("{}", run(n, &args));
    }
    Ok(())
}
