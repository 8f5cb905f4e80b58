"""A tiny Hugging Face model folder for Tokens-model tests, written without any library: a
byte-level BPE tokenizer with no merges (ids 0-255 are the bytes), three ChatML special tokens, a
ChatML chat template and a llama-style config.json."""

import json
import os

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = visible[:]
    n = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(visible, (chr(c) for c in chars)))


def write(out: str) -> str:
    os.makedirs(out, exist_ok=True)
    mapping = _bytes_to_unicode()
    vocab = {mapping[b]: b for b in range(256)}
    added = []
    for i, token in enumerate(SPECIAL):
        vocab[token] = 256 + i
        added.append({"id": 256 + i, "content": token, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    files = {
        "tokenizer.json": tokenizer,
        "tokenizer_config.json": {
            "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "add_bos_token": False, "add_eos_token": False, "chat_template": CHATML,
            "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
        },
        "config.json": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                        "max_position_embeddings": 4096, "bos_token_id": 256,
                        "eos_token_id": 258, "vocab_size": 259},
        "generation_config.json": {"bos_token_id": 256, "eos_token_id": 258},
    }
    for name, content in files.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False)
    return out
