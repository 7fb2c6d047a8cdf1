//! A parallel degree: `auto` (the planner decides) or a fixed number of ranks.

use std::{borrow::Cow, fmt};

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// The largest tensor or pipeline degree accepted in a manifest.
pub const MAX_PARALLEL_DEGREE: u32 = 64;

/// How many ranks split the model along one axis (tensor or pipeline).
///
/// Written as `auto` or an integer from 1 to 64. The CRD schema uses
/// `x-kubernetes-int-or-string` with `minimum`/`maximum` (which apply to the integer form only)
/// and a `pattern` (which applies to the string form only), so an API server of any version
/// refuses `0`, `65` or `"four"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ParallelDegree {
    /// Let the planner choose from the model size, the GPU class and the node shape.
    #[default]
    Auto,
    /// Exactly this many ranks.
    Fixed(u32),
}

impl ParallelDegree {
    /// The fixed degree, if one was given.
    pub fn fixed(self) -> Option<u32> {
        match self {
            Self::Auto => None,
            Self::Fixed(n) => Some(n),
        }
    }

    /// Whether the degree is inside the accepted range (always true for `auto`).
    pub fn in_range(self) -> bool {
        self.fixed()
            .is_none_or(|n| (1..=MAX_PARALLEL_DEGREE).contains(&n))
    }
}

impl fmt::Display for ParallelDegree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for ParallelDegree {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => s.serialize_str("auto"),
            Self::Fixed(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for ParallelDegree {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ParallelDegree;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "\"auto\" or an integer from 1 to {MAX_PARALLEL_DEGREE}")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v == "auto" {
                    return Ok(ParallelDegree::Auto);
                }
                // Quoted numbers ("4") are accepted: YAML authors write them by accident.
                match v.parse::<i64>() {
                    Ok(n) => self.visit_i64(n),
                    Err(_) => Err(E::custom(format!(
                        "{v:?} is not a parallel degree: write \"auto\" or an integer from 1 to {MAX_PARALLEL_DEGREE}"
                    ))),
                }
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u32::try_from(v)
                    .ok()
                    .filter(|n| (1..=MAX_PARALLEL_DEGREE).contains(n))
                    .map(ParallelDegree::Fixed)
                    .ok_or_else(|| {
                        E::custom(format!(
                            "{v} is out of range: a parallel degree is \"auto\" or from 1 to {MAX_PARALLEL_DEGREE}"
                        ))
                    })
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                if v.fract() == 0.0 && v.abs() < 1e9 {
                    // serde_json turns `4.0` into a float; accept whole numbers.
                    self.visit_i64(v as i64)
                } else {
                    Err(E::custom(format!(
                        "{v} is not a whole number: a parallel degree is \"auto\" or from 1 to {MAX_PARALLEL_DEGREE}"
                    )))
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl JsonSchema for ParallelDegree {
    fn schema_name() -> Cow<'static, str> {
        "ParallelDegree".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // int-or-string carries no `type`; the bounds sit beside it. `nullable: false` stops
        // kube's schema rewriter from marking the (defaulted) field nullable: `null` is refused.
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "nullable": false,
            "minimum": 1,
            "maximum": MAX_PARALLEL_DEGREE,
            "pattern": "^auto$",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<ParallelDegree, String> {
        serde_yaml::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_auto_and_numbers() {
        assert_eq!(parse("auto").unwrap(), ParallelDegree::Auto);
        assert_eq!(parse("4").unwrap(), ParallelDegree::Fixed(4));
        assert_eq!(parse("'8'").unwrap(), ParallelDegree::Fixed(8));
        assert_eq!(parse("64").unwrap(), ParallelDegree::Fixed(64));
        assert_eq!(parse("1").unwrap(), ParallelDegree::Fixed(1));
    }

    #[test]
    fn refuses_out_of_range_and_words() {
        assert!(parse("0").unwrap_err().contains("0 is out of range"));
        assert!(parse("65").unwrap_err().contains("out of range"));
        assert!(parse("-2").unwrap_err().contains("out of range"));
        assert!(parse("four")
            .unwrap_err()
            .contains("\"four\" is not a parallel degree"));
        assert!(parse("2.5").unwrap_err().contains("not a whole number"));
    }

    #[test]
    fn round_trips() {
        for d in [ParallelDegree::Auto, ParallelDegree::Fixed(3)] {
            let s = serde_json::to_string(&d).unwrap();
            assert_eq!(serde_json::from_str::<ParallelDegree>(&s).unwrap(), d);
        }
    }
}
