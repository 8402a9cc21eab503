//! Pure timing rules of the certificate manager: when a certificate is due
//! for renewal, how long to back off after a failure, how many orders the
//! pacing window allows, and whether DNS points at this server. No I/O here,
//! so every rule has a unit test.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::ChallengeKind;
use crate::store::CertState;

/// Unix seconds of `t` (0 before 1970).
pub fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `t + d`, saturating at ten years after `t` instead of panicking: config
/// bounds every duration, and a value that slipped through (a stored state,
/// a future setting) must still not stop the manager.
pub fn after(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d.min(crate::config::MAX_DURATION))
        .unwrap_or(t)
}

/// The `SystemTime` of unix seconds `secs` (clamped at the epoch).
pub fn from_unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// When a certificate valid from `not_before` to `not_after` (unix seconds)
/// should be renewed: `renew_before` ahead of expiry when configured, else at
/// two thirds of its lifetime (Let's Encrypt's own advice for 90-day
/// certificates: renew with 30 days left).
pub fn renew_at(not_before: i64, not_after: i64, renew_before: Option<Duration>) -> i64 {
    let lifetime = not_after.saturating_sub(not_before).max(0);
    match renew_before {
        Some(before) => {
            let before = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
            not_after.saturating_sub(before).max(not_before)
        }
        None => not_before.saturating_add(lifetime / 3 * 2 + lifetime % 3 * 2 / 3),
    }
}

/// Delay before attempt number `failures + 1`: `initial` doubled per earlier
/// failure, capped at `max`, then scaled by a jitter factor in [0.5, 1.0)
/// from `unit` (a uniform sample in [0, 1)) so that many domains that failed
/// together do not retry together.
pub fn backoff(failures: u32, initial: Duration, max: Duration, unit: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(32);
    let base = initial.saturating_mul(1u32 << exp.min(31)).min(max);
    base.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
}

/// First pause before looking at an order the CA is working on.
pub const POLL_FIRST: Duration = Duration::from_millis(250);
/// Longest pause between two looks at an order.
pub const POLL_MAX: Duration = Duration::from_secs(2);

/// Pause before look number `looks + 1` at an order while the CA validates
/// or issues: [`POLL_FIRST`], half as long again each time, at most
/// [`POLL_MAX`]. A CA that takes `t` is noticed by `t + POLL_MAX` at the
/// latest, not by about `2 t` as with a doubling pause; a busy CA that
/// takes a few seconds (loaded test machine) costs little extra.
pub fn poll_delay(looks: u32) -> Duration {
    let factor = 1.5f64.powi(i32::try_from(looks.min(64)).unwrap_or(64));
    POLL_FIRST.mul_f64(factor).min(POLL_MAX)
}

/// A sliding one-hour window of order start times: at most `per_hour`
/// orders in any hour.
#[derive(Debug)]
pub struct Pacer {
    per_hour: usize,
    starts: VecDeque<i64>,
}

const HOUR: i64 = 3600;

impl Pacer {
    /// A window allowing `per_hour` orders (at least 1).
    pub fn new(per_hour: u32) -> Pacer {
        Pacer {
            per_hour: usize::try_from(per_hour).unwrap_or(usize::MAX).max(1),
            starts: VecDeque::new(),
        }
    }

    /// Seeds the window with orders placed before a restart.
    pub fn seed(&mut self, mut starts: Vec<i64>, now: i64) {
        starts.retain(|t| *t > now - HOUR && *t <= now);
        starts.sort_unstable();
        self.starts = starts.into();
        self.expire(now);
    }

    fn expire(&mut self, now: i64) {
        while self.starts.front().is_some_and(|t| *t <= now - HOUR) {
            self.starts.pop_front();
        }
        while self.starts.len() > self.per_hour {
            self.starts.pop_front();
        }
    }

    /// Takes a slot at `now`, or says how long until one frees up.
    pub fn take(&mut self, now: i64) -> Result<(), Duration> {
        self.expire(now);
        if self.starts.len() < self.per_hour {
            self.starts.push_back(now);
            return Ok(());
        }
        let oldest = self.starts.front().copied().unwrap_or(now);
        let wait = (oldest + HOUR - now).max(1);
        Err(Duration::from_secs(u64::try_from(wait).unwrap_or(1)))
    }

