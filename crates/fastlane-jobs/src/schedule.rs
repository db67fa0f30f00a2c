//! Periodic jobs declared in code: a [`Schedule`] names a job to enqueue at
//! every tick of a cron expression (in a time zone) or of a fixed interval,
//! and what to do about ticks missed while no scheduler ran ([`Missed`]).
//!
//! This module is the declaration, the arithmetic of ticks, and what the
//! store says of a schedule ([`ScheduleInfo`], [`ScheduleLook`]); the loop
//! that enqueues ticks, once each however many schedulers run, and the store
//! operations it uses are in `scheduler.rs`.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;

use crate::job::{JobId, NewJob};
use crate::Error;

/// Ticks missed while nothing ran (every scheduler down, or the store
/// unreachable) are ticks older than the schedule's grace when a scheduler
/// next looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Missed {
    /// One job stands for all the missed ticks (a nightly report that did
    /// not run at 03:00 runs once when a scheduler is back, not once per
    /// missed night). The default.
    #[default]
    RunOnce,
    /// Missed ticks are dropped; the schedule goes on with its next tick.
    Skip,
}

impl Missed {
    /// The name stored and shown (`run-once`, `skip`).
    pub fn as_str(self) -> &'static str {
        match self {
            Missed::RunOnce => "run-once",
            Missed::Skip => "skip",
        }
    }
}

/// When a schedule ticks.
#[derive(Debug, Clone)]
pub(crate) enum When {
    /// At every multiple of the interval since the Unix epoch, so that every
    /// scheduler, whenever it started, agrees on the ticks.
    Every(Duration),
    /// At the times a cron expression matches, read in a time zone.
    Cron { cron: Box<croner::Cron>, zone: chrono_tz::Tz, text: String },
}

/// A job enqueued at every tick of a cron expression or an interval,
/// declared in code with [`Registry::schedule`](crate::Registry::schedule).
///
/// Every consumer whose registry declares it runs it: on one host or many,
/// each tick is enqueued once (see `Registry::schedule` for how). A schedule
/// taken out of the code stops: nothing enqueues it any more, and
/// `fastlane jobs schedules` shows when a scheduler last saw it.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use fastlane_jobs::{Missed, NewJob, Schedule};
///
/// // 03:00 every day, Paris time; a night missed runs once when back.
/// let nightly = Schedule::cron("nightly-report", NewJob::new("report", serde_json::json!({})), "0 3 * * *")?
///     .time_zone("Europe/Paris")?;
/// // Every 30 seconds, missed ticks dropped.
/// let sweep = Schedule::every("sweep", NewJob::new("sweep", serde_json::Value::Null), Duration::from_secs(30))?
///     .missed(Missed::Skip);
/// # let _ = (nightly, sweep);
/// # Ok::<(), fastlane_jobs::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Schedule {
    pub(crate) name: String,
    pub(crate) job: NewJob,
    pub(crate) when: When,
    pub(crate) missed: Missed,
    pub(crate) grace: Duration,
}

/// A tick is on time while it is at most this old; older, it was missed.
/// Long enough that a scheduler slowed by a busy database still runs its
/// ticks on time; short enough that a schedule missed for a while is seen
/// as missed.
const DEFAULT_GRACE: Duration = Duration::from_secs(60);

/// The longest schedule name: it is part of the jobs' unique keys.
const MAX_NAME: usize = 200;

impl Schedule {
    /// `job` at every multiple of `interval` (at least a second, in whole
    /// milliseconds) since 1970-01-01 UTC: `every(.., 1 hour)` ticks on the
    /// hour, whenever the schedulers started.
    pub fn every(name: impl Into<String>, job: NewJob, interval: Duration) -> Result<Self, Error> {
        if interval < Duration::from_secs(1) || !interval.subsec_nanos().is_multiple_of(1_000_000) {
            return Err(Error::Invalid(format!(
                "the interval of a schedule must be at least 1 s, in whole milliseconds (got {interval:?})"
            )));
        }
        Self::new(name.into(), job, When::Every(interval))
    }

    /// `job` at the times `expression` matches, in UTC until
    /// [`time_zone`](Self::time_zone) says otherwise. Five fields (minute,
    /// hour, day of month, month, day of week) or six (seconds first), with
    /// lists, ranges, steps, names (`MON`, `JAN`), `L`, `W` and `#`, and the
    /// nicknames `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`. When
    /// both day fields are restricted, a day matching either counts (as in
    /// Vixie cron).
    pub fn cron(name: impl Into<String>, job: NewJob, expression: &str) -> Result<Self, Error> {
        let text = expression.split_whitespace().collect::<Vec<_>>().join(" ");
        let cron = croner::Cron::from_str(&text)
            .map_err(|err| Error::Invalid(format!("cron expression `{expression}`: {err}")))?;
        Self::new(name.into(), job, When::Cron { cron: Box::new(cron), zone: chrono_tz::UTC, text })
    }

