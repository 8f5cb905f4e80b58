//! Upstream's lenient JSON parsing of request bodies.

use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Parse JSON like upstream: strictly, then after escaping raw control characters inside strings, then
/// after replacing invalid UTF-8; on failure report the original parser error.
pub fn parse_lenient<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let original = match serde_json::from_slice::<T>(body) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    if original.is_syntax() || original.is_eof() {
        let escaped = escape_control_chars(body);
        if let Ok(v) = serde_json::from_slice::<T>(&escaped) {
            tracing::warn!(
                "request body needed lenient parsing (raw control characters in strings)"
            );
            return Ok(v);
        }
        let lossy = String::from_utf8_lossy(&escaped).into_owned();
        if let Ok(v) = serde_json::from_str::<T>(&lossy) {
            tracing::warn!("request body needed lenient parsing (invalid UTF-8)");
            return Ok(v);
        }
    }
    Err(ApiError::bad_json(original))
}

fn escape_control_chars(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    for &b in body {
        if in_string && !escaped && b <= 0x1f {
            out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
            continue;
        }
        out.push(b);
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        }
    }
    out
}
