//! Calendar windows (`calendar: day | week | month`, `timezone:`): a fixed window whose end is
//! the end of the calendar period it opened in, in a time zone, DST and month lengths included.
//! Pure: the end of the period in force at an instant, nothing else.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Days, LocalResult, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// A calendar period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    Day,
    /// Monday to Sunday.
    Week,
    Month,
}

impl Period {
    pub const NAMES: [&'static str; 3] = ["day", "week", "month"];

    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// The period's nominal length in seconds (a day of 24 h, a week of 7 days, a month of 30
    /// days): what fields that need one number (`seconds` in views, `w=` in headers) show.
    /// Windows themselves end at the real boundary.
    pub fn nominal_seconds(self) -> u64 {
        match self {
            Period::Day => 86_400,
            Period::Week => 7 * 86_400,
            Period::Month => 30 * 86_400,
        }
    }
}

impl FromStr for Period {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "day" => Ok(Period::Day),
            "week" => Ok(Period::Week),
            "month" => Ok(Period::Month),
            other => Err(format!(
                "unknown calendar period {other:?} (known: {})",
                Period::NAMES.join(", ")
            )),
        }
    }
}

/// A calendar period in a time zone.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Calendar {
    pub period: Period,
    pub zone: Tz,
}

impl fmt::Debug for Calendar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Calendar({}, {})", self.period.name(), self.zone.name())
    }
}

/// An IANA time zone name (`Europe/Paris`, `UTC`), exactly as the tz database spells it.
pub fn zone(name: &str) -> Result<Tz, String> {
    Tz::from_str(name).map_err(|_| {
        format!("unknown time zone {name:?} (an IANA name such as \"UTC\" or \"Europe/Paris\")")
    })
}

impl Calendar {
    pub fn new(period: Period, zone: Tz) -> Self {
        Self { period, zone }
    }

    /// The end (exclusive, ms since the epoch) of the period in force at `now_ms`: the first
    /// instant of the next day, Monday or 1st of the month in the zone. Always after `now_ms`.
    pub fn period_end_ms(&self, now_ms: u64) -> u64 {
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let Some(instant) = DateTime::<Utc>::from_timestamp_millis(now) else {
            return now_ms.saturating_add(1);
        };
        let today = instant.with_timezone(&self.zone).date_naive();
        let next = match self.period {
            Period::Day => today.checked_add_days(Days::new(1)),
            Period::Week => {
                let into_week = u64::from(today.weekday().num_days_from_monday());
                today.checked_add_days(Days::new(7 - into_week))
            }
            Period::Month => {
                let (year, month) = match today.month() {
                    12 => (today.year() + 1, 1),
                    m => (today.year(), m + 1),
                };
                NaiveDate::from_ymd_opt(year, month, 1)
            }
        };
        let end = next
            .and_then(|date| self.start_of(date))
            .and_then(|ms| u64::try_from(ms).ok())
            .unwrap_or(u64::MAX);
        end.max(now_ms.saturating_add(1))
    }