    fn new(name: String, job: NewJob, when: When) -> Result<Self, Error> {
        if name.trim().is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
            return Err(Error::Invalid(format!(
                "a schedule's name must be 1 to {MAX_NAME} bytes without control characters (got {name:?})"
            )));
        }
        if job.unique_key.is_some() || job.run_at.is_some() {
            return Err(Error::Invalid(format!(
                "schedule `{name}`: its job sets a unique key or a run time; the schedule sets both for each tick"
            )));
        }
        Ok(Self { name, job, when, missed: Missed::default(), grace: DEFAULT_GRACE })
    }

    /// Reads the cron expression in `zone`, an IANA name (`Europe/Paris`,
    /// `America/New_York`, `UTC`). Across a daylight-saving change, a time
    /// that does not exist that day runs at the first instant after the
    /// gap, and a time that occurs twice runs once. Fixed intervals have no
    /// time zone.
    pub fn time_zone(mut self, zone: &str) -> Result<Self, Error> {
        let When::Cron { zone: current, .. } = &mut self.when else {
            return Err(Error::Invalid(format!(
                "schedule `{}`: a fixed interval has no time zone; only cron schedules do",
                self.name
            )));
        };
        *current = chrono_tz::Tz::from_str(zone).map_err(|_| {
            Error::Invalid(format!(
                "schedule `{}`: unknown time zone `{zone}` (an IANA name, e.g. Europe/Paris)",
                self.name
            ))
        })?;
        Ok(self)
    }

    /// What to do about missed ticks; [`Missed::RunOnce`] unless set.
    pub fn missed(mut self, missed: Missed) -> Self {
        self.missed = missed;
        self
    }

    /// How late a tick may be enqueued and still count as on time (default
    /// 60 s); an older tick was missed, and [`Missed`] says what becomes
    /// of it.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The job type it enqueues.
    pub fn job_name(&self) -> &str {
        &self.job.name
    }

    /// How it ticks, as stored and shown: `every 30s`, or
    /// `cron 0 3 * * * Europe/Paris`.
    pub fn spec(&self) -> String {
        match &self.when {
            When::Every(interval) => format!("every {}", interval_text(*interval)),
            When::Cron { text, zone, .. } => format!("cron {text} {}", zone.name()),
        }
    }

    /// The first tick strictly after `after` (Unix milliseconds), if there
    /// is one (a cron expression can match no date, e.g. `0 0 30 2 *`).
    pub(crate) fn next_after(&self, after: i64) -> Option<i64> {
        match &self.when {
            When::Every(interval) => {
                let step = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
                after.div_euclid(step).checked_add(1)?.checked_mul(step)
            }
            When::Cron { cron, zone, .. } => {
                let after = Utc.timestamp_millis_opt(after).single()?.with_timezone(zone);
                let next: DateTime<chrono_tz::Tz> = cron.find_next_occurrence(&after, false).ok()?;
                Some(next.timestamp_millis())
            }
        }
    }

    /// What a scheduler does at `now` when the last tick accounted for is
    /// `last` (both Unix milliseconds).
    pub(crate) fn due(&self, last: i64, now: i64) -> Due {
        let next = self.next_after(now);
        let Some(first) = self.next_after(last).filter(|first| *first <= now) else {
            return Due { fire: None, next };
        };
        // The newest tick that is still on time, if one is.
        let grace = i64::try_from(self.grace.as_millis()).unwrap_or(i64::MAX);
        let mut on_time = None;
        let mut tick = self.next_after(last.max(now.saturating_sub(grace)));
        while let Some(t) = tick.filter(|t| *t <= now) {
            on_time = Some(t);
            tick = self.next_after(t);
        }
        let fire = match (on_time, self.missed) {
            (Some(t), _) => Some(Tick { at: t, late: first < t }),
            (None, Missed::RunOnce) => Some(Tick { at: first, late: true }),
            (None, Missed::Skip) => None,
        };
        Due { fire, next }
    }
}

/// A schedule as the store knows it: what `fastlane jobs schedules` lists.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(schemars::JsonSchema))]
#[non_exhaustive]
pub struct ScheduleInfo {
    /// The schedule's name.
    pub name: String,
    /// The job type it enqueues.
    pub job: String,
    /// How it ticks (`every 30s`, `cron 0 3 * * * Europe/Paris`).
    pub spec: String,
    /// What becomes of missed ticks (`run-once`, `skip`).
    pub missed: String,
    /// Ticks up to this time (Unix ms) are accounted for.
    pub last_tick: i64,
    /// Its next tick (Unix ms), as of the last look; none if the
    /// expression matches no later date.
    pub next_tick: Option<i64>,
    /// The job of its last tick, if one was enqueued.
    pub last_job: Option<JobId>,
    /// When a scheduler last looked at it (Unix ms). Long past its next
    /// tick: no consumer declares it any more, or none runs.
    pub seen_at: i64,
}