    /// Time to start `queued` more orders at this rate (for the ETA).
    pub fn eta(&self, queued: usize) -> Duration {
        let per_hour = self.per_hour as f64;
        Duration::from_secs_f64(queued as f64 / per_hour * 3600.0)
    }
}

/// The DNS precheck: every address `host` resolves to must be one of ours
/// (`expected`), or the CA may validate against another server. With no
/// expected addresses configured, resolving at all is the only check.
pub fn precheck(host: &str, resolved: &[IpAddr], expected: &[IpAddr]) -> Result<(), String> {
    if resolved.is_empty() {
        return Err(format!(
            "{host} has no A/AAAA record; point it at this server"
        ));
    }
    if expected.is_empty() {
        return Ok(());
    }
    let foreign: Vec<String> = resolved
        .iter()
        .filter(|a| !expected.contains(a))
        .map(ToString::to_string)
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    let expected: Vec<String> = expected.iter().map(ToString::to_string).collect();
    Err(format!(
        "{host} resolves to {} which is not this server (expected {}; set host_a/host_aaaa, host_cname or tls.server_addresses, or precheck_dns = false)",
        foreign.join(", "),
        expected.join(", ")
    ))
}

/// What the CA's renewal information (ARI, RFC 9773) means for a
/// certificate whose own renewal time is `renew_at` (unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AriDecision {
    /// Renew now (the window has opened, or our own time has come).
    RenewNow,
    /// Look again at this time (a point in the window, our own renewal
    /// time, or when the CA's Retry-After says, whichever is first).
    CheckAt(i64),
}

/// RFC 9773 §4.2: renew at a uniformly random point of the suggested window
/// (`unit` in [0, 1)); check again after Retry-After (clamped to 1 h..1 d).
/// Never later than our own `renew_at`: an ARI window far in the future
/// does not postpone the 2/3 rule.
pub fn ari_decision(
    now: i64,
    window: (i64, i64),
    renew_at: i64,
    retry_after: Duration,
    unit: f64,
) -> AriDecision {
    let (start, end) = window;
    if start <= now || renew_at <= now {
        return AriDecision::RenewNow;
    }
    let span = end.saturating_sub(start).max(0) as f64;
    let pick = start.saturating_add((span * unit.clamp(0.0, 1.0)) as i64);
    let retry = i64::try_from(retry_after.as_secs().clamp(3600, 86_400)).unwrap_or(86_400);
    AriDecision::CheckAt(pick.min(renew_at).min(now.saturating_add(retry)))
}

/// Messages of failed validations start with this ([`challenge_for`] keys
/// on it, also after a restart, since it is stored in `CertState`).
pub const VALIDATION_PREFIX: &str = "validation";

