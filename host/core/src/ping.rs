//! A PingSource's schedule, time zone and data, checked when the object is read (as Knative's
//! webhook checks them when it is applied), so that a mistake is refused with its file, line and
//! field rather than found when the source starts.
//!
//! Besides Knative's five-field cron (with `CRON_TZ=` or `spec.timezone`), wasmesh accepts a
//! sixth, leading field for seconds.

use base64::Engine as _;
use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

use crate::resources::PingSourceSpec;

/// A PingSource without a schedule fires every minute, as Knative's defaults say.
const DEFAULT_SCHEDULE: &str = "* * * * *";

/// The content type whose data Knative checks and re-encodes.
const JSON: &str = "application/json";

/// What a valid PingSource spec says, ready to run.
#[derive(Debug, Clone)]
pub struct Ping {
    cron: Cron,
    tz: Tz,
    /// The data to send, decoded (and, for JSON, re-encoded as Knative does).
    pub data: Option<Vec<u8>>,
}

/// What is wrong with a PingSource spec, and in which field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct Invalid {
    /// `spec.schedule`, `spec.timezone`, `spec.data` or `spec.dataBase64`.
    pub path: &'static str,
    pub message: String,
}

fn invalid(path: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        path,
        message: message.into(),
    }
}

/// `data` as Knative sends JSON data: an object, compact, its keys sorted (Go marshals a map so).
fn sorted_json_object(data: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let members: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(data)?;
    serde_json::to_vec(&members)
}

/// The fields of a five-field schedule, with what each takes; a sixth, leading field is seconds.
const FIELDS: [(&str, &str); 5] = [
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-7 or SUN-SAT"),
];

fn cron_parser() -> CronParser {
    CronParser::builder().seconds(Seconds::Optional).build()
}

/// Parses a cron schedule of five fields, or six with seconds first (or a descriptor such as
/// `@hourly`); an error names the field that is wrong and what it takes.
fn parse_cron(schedule: &str) -> Result<Cron, String> {
    let fields: Vec<&str> = schedule.split_whitespace().collect();
    if !schedule.starts_with('@') && !(5..=6).contains(&fields.len()) {
        return Err(format!(
            "{} fields; a schedule has five (minute hour day-of-month month day-of-week), or \
             six with seconds first",
            fields.len()
        ));
    }
    let names = || {
        std::iter::once(("second", "0-59"))
            .filter(|_| fields.len() == 6)
            .chain(FIELDS)
    };
    // croner takes `1,,2` or `,` as a list with nothing in it, which never fires.
    if let Some((field, (name, _))) = fields
        .iter()
        .zip(names())
        .find(|(f, _)| f.split(',').any(str::is_empty))
    {
        return Err(format!(
            "the {name} field `{field}` has an empty item in its list"
        ));
    }
    cron_parser().parse(schedule).map_err(|e| {
        let names = names();
        // The first field that is refused alone, the others left at `*`, is the one to name.
        let wrong = names.enumerate().find(|(i, _)| {
            let alone: Vec<&str> = (0..fields.len())
                .map(|j| if j == *i { fields[j] } else { "*" })
                .collect();
            cron_parser().parse(&alone.join(" ")).is_err()
        });
        let why = match &e {
            croner::errors::CronError::ComponentError(m) => m.trim_end_matches('.').to_lowercase(),
            croner::errors::CronError::IllegalCharacters(_) => {
                "a character it does not take".into()
            }
            other => other.to_string(),
        };
        match wrong {
            Some((i, (name, takes))) => {
                format!(
                    "the {name} field `{}`: {why}; it takes {takes}, with `*`, `,`, `-` and `/`",
                    fields[i]
                )
            }
            None => why,
        }
    })
}

