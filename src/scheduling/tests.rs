use super::*;

/// A reading `slices` time slices after `base` with `mean_us` of run-queue
/// delay each.
fn after(base: Sample, slices: u64, mean_us: u64) -> Sample {
    Sample {
        run_delay_ns: base.run_delay_ns + slices * mean_us * 1_000,
        slices: base.slices + slices,
    }
}

#[test]
fn stays_batch_while_the_delay_is_low() {
    let t0 = Instant::now();
    let mut c = Controller::new(Sample::default());
    let mut s = Sample::default();
    for i in 1..=50 {
        s = after(s, 500, 30);
        assert_eq!(c.step(t0 + CHECK_INTERVAL * i, s), None);
    }
    assert_eq!(c.policy(), Policy::Batch);
}

#[test]
fn falls_back_on_high_delay_and_probes_after_a_doubling_hold() {
    let t0 = Instant::now();
    let mut c = Controller::new(Sample::default());
    let busy = after(Sample::default(), 100, 180);
    assert_eq!(c.step(t0, busy), Some(Policy::Normal));
    // Held under the normal policy for FIRST_HOLD, whatever the delay says.
    let calm = after(busy, 1_000, 10);
    assert_eq!(c.step(t0 + FIRST_HOLD / 2, calm), None);
    assert_eq!(c.policy(), Policy::Normal);
    // Then one probe in batch, judged only on slices run after it began.
    assert_eq!(c.step(t0 + FIRST_HOLD, calm), Some(Policy::Batch));
    let t1 = t0 + FIRST_HOLD;
    assert_eq!(c.step(t1, after(calm, 100, 500)), Some(Policy::Normal));
    // The second failure holds twice as long.
    let s = after(calm, 100, 500);
    assert_eq!(c.step(t1 + FIRST_HOLD * 2 - CHECK_INTERVAL, s), None);
    assert_eq!(c.step(t1 + FIRST_HOLD * 2, s), Some(Policy::Batch));
}

#[test]
fn hold_is_capped_and_reset_by_a_good_probe() {
    let mut now = Instant::now();
    let mut c = Controller::new(Sample::default());
    let mut s = Sample::default();
    let mut holds = Vec::new();
    for _ in 0..10 {
        s = after(s, 100, 300);
        assert_eq!(c.step(now, s), Some(Policy::Normal));
        let start = now;
        while c.step(now, s).is_none() {
            now += CHECK_INTERVAL;
        }
        holds.push(now - start);
    }
    assert_eq!(holds[0], FIRST_HOLD);
    assert_eq!(holds[1], FIRST_HOLD * 2);
    assert_eq!(*holds.last().unwrap(), MAX_HOLD);
    // A probe that passes resets the hold to the first one.
    s = after(s, 100, 20);
    assert_eq!(c.step(now, s), None);
    s = after(s, 100, 300);
    assert_eq!(c.step(now, s), Some(Policy::Normal));
    let start = now;
    while c.step(now, s).is_none() {
        now += CHECK_INTERVAL;
    }
    assert_eq!(now - start, FIRST_HOLD);
}

#[test]
fn judges_only_once_enough_slices_ran() {
    let t0 = Instant::now();
    let mut c = Controller::new(Sample::default());
    // A quiet sidecar: a few slow slices at a time are accumulated, not
    // judged one reading at a time...
    let mut s = Sample::default();
    for _ in 0..(MIN_SLICES / 4 - 1) {
        s = after(s, 4, 400);
        assert_eq!(c.step(t0, s), None);
    }
    // ...until there are enough of them.
    s = after(s, 4, 400);
    assert_eq!(c.step(t0, s), Some(Policy::Normal));
}

#[test]
fn the_mean_is_compared_with_the_limit_exactly() {
    let t0 = Instant::now();
    let limit_us = u64::try_from(MAX_MEAN_DELAY.as_micros()).unwrap();
    let mut c = Controller::new(Sample::default());
    let at = after(Sample::default(), 64, limit_us);
    assert_eq!(c.step(t0, at), None);
    let over = Sample {
        run_delay_ns: at.run_delay_ns + 64 * (limit_us * 1_000 + 1),
        slices: at.slices + 64,
    };
    assert_eq!(c.step(t0, over), Some(Policy::Normal));
}

#[test]
fn a_thread_that_exits_restarts_the_count() {
    let t0 = Instant::now();
    let big = Sample {
        run_delay_ns: 10_000_000,
        slices: 1_000,
    };
    let mut c = Controller::new(big);
    // Totals fell (a busy thread exited): no underflow, no verdict.
    let fell = Sample {
        run_delay_ns: 100,
        slices: 10,
    };
    assert_eq!(c.step(t0, fell), None);
    // Judged from the new base: 64 slices at 20 µs.
    assert_eq!(c.step(t0, after(fell, 64, 20)), None);
    assert_eq!(c.policy(), Policy::Batch);
}

/// The real system calls: the kernel's figures are readable and the policy
/// lands on this thread. It leaves the process under the normal policy.
#[cfg(target_os = "linux")]
#[test]
fn the_policy_reaches_the_threads() {
    let s = os::sample().expect("/proc/self/task/*/schedstat readable");
    assert!(s.slices > 0, "a running test thread has run slices: {s:?}");
    os::apply(Policy::Batch).expect("SCHED_BATCH needs no privilege");
    let batch = os::current();
    os::apply(Policy::Normal).expect("back to SCHED_OTHER");
    assert_eq!(batch, libc::SCHED_BATCH);
    assert_eq!(os::current(), libc::SCHED_OTHER);
}