/// The challenge of the next attempt: the preferred one, but the other one
/// right after the preferred one failed validation, so one blocked port
/// (80 or 443) does not stall a domain. Alternates while both fail.
pub fn challenge_for(preferred: ChallengeKind, state: &CertState) -> ChallengeKind {
    let failed_validation = state.failures > 0
        && state
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with(VALIDATION_PREFIX));
    match state.last_challenge.as_deref() {
        Some(last) if failed_validation && last == preferred.as_str() => preferred.other(),
        _ => preferred,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ari_window_rules() {
        let hour = Duration::from_secs(3600);
        // Window open: renew.
        assert_eq!(
            ari_decision(100, (50, 200), 1000, hour, 0.5),
            AriDecision::RenewNow
        );
        // Our own time has come, whatever the window says.
        assert_eq!(
            ari_decision(1000, (5000, 6000), 900, hour, 0.5),
            AriDecision::RenewNow
        );
        // Window ahead: a point inside it, unless Retry-After or our own time is sooner.
        assert_eq!(
            ari_decision(
                0,
                (10_000, 20_000),
                1_000_000,
                Duration::from_secs(86_400),
                0.5
            ),
            AriDecision::CheckAt(15_000)
        );
        assert_eq!(
            ari_decision(0, (10_000, 20_000), 1_000_000, Duration::from_secs(10), 0.5),
            AriDecision::CheckAt(3600),
            "Retry-After is clamped to at least an hour"
        );
        assert_eq!(
            ari_decision(
                0,
                (100_000, 200_000),
                50_000,
                Duration::from_secs(86_400),
                0.5
            ),
            AriDecision::CheckAt(50_000)
        );
    }

    #[test]
    fn challenge_falls_back_after_failed_validation_only() {
        let http = ChallengeKind::Http01;
        let mut state = CertState::default();
        assert_eq!(challenge_for(http, &state), http);
        state.failures = 1;
        state.last_challenge = Some("http-01".into());
        state.last_error = Some("new order: connection refused".into());
        assert_eq!(
            challenge_for(http, &state),
            http,
            "CA trouble: keep the preference"
        );
        state.last_error = Some(format!("{VALIDATION_PREFIX}: 404"));
        assert_eq!(challenge_for(http, &state), ChallengeKind::TlsAlpn01);
        state.last_challenge = Some("tls-alpn-01".into());
        assert_eq!(challenge_for(http, &state), http, "alternates");
    }

    #[test]
    fn renewal_at_two_thirds_or_window() {
        let day = 86_400;
        assert_eq!(renew_at(0, 90 * day, None), 60 * day);
        assert_eq!(renew_at(100, 130, None), 120);
        assert_eq!(
            renew_at(0, 90 * day, Some(Duration::from_secs(10 * 86_400))),
            80 * day
        );
        // A window longer than the lifetime means "renew now", never before issue.
        assert_eq!(renew_at(50, 100, Some(Duration::from_secs(1000))), 50);
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let s = Duration::from_secs;
        assert_eq!(backoff(1, s(60), s(3600), 0.999_999_9).as_secs(), 59);
        assert_eq!(backoff(1, s(60), s(3600), 0.0), s(30));
        assert_eq!(backoff(3, s(60), s(3600), 0.0), s(120));
        assert_eq!(backoff(30, s(60), s(3600), 0.0), s(1800));
        assert_eq!(backoff(u32::MAX, s(60), s(3600), 0.0), s(1800));
        for u in [0.0, 0.3, 0.7, 0.99] {
            let d = backoff(2, s(60), s(3600), u);
            assert!(d >= s(60) && d < s(120), "{d:?}");
        }
    }

    #[test]
    fn polling_pause_grows_then_stays_capped() {
        let ms = |d: Duration| d.as_millis();
        assert_eq!(ms(poll_delay(0)), 250);
        assert_eq!(ms(poll_delay(1)), 375);
        assert_eq!(ms(poll_delay(2)), 562);
        assert_eq!(ms(poll_delay(5)), 1898);
        assert_eq!(poll_delay(6), POLL_MAX);
        assert_eq!(poll_delay(u32::MAX), POLL_MAX);
        // An order the CA finishes at `t` is seen by `t + POLL_MAX`: the
        // looks cover 60 s without a gap wider than the cap.
        let mut at = Duration::ZERO;
        let mut looks = 0;
        while at < Duration::from_secs(60) {
            let pause = poll_delay(looks);
            assert!(pause <= POLL_MAX, "{pause:?}");
            assert!(
                pause >= poll_delay(looks.saturating_sub(1)),
                "never shrinks"
            );
            at += pause;
            looks += 1;
        }
        assert!(looks < 40, "{looks} looks in a minute");
    }

    #[test]
    fn pacer_limits_per_hour_and_survives_restart() {
        let mut p = Pacer::new(2);
        assert!(p.take(1000).is_ok());
        assert!(p.take(1001).is_ok());
        assert_eq!(p.take(1002), Err(Duration::from_secs(3598)));
        assert!(p.take(4600).is_ok());
        let mut restarted = Pacer::new(2);
        restarted.seed(vec![5000, 5001, 100], 5002);
        assert!(restarted.take(5002).is_err());
        assert_eq!(p.eta(200), Duration::from_secs(100 * 3600));
    }

    #[test]
    fn precheck_rules() {
        let ours: IpAddr = "192.0.2.1".parse().expect("ip");
        let other: IpAddr = "198.51.100.7".parse().expect("ip");
        assert!(precheck("h", &[ours], &[ours]).is_ok());
        assert!(precheck("h", &[ours], &[]).is_ok());
        let e = precheck("mta-sts.a.example", &[ours, other], &[ours]).expect_err("foreign");
        assert!(e.contains("198.51.100.7"), "{e}");
        assert!(precheck("h", &[], &[ours]).is_err());
    }
}
