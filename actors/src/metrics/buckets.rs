//! Histogram bucket layouts for the frontend metrics: the log-spaced bucket algorithm of the spec
//! (§1.7) and the per-histogram `DYN_METRICS_<X>_{MIN,MAX,COUNT}` overrides. The algorithm must be
//! reproduced exactly, because dashboards built against the reference frontend key on the `le`
//! values; the env reader never fails, it warns and falls back to the defaults.

use tracing::warn;

/// Largest bucket count accepted from the environment; more would bloat every scrape.
pub const MAX_BUCKET_COUNT: usize = 512;

/// Log-spaced histogram upper bounds: `0.0`, then for `i = 1 ..= count-1` the value
/// `exp(ln(min) + (ln(max) - ln(min)) * i / (count-1))` rounded to two significant figures (half
/// away from zero), with consecutive duplicates removed. `min` itself is not a bucket; the
/// `+Inf` bucket is implicit.
///
/// Inputs are expected to satisfy [`HistogramConfig::is_valid`]; for other inputs the result is
/// still a strictly increasing list starting at `0.0` (values that are not finite or do not
/// increase are skipped), so it can always be handed to Prometheus.
pub fn log_buckets(min: f64, max: f64, count: usize) -> Vec<f64> {
    let mut buckets = vec![0.0];
    if count < 2 {
        return buckets;
    }
    let (ln_min, ln_max) = (min.ln(), max.ln());
    let steps = (count - 1) as f64;
    for i in 1..count {
        let value =
            round_to_two_significant_figures((ln_min + (ln_max - ln_min) * i as f64 / steps).exp());
        let last = buckets.last().copied().unwrap_or(0.0);
        if value.is_finite() && value > last {
            buckets.push(value);
        }
    }
    buckets
}

/// Rounds a positive value to two significant figures, half away from zero.
///
/// Scaling goes through an exact power of ten in the direction that keeps the final operation a
/// single correctly rounded division or an exact multiplication, so `0.0022` comes out as the
/// double nearest to 0.0022 (and renders as such) rather than `0.0022000000000000003`.
fn round_to_two_significant_figures(value: f64) -> f64 {
    if !value.is_finite() || value <= 0.0 {
        return value;
    }
    let magnitude = value.log10().floor() as i32;
    let shift = 1 - magnitude;
    if shift >= 0 {
        let scale = 10f64.powi(shift);
        (value * scale).round() / scale
    } else {
        let scale = 10f64.powi(-shift);
        (value / scale).round() * scale
    }
}

/// The histograms whose buckets are configurable through the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HistogramKind {
    /// `request_duration_seconds`.
    RequestDuration,
    /// `input_sequence_tokens` (and `cached_tokens`, which shares its buckets).
    InputSequence,
    /// `output_sequence_tokens`.
    OutputSequence,
    /// `time_to_first_token_seconds`.
    Ttft,
    /// `inter_token_latency_seconds`.
    Itl,
    /// `embedding_latency_seconds`.
    EmbeddingLatency,
}

impl HistogramKind {
    /// Every configurable histogram, in spec order.
    pub const ALL: [HistogramKind; 6] = [
        HistogramKind::RequestDuration,
        HistogramKind::InputSequence,
        HistogramKind::OutputSequence,
        HistogramKind::Ttft,
        HistogramKind::Itl,
        HistogramKind::EmbeddingLatency,
    ];

    /// The `<X>` in `DYN_METRICS_<X>_{MIN,MAX,COUNT}`.
    pub fn env_stem(self) -> &'static str {
        match self {
            HistogramKind::RequestDuration => "REQUEST_DURATION",
            HistogramKind::InputSequence => "INPUT_SEQUENCE",
            HistogramKind::OutputSequence => "OUTPUT_SEQUENCE",
            HistogramKind::Ttft => "TTFT",
            HistogramKind::Itl => "ITL",
            HistogramKind::EmbeddingLatency => "EMBEDDING_LATENCY",
        }
    }

    /// The spec's default `(min, max, count)` for this histogram.
    pub fn default_config(self) -> HistogramConfig {
        let (min, max, count) = match self {
            HistogramKind::RequestDuration => (1.0, 512.0, 10),
            HistogramKind::InputSequence => (50.0, 128_000.0, 12),
            HistogramKind::OutputSequence => (50.0, 32_000.0, 10),
            HistogramKind::Ttft => (0.001, 480.0, 18),
            HistogramKind::Itl => (0.001, 2.0, 13),
            HistogramKind::EmbeddingLatency => (0.001, 10.0, 14),
        };
        HistogramConfig { min, max, count }
    }
}