/// What one look at a schedule did ([`Store::look_at_schedule`](crate::Store::look_at_schedule)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScheduleLook {
    /// The job enqueued for the due tick, if a tick was due.
    pub job: Option<JobId>,
    /// That tick (Unix ms).
    pub tick: Option<i64>,
    /// Ticks were missed before it; its job stands for them.
    pub late: bool,
    /// The schedule's next tick (Unix ms).
    pub next_tick: Option<i64>,
}

/// An interval in its largest whole unit: `1d`, `6h`, `90s`, `1500ms`.
fn interval_text(interval: Duration) -> String {
    let ms = interval.as_millis();
    for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// What [`Schedule::due`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Due {
    /// The tick to enqueue a job for now, if any.
    pub(crate) fire: Option<Tick>,
    /// The first tick after now.
    pub(crate) next: Option<i64>,
}

/// A tick to enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tick {
    /// The tick's time (Unix milliseconds).
    pub(crate) at: i64,
    /// Ticks were missed before it (its job stands for them too).
    pub(crate) late: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> NewJob {
        NewJob::new("noop", serde_json::Value::Null)
    }

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_millis()
    }

    #[test]
    fn intervals_tick_on_multiples_since_the_epoch() {
        let s = Schedule::every("s", job(), Duration::from_secs(60)).unwrap();
        assert_eq!(s.next_after(ms("2026-11-27T10:00:30Z")), Some(ms("2026-11-27T10:01:00Z")));
        assert_eq!(s.next_after(ms("2026-11-27T10:01:00Z")), Some(ms("2026-11-27T10:02:00Z")));
        assert_eq!(s.spec(), "every 1m");
        assert_eq!(Schedule::every("s", job(), Duration::from_millis(1500)).unwrap().spec(), "every 1500ms");
        assert!(Schedule::every("s", job(), Duration::from_millis(500)).is_err());
    }

    #[test]
    fn cron_reads_its_time_zone_across_daylight_saving_changes() {
        let s = Schedule::cron("s", job(), "30 2 * * *").unwrap().time_zone("Europe/Paris").unwrap();
        assert_eq!(s.spec(), "cron 30 2 * * * Europe/Paris");
        // Winter: 02:30 in Paris is 01:30 UTC.
        assert_eq!(s.next_after(ms("2026-01-10T12:00:00Z")), Some(ms("2026-01-11T01:30:00Z")));
        // 2026-03-29 has no 02:30 in Paris (02:00 -> 03:00): it runs right
        // after the gap, once.
        let spring = s.next_after(ms("2026-03-28T12:00:00Z")).unwrap();
        assert_eq!(spring, ms("2026-03-29T01:00:00Z"), "{spring}");
        assert_eq!(s.next_after(spring), Some(ms("2026-03-30T00:30:00Z")));
        // 2026-10-25 has 02:30 twice: once.
        let autumn = s.next_after(ms("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(s.next_after(autumn).unwrap(), ms("2026-10-26T01:30:00Z"));
        assert!(Schedule::cron("s", job(), "61 * * * *").is_err());
        assert!(Schedule::cron("s", job(), "0 3 * * *").unwrap().time_zone("Mars/Olympus").is_err());
        assert!(Schedule::every("s", job(), Duration::from_secs(5)).unwrap().time_zone("UTC").is_err());
    }

    #[test]
    fn a_tick_on_time_fires_and_missed_ones_fire_once_or_not_at_all() {
        let hourly = Schedule::every("h", job(), Duration::from_secs(3600)).unwrap();
        let h = |n: i64| n * 3_600_000;
        // Nothing due before the next tick.
        assert_eq!(hourly.due(h(5), h(5) + 1000), Due { fire: None, next: Some(h(6)) });
        // On time (within the 60 s grace).
        let due = hourly.due(h(5), h(6) + 2_000);
        assert_eq!(due.fire, Some(Tick { at: h(6), late: false }));
        // Down from 5:00 to 9:30: the ticks of 6, 7, 8 and 9 were missed.
        let due = hourly.due(h(5), h(9) + 1_800_000);
        assert_eq!(due, Due { fire: Some(Tick { at: h(6), late: true }), next: Some(h(10)) });
        let skip = hourly.clone().missed(Missed::Skip);
        assert_eq!(skip.due(h(5), h(9) + 1_800_000), Due { fire: None, next: Some(h(10)) });
        // Missed ticks and one on time: the one on time stands for all.
        assert_eq!(hourly.due(h(5), h(9) + 10_000).fire, Some(Tick { at: h(9), late: true }));
        assert_eq!(skip.due(h(5), h(9) + 10_000).fire, Some(Tick { at: h(9), late: true }));
    }

    #[test]
    fn bad_declarations_say_what_is_wrong() {
        let err = Schedule::every("", job(), Duration::from_secs(1)).unwrap_err().to_string();
        assert!(err.contains("name"), "{err}");
        let keyed = job().unique_key("mine");
        let err = Schedule::every("s", keyed, Duration::from_secs(1)).unwrap_err().to_string();
        assert!(err.contains("unique key"), "{err}");
        let err = Schedule::cron("s", job(), "every day").unwrap_err().to_string();
        assert!(err.contains("every day"), "{err}");
    }
}
