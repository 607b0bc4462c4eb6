//! Human-friendly durations (`1m30s`, `1.5s`) and byte sizes (`64KiB`).
//!
//! Config files say `timeout = "2s"` rather than `timeout_ms = 2000`: the
//! unit is part of the value, so a reader cannot mistake seconds for
//! milliseconds. [`format_duration`] is the inverse of [`parse_duration`],
//! so `/config` shows values in the same syntax the file uses.

use std::fmt::Write as _;
use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Accepted units, in nanoseconds. `us`/`µs`/`ns` exist so that every value
/// [`format_duration`] prints parses back.
const UNITS: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("h", 3_600 * NANOS_PER_SEC),
];

/// Parse a duration such as `500ms`, `5s`, `1m`, `1h`, `1m30s`, `1.5s` or
/// `0s` (a bare `0` is accepted too, like Go's `time.ParseDuration`).
///
/// The error is a complete sentence for the operator, e.g.
/// `"2x" is not a duration (use 500ms, 5s, 1m)`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let err = || format!("{text:?} is not a duration (use 500ms, 5s, 1m)");
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(err());
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        // A component is `<digits>[.<digits>]<unit>`; a number without a
        // unit is rejected because "5" is exactly the ambiguity we avoid.
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, nanos)| *nanos)
            .ok_or_else(err)?;
        let nanos = component_nanos(number, scale).ok_or_else(err)?;
        total = total.checked_add(nanos).ok_or_else(err)?;
        rest = next;
    }
    let secs = u64::try_from(total / NANOS_PER_SEC).map_err(|_| err())?;
    let nanos = u32::try_from(total % NANOS_PER_SEC).map_err(|_| err())?;
    Ok(Duration::new(secs, nanos))
}

/// `number × scale` in nanoseconds, for `number` = `digits[.digits]`.
fn component_nanos(number: &str, scale: u128) -> Option<u128> {
    let (int, frac) = match number.split_once('.') {
        Some((int, frac)) if !frac.is_empty() => (int, frac),
        Some(_) => return None,
        None => (number, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    let mut nanos = int.parse::<u128>().ok()?.checked_mul(scale)?;
    // Digits past the 18th cannot add a whole nanosecond even for hours
    // (3.6e12 ns), and capping keeps 10^len within u128.
    let frac = &frac[..frac.len().min(18)];
    if !frac.is_empty() {
        let numerator: u128 = frac.parse().ok()?;
        let denominator = 10u128.pow(u32::try_from(frac.len()).ok()?);
        nanos = nanos.checked_add(numerator * scale / denominator)?;
    }
    Some(nanos)
}

/// Format a duration in the syntax [`parse_duration`] accepts, using the
/// largest units that are exact: `1.5s`, `500ms`, `2m`, `1m30s`, `0s`.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    if secs == 0 {
        return if nanos % 1_000_000 == 0 {
            format!("{}ms", nanos / 1_000_000)
        } else if nanos % 1_000 == 0 {
            format!("{}us", nanos / 1_000)
        } else {
            format!("{nanos}ns")
        };
    }
    let mut out = String::new();
    let (hours, minutes, seconds) = (secs / 3_600, secs / 60 % 60, secs % 60);
    // Writing to a String cannot fail.
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    if seconds > 0 || nanos > 0 {
        let _ = write!(out, "{seconds}");
        if nanos > 0 {
            let frac = format!("{nanos:09}");
            let _ = write!(out, ".{}", frac.trim_end_matches('0'));
        }
        out.push('s');
    }
    out
}

/// Binary size units. Decimal `KB`/`MB` are rejected rather than guessed:
/// whether `64KB` means 64000 or 65536 is exactly the confusion to avoid.
const SIZE_UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
];

/// Parse a byte size: a plain integer (`1024`) or an integer with a binary
/// unit (`512B`, `64KiB`, `1MiB`, `1GiB`; a space before the unit is fine).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let err = || format!("{text:?} is not a size (use 512B, 64KiB, 1MiB)");
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit = unit.trim_start();
    let scale = SIZE_UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, bytes)| *bytes)
        .ok_or_else(err)?;
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(err)
}

