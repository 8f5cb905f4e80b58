//! The one error every configuration section's `validate()` returns: the key, the value as given,
//! and the rule it broke. It sits at the bottom of the crate and imports nothing, so each section is
//! typed and checked next to its user, and the loader (`src/config`) renders every refusal alike.

use std::fmt::Display;

/// A setting a section refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{key} = {value} {rule}")]
pub struct InvalidSetting {
    /// The full key, `section.name`.
    pub key: String,
    /// The value as given (strings quoted).
    pub value: String,
    /// What the value must be, phrased to follow the value: "must be at least 1".
    pub rule: String,
}

impl InvalidSetting {
    /// `key` = `value` broke `rule`.
    pub fn new(key: impl Into<String>, value: impl Display, rule: impl Into<String>) -> Self {
        InvalidSetting {
            key: key.into(),
            value: value.to_string(),
            rule: rule.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_key_the_value_and_the_rule() {
        let e = InvalidSetting::new("model_engine.threads", 0, "must be at least 1");
        assert_eq!(e.to_string(), "model_engine.threads = 0 must be at least 1");
    }
}