/// The parameters of one log-spaced histogram; [`HistogramConfig::buckets`] turns them into
/// upper bounds with [`log_buckets`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HistogramConfig {
    /// Lower end of the log range (exclusive: it is not itself a bucket). Must be finite and > 0.
    pub min: f64,
    /// Upper end of the log range; the last finite bucket. Must be finite and > `min`.
    pub max: f64,
    /// Number of points on the log scale, including `min`; 1 ..= [`MAX_BUCKET_COUNT`].
    pub count: usize,
}

impl HistogramConfig {
    /// Whether the combination is usable: finite bounds, `0 < min < max`, `1 <= count <= 512`.
    pub fn is_valid(&self) -> bool {
        self.min.is_finite()
            && self.max.is_finite()
            && self.min > 0.0
            && self.min < self.max
            && (1..=MAX_BUCKET_COUNT).contains(&self.count)
    }

    /// The bucket upper bounds for this configuration (see [`log_buckets`]).
    pub fn buckets(&self) -> Vec<f64> {
        log_buckets(self.min, self.max, self.count)
    }

    /// Resolves the configuration of `kind` from the environment, read through `env` so callers
    /// (and tests) choose where variables come from.
    ///
    /// For each of `MIN`, `MAX`, `COUNT`: `DYN_METRICS_<X>_<KEY>` wins; otherwise the deprecated
    /// `DYN_HISTOGRAM_DYN_METRICS_<X>_<KEY>` is used with a deprecation warning. A value that
    /// does not parse is reported and that one default is used. If the resulting combination is
    /// invalid (see [`HistogramConfig::is_valid`]) all three defaults are used, with a warning.
    pub fn all_from_env(
        env: &dyn Fn(&str) -> Option<String>,
    ) -> std::collections::HashMap<HistogramKind, HistogramConfig> {
        HistogramKind::ALL
            .iter()
            .map(|&kind| (kind, Self::from_env(kind, env)))
            .collect()
    }

    /// The defaults of every histogram.
    pub fn all_defaults() -> std::collections::HashMap<HistogramKind, HistogramConfig> {
        HistogramKind::ALL
            .iter()
            .map(|&kind| (kind, kind.default_config()))
            .collect()
    }

    /// One histogram's settings from the environment (see [`Self::all_from_env`]).
    pub fn from_env(kind: HistogramKind, env: &dyn Fn(&str) -> Option<String>) -> HistogramConfig {
        let default = kind.default_config();
        let min = read_value(env, kind, "MIN", default.min);
        let max = read_value(env, kind, "MAX", default.max);
        let count = read_value(env, kind, "COUNT", default.count);
        let config = HistogramConfig { min, max, count };
        if config.is_valid() {
            config
        } else {
            warn!(
                histogram = kind.env_stem(),
                min,
                max,
                count,
                "invalid histogram configuration for DYN_METRICS_{}_{{MIN,MAX,COUNT}}: need finite \
                 0 < min < max and 1 <= count <= {MAX_BUCKET_COUNT}; got min={min}, max={max}, \
                 count={count}; using defaults min={}, max={}, count={}",
                kind.env_stem(),
                default.min,
                default.max,
                default.count,
            );
            default
        }
    }
}