    /// The first instant of `date` in the zone (ms): its midnight; the earlier one when
    /// midnight happens twice (clocks set back at midnight); the end of the gap when midnight
    /// does not happen (clocks set forward at midnight).
    fn start_of(&self, date: NaiveDate) -> Option<i64> {
        let midnight = date.and_hms_opt(0, 0, 0)?;
        // Gaps are at most a few hours: look for the first local minute that exists.
        (0..24 * 60).find_map(|minute| {
            let local = midnight + chrono::Duration::minutes(minute);
            match self.zone.from_local_datetime(&local) {
                LocalResult::Single(t) => Some(t.timestamp_millis()),
                LocalResult::Ambiguous(earlier, _) => Some(earlier.timestamp_millis()),
                LocalResult::None => None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ms since the epoch of an RFC 3339 instant.
    fn at(text: &str) -> u64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis() as u64
    }

    fn end(period: Period, zone_name: &str, now: &str) -> u64 {
        Calendar::new(period, zone(zone_name).unwrap()).period_end_ms(at(now))
    }

    #[test]
    fn months_end_at_midnight_on_the_first_whatever_their_length() {
        let utc = |now| end(Period::Month, "UTC", now);
        assert_eq!(utc("2026-01-15T10:00:00Z"), at("2026-02-01T00:00:00Z"));
        assert_eq!(utc("2026-01-31T23:59:59.999Z"), at("2026-02-01T00:00:00Z"));
        assert_eq!(
            utc("2026-02-01T00:00:00Z"),
            at("2026-03-01T00:00:00Z"),
            "the boundary itself is in the new month"
        );
        assert_eq!(utc("2026-04-30T12:00:00Z"), at("2026-05-01T00:00:00Z"));
        assert_eq!(utc("2026-12-31T23:00:00Z"), at("2027-01-01T00:00:00Z"));
        // Leap years: February has 29 days in 2028, 28 in 2100 (not a leap year), 29 in 2000.
        assert_eq!(utc("2028-02-28T12:00:00Z"), at("2028-03-01T00:00:00Z"));
        assert_eq!(utc("2028-02-29T23:59:59Z"), at("2028-03-01T00:00:00Z"));
        assert_eq!(
            end(Period::Day, "UTC", "2028-02-28T12:00:00Z"),
            at("2028-02-29T00:00:00Z")
        );
        assert_eq!(
            end(Period::Day, "UTC", "2100-02-28T12:00:00Z"),
            at("2100-03-01T00:00:00Z")
        );
        assert_eq!(
            end(Period::Day, "UTC", "2000-02-28T12:00:00Z"),
            at("2000-02-29T00:00:00Z")
        );
    }

    #[test]
    fn a_driven_clock_crosses_a_month_in_a_time_zone() {
        // Tokyo is UTC+9 all year: its month ends at 15:00 UTC on the last day.
        let tokyo = Calendar::new(Period::Month, zone("Asia/Tokyo").unwrap());
        let mut now = at("2026-01-31T14:00:00Z");
        let boundary = at("2026-01-31T15:00:00Z");
        assert_eq!(tokyo.period_end_ms(now), boundary);
        while now < boundary {
            assert_eq!(tokyo.period_end_ms(now), boundary);
            now += 7 * 60_000;
        }
        assert_eq!(
            tokyo.period_end_ms(boundary),
            at("2026-02-28T15:00:00Z"),
            "February in Tokyo"
        );
    }

    #[test]
    fn weeks_start_on_monday() {
        // 2026-03-04 is a Wednesday; 2026-03-09 the next Monday.
        let week = |now| end(Period::Week, "UTC", now);
        assert_eq!(week("2026-03-04T08:00:00Z"), at("2026-03-09T00:00:00Z"));
        assert_eq!(
            week("2026-03-08T23:59:59Z"),
            at("2026-03-09T00:00:00Z"),
            "Sunday"
        );
        assert_eq!(
            week("2026-03-09T00:00:00Z"),
            at("2026-03-16T00:00:00Z"),
            "Monday"
        );
        // A week across a year's end.
        assert_eq!(week("2026-12-30T00:00:00Z"), at("2027-01-04T00:00:00Z"));
    }

    #[test]
    fn days_follow_daylight_saving_time() {
        // Paris springs forward on 2026-03-29 (02:00 → 03:00): that day lasts 23 hours.
        let paris = |period, now| end(period, "Europe/Paris", now);
        assert_eq!(
            paris(Period::Day, "2026-03-28T12:00:00Z"),
            at("2026-03-28T23:00:00Z"),
            "midnight of the 29th, still UTC+1"
        );
        assert_eq!(
            paris(Period::Day, "2026-03-29T12:00:00Z"),
            at("2026-03-29T22:00:00Z"),
            "midnight of the 30th, now UTC+2"
        );
        // It falls back on 2026-10-25 (03:00 → 02:00): that day lasts 25 hours.
        assert_eq!(
            paris(Period::Day, "2026-10-25T12:00:00Z"),
            at("2026-10-25T23:00:00Z")
        );
        let day_start = at("2026-10-24T22:00:00Z");
        assert_eq!(
            paris(Period::Day, "2026-10-24T22:00:00Z"),
            day_start + 25 * 3_600_000
        );
        // A month across a DST change ends at the new offset's midnight.
        assert_eq!(
            paris(Period::Month, "2026-03-02T00:00:00Z"),
            at("2026-03-31T22:00:00Z")
        );
        // New York: a week that contains the spring change (2026-03-08).
        assert_eq!(
            end(Period::Week, "America/New_York", "2026-03-04T12:00:00Z"),
            at("2026-03-09T04:00:00Z"),
            "Monday 00:00 EDT"
        );
    }

    #[test]
    fn a_midnight_that_does_not_happen_or_happens_twice() {
        // Santiago springs forward at midnight: 2026-09-06 00:00 does not exist (clocks go
        // from 23:59:59 -04 to 01:00 -03); the day starts at 01:00 -03.
        assert_eq!(
            end(Period::Day, "America/Santiago", "2026-09-05T12:00:00Z"),
            at("2026-09-06T04:00:00Z")
        );
        // It falls back at midnight (2026-04-05 00:00 -03 → 2026-04-04 23:00 -04): the 5th's
        // midnight is once, after the repeated hour of the 4th.
        assert_eq!(
            end(Period::Day, "America/Santiago", "2026-04-04T12:00:00Z"),
            at("2026-04-05T04:00:00Z")
        );
        assert_eq!(
            end(Period::Day, "America/Santiago", "2026-04-05T03:30:00Z"),
            at("2026-04-05T04:00:00Z"),
            "in the repeated hour, still the 4th"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(zone("Europe/Paris").is_ok());
        assert!(zone("UTC").is_ok());
        let e = zone("Mars/Olympus").unwrap_err();
        assert!(e.contains("Mars/Olympus"), "{e}");
        assert!("fortnight".parse::<Period>().is_err());
        assert_eq!("month".parse::<Period>(), Ok(Period::Month));
    }

    #[test]
    fn instants_out_of_range_still_end_after_now() {
        let c = Calendar::new(Period::Month, Tz::UTC);
        assert!(c.period_end_ms(u64::MAX - 1) > u64::MAX - 1);
        assert_eq!(c.period_end_ms(0), at("1970-02-01T00:00:00Z"));
    }
}
