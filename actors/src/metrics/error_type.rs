//! The `error_type` label of `requests_total`: the closed set of values the spec allows, and the
//! fallback rule that derives one from an HTTP status when the code that failed the request did
//! not classify it. Callers that know the cause should pass one of the constants directly rather
//! than going through a status code.

/// Label value on success.
pub const SUCCESS: &str = "";
/// The request failed validation (400 `Validation: ...`, other 4xx).
pub const VALIDATION: &str = "validation";
/// The model or route does not exist (404).
pub const NOT_FOUND: &str = "not_found";
/// Rejected because the service is busy (429, 529 or the configured overload status).
pub const OVERLOAD: &str = "overload";
/// No worker can serve the request now (503).
pub const UNAVAILABLE: &str = "unavailable";
/// The client went away or cancelled (499).
pub const CANCELLED: &str = "cancelled";
/// The backend stream went silent for longer than the configured timeout.
pub const RESPONSE_TIMEOUT: &str = "response_timeout";
/// Anything else, including requests that ended without an explicit outcome.
pub const INTERNAL: &str = "internal";
/// A request feature this frontend does not implement (501).
pub const NOT_IMPLEMENTED: &str = "not_implemented";

/// Derives the `error_type` label from an HTTP status when no explicit class was recorded.
///
/// `overload_status` is the status this frontend answers overload with (529 by default). Order of
/// the rules follows the spec: overload statuses first; 400 is `validation` only when the message
/// starts with `Validation:` and `internal` otherwise; 404, 501, 503 and 499 map to their classes;
/// any other 4xx is `validation`; everything else is `internal`.
pub fn error_type_for_status(status: u16, message: &str, overload_status: u16) -> &'static str {
    if status == overload_status || status == 429 || status == 529 {
        return OVERLOAD;
    }
    match status {
        400 if message.starts_with("Validation:") => VALIDATION,
        400 => INTERNAL,
        404 => NOT_FOUND,
        501 => NOT_IMPLEMENTED,
        503 => UNAVAILABLE,
        499 => CANCELLED,
        401..=499 => VALIDATION,
        _ => INTERNAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_spec() {
        let cases = [
            (529, "", OVERLOAD),
            (429, "", OVERLOAD),
            (
                400,
                "Validation: temperature must be in [0, 2], got 3",
                VALIDATION,
            ),
            (400, "Failed to parse request", INTERNAL),
            (404, "Model not found", NOT_FOUND),
            (501, "Validation: n > 1 is not supported", NOT_IMPLEMENTED),
            (503, "Service is not ready", UNAVAILABLE),
            (499, "", CANCELLED),
            (413, "", VALIDATION),
            (415, "", VALIDATION),
            (422, "", VALIDATION),
            (500, "boom", INTERNAL),
            (502, "", INTERNAL),
            (200, "", INTERNAL),
        ];
        for (status, message, expected) in cases {
            assert_eq!(
                error_type_for_status(status, message, 529),
                expected,
                "{status} {message:?}"
            );
        }
    }

    #[test]
    fn configured_overload_status_wins() {
        assert_eq!(error_type_for_status(503, "", 503), OVERLOAD);
        assert_eq!(error_type_for_status(529, "", 503), OVERLOAD);
    }
}
