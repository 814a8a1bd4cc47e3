//! Property tests of quota period boundaries against an independent computation with chrono.

use chrono::{Datelike, Days, Months, NaiveDate};
use gateway::plan::QuotaPeriod;
use gateway::quota::{civil_from_days, days_from_civil, period_bounds};
use proptest::prelude::*;

fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")
}

fn day_number(d: NaiveDate) -> i64 {
    (d - epoch()).num_days()
}

/// chrono's answer: the period containing `date`, as [start, end) dates.
fn chrono_period(date: NaiveDate, period: QuotaPeriod, offset: u32) -> (NaiveDate, NaiveDate) {
    match period {
        QuotaPeriod::Day => (date, date + Days::new(1)),
        QuotaPeriod::Week => {
            // Back to the most recent day whose weekday is Monday + offset.
            let mut start = date;
            while start.weekday().num_days_from_monday() != offset {
                start = start - Days::new(1);
            }
            (start, start + Days::new(7))
        }
        QuotaPeriod::Month => {
            let first = date.with_day(1).expect("day 1");
            let this = first + Days::new(u64::from(offset));
            if date >= this {
                let next = first + Months::new(1) + Days::new(u64::from(offset));
                (this, next)
            } else {
                let prev = first - Months::new(1) + Days::new(u64::from(offset));
                (prev, this)
            }
        }
    }
}

fn period_and_offset() -> impl Strategy<Value = (QuotaPeriod, u32)> {
    prop_oneof![
        Just((QuotaPeriod::Day, 0)),
        (0u32..=6).prop_map(|o| (QuotaPeriod::Week, o)),
        (0u32..=27).prop_map(|o| (QuotaPeriod::Month, o)),
    ]
}

/// Instants from 1970 to 2200, biased towards month ends and leap days.
fn instant_secs() -> impl Strategy<Value = i64> {
    prop_oneof![
        0i64..7_258_118_400,
        (
            1970i32..2200,
            1u32..=12,
            prop_oneof![Just(1u32), 27u32..=31],
            0i64..86_400
        )
            .prop_map(|(y, m, d, s)| {
                let date = (0..4)
                    .find_map(|back| NaiveDate::from_ymd_opt(y, m, d - back))
                    .expect("some day of the month exists");
                day_number(date) * 86_400 + s
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn civil_math_matches_chrono(days in -800_000i64..800_000) {
        let date = epoch() + chrono::TimeDelta::days(days);
        prop_assert_eq!(civil_from_days(days), (i64::from(date.year()), date.month(), date.day()));
        prop_assert_eq!(days_from_civil(i64::from(date.year()), date.month(), date.day()), days);
    }

    #[test]
    fn period_bounds_match_chrono(secs in instant_secs(), (period, offset) in period_and_offset()) {
        let day = secs.div_euclid(86_400);
        let date = epoch() + chrono::TimeDelta::days(day);
        let (start, end) = chrono_period(date, period, offset);
        let b = period_bounds(day, period, offset);
        prop_assert_eq!(b.start_day, day_number(start), "{} {:?} offset {}", date, period, offset);
        prop_assert_eq!(b.end_day, day_number(end), "{} {:?} offset {}", date, period, offset);
        prop_assert!(b.start_day <= day && day < b.end_day);
        // Consecutive periods tile the calendar.
        prop_assert_eq!(period_bounds(b.end_day, period, offset).start_day, b.end_day);
        prop_assert_eq!(period_bounds(b.start_day - 1, period, offset).end_day, b.start_day);
        // Reset instant is the end day at 00:00 UTC.
        if secs >= 0 {
            prop_assert_eq!(b.end_ns() / 1_000_000_000, (b.end_day * 86_400) as u64);
        }
    }
}