impl Ping {
    /// Checks the schedule, the time zone and the data.
    pub fn check(spec: &PingSourceSpec) -> Result<Self, Invalid> {
        let mut schedule = match spec.schedule.trim() {
            "" => DEFAULT_SCHEDULE,
            s => s,
        };
        if schedule.contains("@every") {
            return Err(invalid(
                "spec.schedule",
                format!(
                    "`{schedule}`: the @every descriptor is not supported (nor is it in Knative); \
                     write a cron schedule, e.g. `*/10 * * * * *` for every 10 seconds"
                ),
            ));
        }
        let mut tz_name = spec.timezone.as_ref().map(|t| ("spec.timezone", t.clone()));
        if let Some(rest) = schedule
            .strip_prefix("CRON_TZ=")
            .or_else(|| schedule.strip_prefix("TZ="))
        {
            let (tz, rest) = rest.split_once(char::is_whitespace).ok_or_else(|| {
                invalid("spec.schedule", "CRON_TZ= must be followed by a schedule")
            })?;
            tz_name = Some(("spec.schedule", tz.to_string()));
            schedule = rest.trim();
        }
        let tz = match tz_name {
            Some((path, name)) => name
                .parse::<Tz>()
                .map_err(|_| invalid(path, format!("`{name}` is not a known time zone")))?,
            None => Tz::UTC,
        };
        let cron = parse_cron(schedule).map_err(|why| {
            invalid(
                "spec.schedule",
                format!("`{schedule}` is not a cron schedule: {why}"),
            )
        })?;
        let data = match (&spec.data, &spec.data_base64) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "spec.dataBase64",
                    "set one of spec.data or spec.dataBase64, not both",
                ));
            }
            (Some(d), None) => Some(d.clone().into_bytes()),
            (None, Some(b)) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .map_err(|e| invalid("spec.dataBase64", e.to_string()))?,
            ),
            (None, None) => None,
        };
        // Knative checks JSON data and sends it re-encoded (compact, keys sorted).
        let data = match (&data, spec.content_type.as_deref()) {
            (Some(d), Some(JSON)) => Some(sorted_json_object(d).map_err(|e| {
                let path = if spec.data.is_some() {
                    "spec.data"
                } else {
                    "spec.dataBase64"
                };
                invalid(
                    path,
                    format!("not a JSON object, which contentType {JSON} asks for: {e}"),
                )
            })?),
            _ => data,
        };
        let ping = Self { cron, tz, data };
        // A valid schedule may still name a day that never comes (`* * 31 2 *`): say so now
        // rather than report the source ready and never fire.
        if ping.next_after(Utc::now()).is_none() {
            return Err(invalid(
                "spec.schedule",
                format!("`{schedule}` never fires (no such date)"),
            ));
        }
        Ok(ping)
    }

    /// The next firing strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
            // Firings are on whole seconds, whatever the sub-second part of `after`.
            .and_then(|t| t.with_nanosecond(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(fields: &str) -> PingSourceSpec {
        serde_yaml_ng::from_str(&format!("{fields}\nsink: {{uri: 'http://127.0.0.1:9/'}}"))
            .expect("spec")
    }

    fn refused(fields: &str) -> Invalid {
        Ping::check(&spec(fields)).expect_err(fields)
    }

    #[test]
    fn a_wrong_schedule_names_the_field_and_what_it_takes() {
        let e = refused("schedule: '61 * * * *'");
        assert_eq!(e.path, "spec.schedule");
        assert!(
            e.message
                .contains("the minute field `61`: number out of bounds; it takes 0-59"),
            "{e}"
        );
        let e = refused("schedule: '70 * * * * *'");
        assert!(e.message.contains("the second field `70`"), "{e}");
        let e = refused("schedule: '0 9 * JANX *'");
        assert!(
            e.message
                .contains("the month field `JANX`: a character it does not take"),
            "{e}"
        );
        let e = refused("schedule: '*/0 * * * *'");
        assert!(e.message.contains("`*/0`: step cannot be zero"), "{e}");
        let e = refused("schedule: '0 1,,2 * * *'");
        assert!(
            e.message
                .contains("the hour field `1,,2` has an empty item in its list"),
            "{e}"
        );
        for (schedule, count) in [("* * * *", 4), ("0 0 9 * * * 2030", 7)] {
            let e = refused(&format!("schedule: '{schedule}'"));
            assert!(
                e.message
                    .contains(&format!("{count} fields; a schedule has five")),
                "{e}"
            );
        }
    }

    #[test]
    fn schedules_knative_takes_are_taken() {
        for ok in [
            "schedule: '*/2 * * * *'",
            "schedule: '0 9 * * MON-FRI'",
            "schedule: '@hourly'",
            "schedule: 'CRON_TZ=Europe/Paris 0 9 * * *'",
            "schedule: '0 9 * * *'\ntimezone: America/New_York",
            "schedule: ''",
        ] {
            assert!(Ping::check(&spec(ok)).is_ok(), "{ok}");
        }
    }

    #[test]
    fn the_time_zone_and_the_data_are_checked_in_their_fields() {
        let e = refused("schedule: '0 9 * * *'\ntimezone: Mars/Olympus");
        assert_eq!(e.path, "spec.timezone");
        let e = refused("schedule: 'CRON_TZ=Mars/Olympus 0 9 * * *'");
        assert_eq!(e.path, "spec.schedule");
        let e = refused("data: hi\ndataBase64: aGk=");
        assert_eq!(e.path, "spec.dataBase64");
        let e = refused("dataBase64: '%%%'");
        assert_eq!(e.path, "spec.dataBase64");
        let e = refused("data: hi\ncontentType: application/json");
        assert_eq!(e.path, "spec.data");
        let ok = Ping::check(&spec(
            "data: '{\"b\": 1, \"a\": 2}'\ncontentType: application/json",
        ))
        .expect("json");
        assert_eq!(ok.data.as_deref(), Some(&b"{\"a\":2,\"b\":1}"[..]));
    }
}
