//! The recovery calendar: one month, Monday first, the days that hold recovery points
//! in bold and linked (MABS's recovery wizard shows the same).

use maud::{Markup, html};
use std::collections::BTreeSet;

/// A month of the proleptic Gregorian calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Month {
    pub year: i64,
    pub month: u32,
}

const NAMES: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

impl Month {
    /// `YYYY-MM` (years 1970-9999).
    pub fn parse(s: &str) -> Option<Month> {
        let (y, m) = s.split_once('-')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        let year: i64 = y.parse().ok()?;
        let month: u32 = m.parse().ok()?;
        ((1970..=9999).contains(&year) && (1..=12).contains(&month))
            .then_some(Month { year, month })
    }

    /// The month holding this Unix time (UTC).
    pub fn of(unix: i64) -> Month {
        let (year, month, _) = utc::civil_from_days(unix.div_euclid(86_400));
        Month { year, month }
    }

    pub fn day_of(unix: i64) -> (Month, u32) {
        let (year, month, day) = utc::civil_from_days(unix.div_euclid(86_400));
        (Month { year, month }, day)
    }

    pub fn next(self) -> Month {
        if self.month == 12 {
            Month {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Month {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    pub fn prev(self) -> Month {
        if self.month == 1 {
            Month {
                year: self.year - 1,
                month: 12,
            }
        } else {
            Month {
                year: self.year,
                month: self.month - 1,
            }
        }
    }

    fn first_day(self) -> i64 {
        utc::days_from_civil(self.year, self.month, 1)
    }

    pub fn days(self) -> u32 {
        let n = self.next().first_day() - self.first_day();
        u32::try_from(n).unwrap_or(31)
    }

    /// 0 for Monday (1970-01-01, day 0, was a Thursday).
    fn first_weekday(self) -> usize {
        usize::try_from((self.first_day() + 3).rem_euclid(7)).unwrap_or(0)
    }

    pub fn name(self) -> String {
        let i = usize::try_from(self.month.saturating_sub(1)).unwrap_or(0);
        format!("{} {}", NAMES.get(i).copied().unwrap_or("?"), self.year)
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// The month's grid; `link(day)` is where a day with points leads.
pub fn render(m: Month, with_points: &BTreeSet<u32>, link: impl Fn(u32) -> String) -> Markup {
    let lead = m.first_weekday();
    let days = m.days();
    let cells = lead + usize::try_from(days).unwrap_or(31);
    let weeks = cells.div_ceil(7);
    html! {
        table.calendar {
            caption { (m.name()) }
            thead { tr { @for d in ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"] { th scope="col" { (d) } } } }
            tbody {
                @for w in 0..weeks {
                    tr {
                        @for c in 0..7 {
                            @let day = (w * 7 + c).checked_sub(lead).and_then(|d| u32::try_from(d + 1).ok()).filter(|d| *d <= days);
                            @match day {
                                Some(d) if with_points.contains(&d) => {
                                    td.points { a href=(link(d)) aria-label=(format!("{d}: recovery points")) { strong { (d) } } }
                                }
                                Some(d) => { td { (d) } }
                                None => { td {} }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months() {
        let m = Month::parse("2026-12").unwrap();
        assert_eq!(m.days(), 31);
        assert_eq!(m.first_weekday(), 1); // 2026-12-01 is a Tuesday
        assert_eq!(Month::parse("2024-02").unwrap().days(), 29);
        assert_eq!(m.next().to_string(), "2027-01");
        assert_eq!(Month::parse("2027-01").unwrap().prev(), m);
        for bad in [
            "2026-13",
            "2026-00",
            "26-12",
            "2026-1",
            "x",
            "1969-12",
            "2026-12-01",
        ] {
            assert!(Month::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(Month::of(0).to_string(), "1970-01");
    }

    #[test]
    fn days_with_points_are_bold() {
        let m = Month::parse("2026-12").unwrap();
        let html = render(m, &BTreeSet::from([7]), |d| format!("?day={d}")).into_string();
        assert!(html.contains("<strong>7</strong>"), "{html}");
        assert!(!html.contains("<strong>8</strong>"));
        assert!(html.contains("December 2026"));
    }
}
