//! The metric-name prefix (`--metrics-prefix` / `DYN_METRICS_PREFIX`): a user-supplied string
//! turned into a valid Prometheus name fragment. A bad prefix must never stop the frontend from
//! starting, so sanitising always produces something usable and only warns.

use tracing::warn;

/// The prefix used when none is configured, or when the configured one has no usable characters.
pub const DEFAULT_PREFIX: &str = "dynamo_frontend";

/// Turns `raw` into a valid metric-name prefix, logging a warning when it had to change it.
///
/// Characters outside `[A-Za-z0-9_]` become `_` (colons are reserved for recording rules); a
/// leading digit gets a `_` in front; a leading `__` (reserved by Prometheus) is stripped. An empty
/// input, or one left with nothing but underscores, falls back to [`DEFAULT_PREFIX`].
pub fn sanitize_prefix(raw: &str) -> String {
    let sanitized = sanitized(raw);
    if sanitized != raw && !raw.is_empty() {
        warn!("metrics prefix {raw:?} is not a valid Prometheus name; using {sanitized:?}");
    }
    sanitized
}

fn sanitized(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    if let Some(rest) = name.strip_prefix("__") {
        name = if rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
            rest.to_string()
        } else {
            format!("_{rest}")
        };
    }
    if name.chars().all(|c| c == '_') {
        return DEFAULT_PREFIX.to_string();
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_prefixes_are_kept() {
        assert_eq!(sanitize_prefix("dynamo_frontend"), "dynamo_frontend");
        assert_eq!(sanitize_prefix("my_service2"), "my_service2");
        assert_eq!(sanitize_prefix("_private"), "_private");
    }

    #[test]
    fn invalid_characters_become_underscores() {
        assert_eq!(sanitize_prefix("my-service.v1"), "my_service_v1");
        assert_eq!(sanitize_prefix("ns:frontend"), "ns_frontend");
        assert_eq!(sanitize_prefix("dynamo frontend"), "dynamo_frontend");
    }

    #[test]
    fn leading_digit_and_reserved_prefix_are_fixed() {
        assert_eq!(sanitize_prefix("1frontend"), "_1frontend");
        assert_eq!(sanitize_prefix("__frontend"), "frontend");
        assert_eq!(sanitize_prefix("__1frontend"), "_1frontend");
        assert_eq!(sanitize_prefix("--x"), "x");
    }

    #[test]
    fn hopeless_input_falls_back_to_the_default() {
        assert_eq!(sanitize_prefix(""), DEFAULT_PREFIX);
        assert_eq!(sanitize_prefix("---"), DEFAULT_PREFIX);
        assert_eq!(sanitize_prefix("___"), DEFAULT_PREFIX);
    }
}
