//! The mocker's timing model (runtime spec §4.4, Dynamo's current polynomial): how long one forward pass
//! of a simulated vLLM worker takes, from the prefill work in the batch and how full the KV cache is.
//! All times are in milliseconds of predicted GPU time, before the speedup ratios are applied.

/// Predicted time of a prefill pass over `uncached_tokens` tokens (the batch's tokens that are not served
/// from the prefix cache). No prefill work costs nothing.
pub(crate) fn prefill_ms(uncached_tokens: usize) -> f64 {
    if uncached_tokens == 0 {
        return 0.0;
    }
    let t = uncached_tokens as f64;
    4.209989e-07 * t * t + 1.518344e-02 * t + 16.50142
}

/// Predicted time of one decode pass when `active_fraction` of the KV cache's tokens are in use
/// (clamped to [0, 1]); never below 1 ms.
pub(crate) fn decode_ms(active_fraction: f64) -> f64 {
    // NaN (an empty cache divided by itself) reads as an idle cache.
    let p = if active_fraction.is_nan() {
        0.0
    } else {
        active_fraction.clamp(0.0, 1.0)
    };
    (-25.74 * p * p + 54.01 * p + 5.74).max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn prefill_matches_hand_computed_values() {
        assert_eq!(prefill_ms(0), 0.0);
        // 4.209989e-7·1e6 + 1.518344e-2·1000 + 16.50142
        assert!(close(prefill_ms(1000), 0.4209989 + 15.18344 + 16.50142));
        // 4.209989e-7·64² + 1.518344e-2·64 + 16.50142
        assert!(close(
            prefill_ms(64),
            0.001_724_411_494_4 + 0.971_740_16 + 16.50142
        ));
        assert!(close(prefill_ms(1), 4.209989e-07 + 1.518344e-02 + 16.50142));
    }

    #[test]
    fn decode_matches_hand_computed_values_and_is_clamped() {
        assert!(close(decode_ms(0.0), 5.74));
        assert!(close(decode_ms(0.5), -6.435 + 27.005 + 5.74));
        assert!(close(decode_ms(1.0), 34.01));
        assert!(close(decode_ms(3.0), 34.01), "p is capped at 1");
        assert!(close(decode_ms(-1.0), 5.74), "p is floored at 0");
        assert!(close(decode_ms(f64::NAN), 5.74));
    }
}
