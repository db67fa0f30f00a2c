//! The timestamp at the start of each log line, as `tracing-subscriber`
//! writes it by default (RFC 3339, UTC, microseconds:
//! `2026-11-27T11:58:29.219083Z`), with the date and time of day worked out
//! once a second per thread instead of once a line: at tens of thousands of
//! access lines a second, the calendar arithmetic and its formatting were a
//! visible share of a request's CPU time.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// The log lines' clock (see the module's doc).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LineTime;

thread_local! {
    /// The second last formatted on this thread, and its text up to the
    /// seconds (`2026-11-27T11:58:29`).
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for LineTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        with_now(|second, fraction| {
            w.write_str(second)?;
            // Digits, a dot and a `Z`: always UTF-8.
            w.write_str(std::str::from_utf8(fraction).unwrap_or(".000000Z"))
        })
    }
}

/// Appends the timestamp of now to `out` (the access log's lines).
pub(super) fn push_now(out: &mut Vec<u8>) {
    with_now(|second, fraction| {
        out.extend_from_slice(second.as_bytes());
        out.extend_from_slice(fraction);
    });
}

/// Calls `f` with now's `YYYY-MM-DDTHH:MM:SS` and its `.uuuuuuZ` (ASCII).
fn with_now<R>(f: impl FnOnce(&str, &[u8; 8]) -> R) -> R {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let mut fraction = *b".000000Z";
    let mut micros = now.subsec_micros();
    for digit in fraction[1..7].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            cached.1.clear();
            // Writing into a `String` does not fail.
            let _ = write_second(&mut cached.1, secs);
            cached.0 = secs;
        }
        f(&cached.1, &fraction)
    })
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time, in UTC.
fn write_second(out: &mut String, secs: u64) -> fmt::Result {
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// The proleptic Gregorian date of a count of days since 1970-01-01
/// (Howard Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shifted so that eras of 400 years start on 0000-03-01: the leap day is
    // then the last day of a year.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_read_as_their_utc_date_and_time() {
        // Expected values from Python's datetime, in UTC.
        for (secs, expected) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (951_868_799, "2000-02-29T23:59:59"),
            (1_764_201_509, "2025-11-26T23:58:29"),
            (1_798_675_200, "2026-12-31T00:00:00"),
            (4_102_531_199, "2100-01-01T23:59:59"),
        ] {
            let mut out = String::new();
            write_second(&mut out, secs).unwrap();
            assert_eq!(out, expected, "{secs}");
        }
    }

    #[test]
    fn a_line_starts_with_the_same_timestamp_tracing_subscriber_writes() {
        let mut ours = String::new();
        LineTime.format_time(&mut Writer::new(&mut ours)).unwrap();
        let mut theirs = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut theirs)).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{ours} against {theirs}");
        // Taken a moment apart: the same second, or the next.
        assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
        assert_eq!(ours[..16], theirs[..16], "{ours} against {theirs}");
    }
}