/// Format a byte count with the largest exact binary unit (`60KiB`, `1MiB`,
/// `100B`), for error messages and the like.
pub fn format_size(bytes: u64) -> String {
    for (unit, scale) in SIZE_UNITS.iter().rev() {
        if *scale > 1 && bytes >= *scale && bytes % scale == 0 {
            return format!("{}{unit}", bytes / scale);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parses_simple_units() {
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_duration("5s"), Ok(ms(5_000)));
        assert_eq!(parse_duration("1m"), Ok(ms(60_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("250µs"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
    }

    #[test]
    fn parses_compound_fractional_and_zero() {
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration("1h5m2s"), Ok(ms(3_902_000)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1_500)));
        assert_eq!(parse_duration("0.25s"), Ok(ms(250)));
        assert_eq!(parse_duration("1.5m"), Ok(ms(90_000)));
        assert_eq!(parse_duration("0.5ms"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration(" 5s "), Ok(ms(5_000)));
        // Sub-nanosecond digits are truncated, not an error.
        assert_eq!(parse_duration("1.0000000019s"), Ok(Duration::new(1, 1)));
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in [
            "", "2x", "5", "s", "-1s", "1.s", ".5s", "1..5s", "1.5.5s", "5 s", "1sec", "ms5", "1S",
            "0x10s",
        ] {
            assert_eq!(
                parse_duration(bad),
                Err(format!("{bad:?} is not a duration (use 500ms, 5s, 1m)")),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn error_text_matches_documented_form() {
        assert_eq!(
            parse_duration("2x"),
            Err(r#""2x" is not a duration (use 500ms, 5s, 1m)"#.to_owned())
        );
    }

    #[test]
    fn rejects_overflow() {
        assert!(parse_duration("99999999999999999999999999h").is_err());
        assert!(parse_duration("999999999999999999999s").is_err());
        // u64::MAX seconds is the largest Duration: one more overflows.
        assert_eq!(
            parse_duration("18446744073709551615s"),
            Ok(Duration::from_secs(u64::MAX))
        );
        assert!(parse_duration("18446744073709551616s").is_err());
    }

    #[test]
    fn formats_with_largest_exact_units() {
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(ms(500)), "500ms");
        assert_eq!(format_duration(ms(1_500)), "1.5s");
        assert_eq!(format_duration(ms(5_000)), "5s");
        assert_eq!(format_duration(ms(120_000)), "2m");
        assert_eq!(format_duration(ms(90_000)), "1m30s");
        assert_eq!(format_duration(ms(3_600_000)), "1h");
        assert_eq!(format_duration(ms(3_601_250)), "1h1.25s");
        assert_eq!(format_duration(Duration::from_micros(1_500)), "1500us");
        assert_eq!(format_duration(Duration::from_nanos(7)), "7ns");
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_micros(1_500),
            ms(999),
            ms(61_001),
            Duration::new(86_400 * 3 + 7, 123_456_789),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
        }
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("60KiB"), Ok(61_440));
        assert_eq!(parse_size("1MiB"), Ok(1_048_576));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1024"), Ok(1_024));
        assert_eq!(parse_size("64 KiB"), Ok(65_536));
        assert_eq!(parse_size("0B"), Ok(0));
    }

    #[test]
    fn rejects_malformed_sizes() {
        for bad in [
            "",
            "KiB",
            "64KB",
            "64kb",
            "1.5KiB",
            "-1B",
            "64 K iB",
            "1TiB",
            "x",
            "99999999999999999999",
        ] {
            assert_eq!(
                parse_size(bad),
                Err(format!("{bad:?} is not a size (use 512B, 64KiB, 1MiB)")),
                "{bad:?} should be rejected"
            );
        }
        // Overflow in the multiplication is an error, not a wrap.
        assert!(parse_size("17179869184GiB").is_err());
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(61_440), "60KiB");
        assert_eq!(format_size(1_048_576), "1MiB");
        assert_eq!(format_size(1_000), "1000B");
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(3 << 30), "3GiB");
    }
}
