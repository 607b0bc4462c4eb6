//! Reading Prometheus text exposition, as served by the sidecar's
//! `/metrics`.
//!
//! Tests assert on counters ("one retry happened", "b-2 was ejected"), so
//! they need the value of a series, or the sum over all series sharing a
//! label prefix, without pulling in a full Prometheus parser.

/// Sums the samples of Prometheus text `text` whose line starts with
/// `series_prefix`, e.g. `outrigger_requests_total{direction="outbound"`.
/// A prefix without `{` must be a whole metric name (so `foo_total` does not
/// match `foo_total_bar`). `None` if no sample matches.
pub fn parse_metric(text: &str, series_prefix: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || !line.starts_with(series_prefix) {
            continue;
        }
        let next = line[series_prefix.len()..].chars().next();
        if !series_prefix.contains('{') && !matches!(next, Some('{' | ' ' | '\t')) {
            continue;
        }
        if let Some(value) = sample_value(line) {
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}

/// The value of one exposition line: the first token after the metric name
/// and its (quote-aware) label set.
fn sample_value(line: &str) -> Option<f64> {
    let name_end = line.find(['{', ' ', '\t'])?;
    let mut rest = &line[name_end..];
    if rest.starts_with('{') {
        let (mut in_quotes, mut escaped) = (false, false);
        let mut close = None;
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                '}' if !in_quotes => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[close? + 1..];
    }
    rest.split_whitespace().next()?.parse().ok()
}
