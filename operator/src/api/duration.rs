//! Durations written the way people write them in manifests: `500ms`, `2s`, `1m30s`.
//!
//! Kubernetes has no duration type in OpenAPI, so the CRD carries a string with a pattern that the
//! API server enforces (also on servers older than 1.25, which ignore CEL), and this type parses it
//! for the operator. The grammar is the subset of Go's `time.ParseDuration` that makes sense for
//! latency targets: one or more `<number><unit>` terms, units `ms`, `s`, `m`, `h`, no sign.

use std::{borrow::Cow, fmt, str::FromStr, time::Duration};

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// The pattern the API server checks. Kept in one place so the schema and the parser agree.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// A positive duration such as `500ms` or `2s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(Duration);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}; write a number and a unit, e.g. 500ms, 2s or 1m30s")]
pub struct DurationParseError {
    input: String,
    reason: &'static str,
}

impl HumanDuration {
    /// Wraps a [`Duration`].
    pub const fn new(d: Duration) -> Self {
        Self(d)
    }

    /// The parsed value.
    pub const fn get(self) -> Duration {
        self.0
    }

    /// Whole milliseconds, rounded down.
    pub fn as_millis(self) -> u128 {
        self.0.as_millis()
    }
}

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl FromStr for HumanDuration {
    type Err = DurationParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| DurationParseError {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(err("it is empty"));
        }
        if input.starts_with('-') {
            return Err(err("durations cannot be negative"));
        }
        let mut rest = input;
        let mut total = 0f64;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| err("a unit is missing"))?;
            if num_len == 0 {
                return Err(err("a number must come before each unit"));
            }
            let digits = &rest[..num_len];
            if digits.starts_with('.') || digits.ends_with('.') {
                return Err(err("the number is malformed"));
            }
            let number: f64 = digits.parse().map_err(|_| err("the number is malformed"))?;
            rest = &rest[num_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let seconds_per_unit = match &rest[..unit_len] {
                "ms" => 1e-3,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(err("the unit is not one of ms, s, m, h")),
            };
            rest = &rest[unit_len..];
            total += number * seconds_per_unit;
        }
        if !total.is_finite() || total > 365.0 * 24.0 * 3600.0 {
            return Err(err("it is longer than a year"));
        }
        Ok(Self(Duration::from_secs_f64(total)))
    }
}

impl fmt::Display for HumanDuration {
    /// The shortest exact spelling: `500ms`, `2s`, `1m30s`, `1500ms` for 1.5 s.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if self.0.is_zero() {
            return f.write_str("0s");
        }
        if ms == 0 {
            // Sub-millisecond values are not written by people; print them in ms with decimals.
            return write!(f, "{}ms", self.0.as_secs_f64() * 1e3);
        }
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let secs = ms / 1000;
        let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 || secs == 0 {
            write!(f, "{s}s")?;
        }
        Ok(())
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(de::Error::custom)
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> Cow<'static, str> {
        "HumanDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Duration, DurationParseError> {
        s.parse::<HumanDuration>().map(HumanDuration::get)
    }

    #[test]
    fn parses_what_people_write() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn refuses_with_a_reason() {
        for (input, reason) in [
            ("", "empty"),
            ("-500ms", "negative"),
            ("500", "unit is missing"),
            ("ms", "number must come before"),
            ("5 s", "not one of"),
            ("5sec", "not one of"),
            ("1..2s", "malformed"),
            (".5s", "malformed"),
            ("5.s", "malformed"),
            ("9999999h", "longer than a year"),
        ] {
            let e = parse(input).unwrap_err().to_string();
            assert!(e.contains(reason), "{input:?}: {e}");
            assert!(e.contains("e.g. 500ms"), "{input:?}: {e}");
        }
    }

    #[test]
    fn displays_the_shortest_exact_form_and_round_trips() {
        for (input, shown) in [
            ("500ms", "500ms"),
            ("2s", "2s"),
            ("1.5s", "1500ms"),
            ("90s", "1m30s"),
            ("3600s", "1h"),
            ("0s", "0s"),
        ] {
            let d: HumanDuration = input.parse().unwrap();
            assert_eq!(d.to_string(), shown);
            assert_eq!(shown.parse::<HumanDuration>().unwrap(), d);
        }
    }
}
