//! Reading Kubernetes quantities (`80Gi`, `22.5Gi`, `500M`) as numbers.
//!
//! The API types keep `Quantity` strings, as Kubernetes users expect; the planner needs bytes.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::{json_schema, Schema, SchemaGenerator};

/// The quantity grammar as a pattern, so the API server refuses `24GB` (it stores quantities
/// of custom resources as plain strings and would otherwise accept anything).
pub const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// Schema of a quantity field: an int-or-string with the quantity pattern.
pub fn quantity_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-int-or-string": true,
        "pattern": QUANTITY_PATTERN,
    })
}

/// Schema of an optional quantity field.
pub fn optional_quantity_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = quantity_schema(generator);
    schema.insert("nullable".into(), true.into());
    schema
}

/// Why a quantity could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid quantity {input:?}: {reason}; write e.g. 80Gi, 22.5Gi or 500M")]
pub struct QuantityError {
    input: String,
    reason: &'static str,
}

/// The value of a quantity as a float (bytes for memory, cores for CPU).
pub fn quantity_value(q: &Quantity) -> Result<f64, QuantityError> {
    parse_quantity(&q.0)
}

/// Parses the quantity grammar Kubernetes accepts (and [`QUANTITY_PATTERN`] admits): decimal
/// and binary suffixes (`n` … `E`, `Ki` … `Ei`) and whole exponents (`1e9`, `2.5E-3`). A
/// negative quantity is refused: nothing llmo reads may be below zero; so is one too large for
/// a float.
pub fn parse_quantity(input: &str) -> Result<f64, QuantityError> {
    let err = |reason| QuantityError {
        input: input.to_owned(),
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    if s.starts_with('-') {
        return Err(err("it is negative"));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let number: f64 = number.parse().map_err(|_| err("the number is malformed"))?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => match exponent
            .strip_prefix(['e', 'E'])
            .and_then(|e| e.parse::<i32>().ok())
        {
            Some(e) => 10f64.powi(e),
            _ => {
                return Err(err(
                    "the suffix is not one of n, u, m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei or a whole exponent like e9",
                ))
            }
        },
    };
    let value = number * scale;
    if !value.is_finite() {
        return Err(err("it is too large"));
    }
    Ok(value)
}

/// Formats a byte count the way `kubectl` users read it: `38.5Gi`, `512Mi`.
pub fn format_bytes(bytes: f64) -> String {
    const UNITS: [(&str, f64); 4] = [
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Ki", 1024.0),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            let v = bytes / size;
            let rounded = (v * 10.0).round() / 10.0;
            return if rounded.fract() == 0.0 {
                format!("{rounded:.0}{unit}")
            } else {
                format!("{rounded:.1}{unit}")
            };
        }
    }
    format!("{bytes:.0}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_binary_and_decimal_suffixes() {
        assert_eq!(parse_quantity("80Gi").unwrap(), 80.0 * 1024f64.powi(3));
        assert_eq!(parse_quantity("22.5Gi").unwrap(), 22.5 * 1024f64.powi(3));
        assert_eq!(parse_quantity("141G").unwrap(), 141e9);
        assert_eq!(parse_quantity("500m").unwrap(), 0.5);
        assert_eq!(parse_quantity("4").unwrap(), 4.0);
        assert_eq!(parse_quantity("+2").unwrap(), 2.0);
        assert_eq!(parse_quantity(".5").unwrap(), 0.5);
        assert_eq!(parse_quantity("250u").unwrap(), 250e-6);
        assert_eq!(parse_quantity("1Ei").unwrap(), 1024f64.powi(6));
    }

    #[test]
    fn reads_exponents_as_the_api_server_admits_them() {
        assert_eq!(parse_quantity("1e9").unwrap(), 1e9);
        assert_eq!(parse_quantity("2.5E3").unwrap(), 2500.0);
        assert!((parse_quantity("5e-3").unwrap() - 0.005).abs() < 1e-15);
        assert_eq!(parse_quantity("1e+3").unwrap(), 1000.0);
        // Everything the CRD pattern admits parses, and what it refuses is refused here too.
        let pattern = regex::Regex::new(QUANTITY_PATTERN).unwrap();
        for q in [
            "1e9", "2.5E3", "1e+3", "5e-3", "80Gi", "1.5", ".5", "+2", "500m", "7n", "3u", "1E",
            "2Ei",
        ] {
            assert!(pattern.is_match(q), "{q}");
            assert!(parse_quantity(q).is_ok(), "{q}");
        }
        for q in ["80GB", "1e", "e3", "1.2.3", "Gi", "1 Gi", "1ki"] {
            assert!(!pattern.is_match(q), "{q}");
            assert!(parse_quantity(q).is_err(), "{q}");
        }
        // The pattern admits these; Kubernetes' parser does not (its exponents are whole
        // numbers, its values finite), and neither does this one.
        for q in ["1e1.5", "1e400"] {
            assert!(pattern.is_match(q), "{q}");
            assert!(parse_quantity(q).is_err(), "{q}");
        }
    }

    #[test]
    fn refuses_with_a_reason() {
        assert!(parse_quantity("")
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(parse_quantity("-1Gi")
            .unwrap_err()
            .to_string()
            .contains("negative"));
        assert!(parse_quantity("80GB")
            .unwrap_err()
            .to_string()
            .contains("suffix"));
        assert!(parse_quantity("x1")
            .unwrap_err()
            .to_string()
            .contains("malformed"));
    }

    #[test]
    fn formats_bytes() {
        assert_eq!(format_bytes(80.0 * 1024f64.powi(3)), "80Gi");
        assert_eq!(format_bytes(38.5 * 1024f64.powi(3)), "38.5Gi");
        assert_eq!(format_bytes(512.0 * 1024f64.powi(2)), "512Mi");
        assert_eq!(format_bytes(100.0), "100");
    }
}