/// Reads and parses one `MIN`/`MAX`/`COUNT` value, falling back to `default` when absent or
/// unparseable.
fn read_value<T>(
    env: &dyn Fn(&str) -> Option<String>,
    kind: HistogramKind,
    key: &str,
    default: T,
) -> T
where
    T: std::str::FromStr + std::fmt::Display + Copy,
{
    let name = format!("DYN_METRICS_{}_{key}", kind.env_stem());
    let (used_name, raw) = match env(&name) {
        Some(raw) => (name, raw),
        None => {
            let deprecated = format!("DYN_HISTOGRAM_{name}");
            match env(&deprecated) {
                Some(raw) => {
                    warn!("{deprecated} is deprecated; use {name} instead");
                    (deprecated, raw)
                }
                None => return default,
            }
        }
    };
    match raw.trim().parse::<T>() {
        Ok(value) => value,
        Err(_) => {
            warn!("{used_name}={raw:?} is not a valid number; using the default {default}");
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |key| map.get(key).cloned()
    }

    #[test]
    fn default_tables_match_the_spec() {
        let table: [(HistogramKind, &[f64]); 6] = [
            (
                HistogramKind::RequestDuration,
                &[0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 130.0, 260.0, 510.0],
            ),
            (
                HistogramKind::InputSequence,
                &[
                    0.0, 100.0, 210.0, 430.0, 870.0, 1800.0, 3600.0, 7400.0, 15000.0, 31000.0,
                    63000.0, 130000.0,
                ],
            ),
            (
                HistogramKind::OutputSequence,
                &[
                    0.0, 100.0, 210.0, 430.0, 880.0, 1800.0, 3700.0, 7600.0, 16000.0, 32000.0,
                ],
            ),
            (
                HistogramKind::Ttft,
                &[
                    0.0, 0.0022, 0.0047, 0.01, 0.022, 0.047, 0.1, 0.22, 0.47, 1.0, 2.2, 4.7, 10.0,
                    22.0, 48.0, 100.0, 220.0, 480.0,
                ],
            ),
            (
                HistogramKind::Itl,
                &[
                    0.0, 0.0019, 0.0035, 0.0067, 0.013, 0.024, 0.045, 0.084, 0.16, 0.3, 0.56, 1.1,
                    2.0,
                ],
            ),
            (
                HistogramKind::EmbeddingLatency,
                &[
                    0.0, 0.002, 0.0041, 0.0084, 0.017, 0.035, 0.07, 0.14, 0.29, 0.59, 1.2, 2.4,
                    4.9, 10.0,
                ],
            ),
        ];
        for (kind, expected) in table {
            // Exact equality on purpose: the values must be the doubles nearest the decimals.
            assert_eq!(kind.default_config().buckets(), expected, "{kind:?}");
        }
    }

    #[test]
    fn explicit_arguments_match_the_spec_rows() {
        assert_eq!(
            log_buckets(1.0, 512.0, 10),
            [0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 130.0, 260.0, 510.0]
        );
        // Bucket values print the way the spec writes them (this is what `le` shows).
        let printed: Vec<String> = log_buckets(0.001, 480.0, 18)
            .iter()
            .map(f64::to_string)
            .collect();
        assert_eq!(
            printed,
            [
                "0", "0.0022", "0.0047", "0.01", "0.022", "0.047", "0.1", "0.22", "0.47", "1",
                "2.2", "4.7", "10", "22", "48", "100", "220", "480"
            ]
        );
    }

    #[test]
    fn min_is_not_a_bucket_and_duplicates_collapse() {
        // 1 -> 1.2 in 4 steps: 1.06, 1.13, 1.2 round to 1.1, 1.1, 1.2.
        assert_eq!(log_buckets(1.0, 1.2, 4), [0.0, 1.1, 1.2]);
        assert_eq!(log_buckets(1.0, 10.0, 1), [0.0]);
        assert_eq!(log_buckets(1.0, 10.0, 0), [0.0]);
    }

    #[test]
    fn rounding_is_half_away_from_zero() {
        assert_eq!(round_to_two_significant_figures(0.125), 0.13);
        assert_eq!(round_to_two_significant_figures(125.0), 130.0);
        assert_eq!(round_to_two_significant_figures(1.25), 1.3);
        assert_eq!(round_to_two_significant_figures(9.96), 10.0);
    }

    #[test]
    fn buckets_are_strictly_increasing_even_for_odd_inputs() {
        for (min, max, count) in [
            (1e-9, 1e9, 512),
            (0.5, 0.51, 50),
            (-1.0, 10.0, 5),
            (1.0, f64::NAN, 5),
        ] {
            let buckets = log_buckets(min, max, count);
            assert_eq!(buckets[0], 0.0);
            assert!(
                buckets.windows(2).all(|w| w[0] < w[1]),
                "{min} {max} {count}: {buckets:?}"
            );
            assert!(buckets.iter().all(|b| b.is_finite()));
        }
    }

    #[test]
    fn absent_env_gives_defaults() {
        let env = env_of(&[]);
        for kind in HistogramKind::ALL {
            assert_eq!(HistogramConfig::from_env(kind, &env), kind.default_config());
        }
    }

    #[test]
    fn new_names_override_each_value() {
        let env = env_of(&[
            ("DYN_METRICS_TTFT_MIN", "0.01"),
            ("DYN_METRICS_TTFT_MAX", " 100 "),
            ("DYN_METRICS_TTFT_COUNT", "5"),
            ("DYN_METRICS_ITL_COUNT", "20"),
        ]);
        assert_eq!(
            HistogramConfig::from_env(HistogramKind::Ttft, &env),
            HistogramConfig {
                min: 0.01,
                max: 100.0,
                count: 5
            }
        );
        assert_eq!(
            HistogramConfig::from_env(HistogramKind::Itl, &env),
            HistogramConfig {
                min: 0.001,
                max: 2.0,
                count: 20
            }
        );
        assert_eq!(
            HistogramConfig::from_env(HistogramKind::RequestDuration, &env),
            HistogramKind::RequestDuration.default_config()
        );
    }

    #[test]
    fn deprecated_names_are_read_only_when_the_new_name_is_absent() {
        let env = env_of(&[
            ("DYN_HISTOGRAM_DYN_METRICS_REQUEST_DURATION_MAX", "1000"),
            ("DYN_HISTOGRAM_DYN_METRICS_REQUEST_DURATION_COUNT", "7"),
            ("DYN_METRICS_REQUEST_DURATION_COUNT", "8"),
        ]);
        assert_eq!(
            HistogramConfig::from_env(HistogramKind::RequestDuration, &env),
            HistogramConfig {
                min: 1.0,
                max: 1000.0,
                count: 8
            }
        );
    }

    #[test]
    fn unparseable_value_falls_back_to_that_default_only() {
        let env = env_of(&[
            ("DYN_METRICS_OUTPUT_SEQUENCE_MIN", "ten"),
            ("DYN_METRICS_OUTPUT_SEQUENCE_MAX", "64000"),
            ("DYN_METRICS_OUTPUT_SEQUENCE_COUNT", "-3"),
        ]);
        assert_eq!(
            HistogramConfig::from_env(HistogramKind::OutputSequence, &env),
            HistogramConfig {
                min: 50.0,
                max: 64000.0,
                count: 10
            }
        );
        let env = env_of(&[("DYN_METRICS_INPUT_SEQUENCE_MAX", "")]);
        assert_eq!(
            HistogramConfig::from_env(HistogramKind::InputSequence, &env),
            HistogramKind::InputSequence.default_config()
        );
    }

    #[test]
    fn invalid_combination_resets_all_three() {
        let cases: &[&[(&str, &str)]] = &[
            &[
                ("DYN_METRICS_EMBEDDING_LATENCY_MIN", "0"),
                ("DYN_METRICS_EMBEDDING_LATENCY_COUNT", "4"),
            ],
            &[
                ("DYN_METRICS_EMBEDDING_LATENCY_MIN", "-1"),
                ("DYN_METRICS_EMBEDDING_LATENCY_COUNT", "4"),
            ],
            &[
                ("DYN_METRICS_EMBEDDING_LATENCY_MIN", "10"),
                ("DYN_METRICS_EMBEDDING_LATENCY_COUNT", "4"),
            ],
            &[
                ("DYN_METRICS_EMBEDDING_LATENCY_MIN", "20"),
                ("DYN_METRICS_EMBEDDING_LATENCY_COUNT", "4"),
            ],
            &[
                ("DYN_METRICS_EMBEDDING_LATENCY_MAX", "inf"),
                ("DYN_METRICS_EMBEDDING_LATENCY_COUNT", "4"),
            ],
            &[
                ("DYN_METRICS_EMBEDDING_LATENCY_MIN", "NaN"),
                ("DYN_METRICS_EMBEDDING_LATENCY_COUNT", "4"),
            ],
            &[
                ("DYN_METRICS_EMBEDDING_LATENCY_MAX", "20"),
                ("DYN_METRICS_EMBEDDING_LATENCY_COUNT", "0"),
            ],
            &[
                ("DYN_METRICS_EMBEDDING_LATENCY_MAX", "20"),
                ("DYN_METRICS_EMBEDDING_LATENCY_COUNT", "513"),
            ],
        ];
        for pairs in cases {
            assert_eq!(
                HistogramConfig::from_env(HistogramKind::EmbeddingLatency, &env_of(pairs)),
                HistogramKind::EmbeddingLatency.default_config(),
                "{pairs:?}"
            );
        }
        let edge = env_of(&[("DYN_METRICS_EMBEDDING_LATENCY_COUNT", "512")]);
        assert_eq!(
            HistogramConfig::from_env(HistogramKind::EmbeddingLatency, &edge).count,
            512
        );
    }
}
