"""Dynamo-shaped model registration (python-sdk spec §6): a worker publishes a model deployment card
for its instance of an endpoint, and frontends serve the model from it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Optional

from dynamix import _core

__all__ = [
    "EngineType",
    "KvEventPublisher",
    "KvRouter",
    "ModelInput",
    "ModelRuntimeConfig",
    "ModelType",
    "RouterConfig",
    "RouterMode",
    "WorkerMetricsPublisher",
    "WorkerType",
    "ZmqKvEventPublisher",
    "ZmqKvEventPublisherConfig",
    "lora_name_to_id",
    "register_llm",
    "register_model",
    "unregister_llm",
    "unregister_model",
]

log = logging.getLogger("dynamix.llm")

_USER_DATA_LIMIT = 64 * 1024
_DYNAMO_ONLY = ("tensor_model_config", "media_decoder", "media_fetcher", "needs",
                "self_host_metadata", "max_gpu_lora_count")
_ignored_logged: set = set()


class _Named:
    """An enum-like member with Dynamo's name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.name == self.name

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))


class ModelInput(_Named):
    Tokens: "ModelInput"
    Text: "ModelInput"
    Tensor: "ModelInput"


ModelInput.Tokens = ModelInput("Tokens")
ModelInput.Text = ModelInput("Text")
ModelInput.Tensor = ModelInput("Tensor")


class WorkerType(_Named):
    Aggregated: "WorkerType"
    Prefill: "WorkerType"
    Decode: "WorkerType"
    Encode: "WorkerType"


WorkerType.Aggregated = WorkerType("Aggregated")
WorkerType.Prefill = WorkerType("Prefill")
WorkerType.Decode = WorkerType("Decode")
WorkerType.Encode = WorkerType("Encode")


class RouterMode(_Named):
    RoundRobin: "RouterMode"
    Random: "RouterMode"
    KV: "RouterMode"
    Direct: "RouterMode"


RouterMode.RoundRobin = RouterMode("RoundRobin")
RouterMode.Random = RouterMode("Random")
RouterMode.KV = RouterMode("KV")
RouterMode.Direct = RouterMode("Direct")


class RouterConfig:
    def __init__(self, router_mode: RouterMode = RouterMode.RoundRobin, **kv_router_config: Any) -> None:
        if not isinstance(router_mode, RouterMode):
            raise TypeError(f"router_mode must be a RouterMode, not {type(router_mode).__name__}")
        self.router_mode = router_mode
        self.kv_router_config = kv_router_config

    def _card(self) -> dict:
        return {"router_mode": self.router_mode.name, **self.kv_router_config}


class ModelType:
    """Flags, combinable with ``|`` (``ModelType.Chat | ModelType.Completions``)."""

    _BITS = {"Chat": 1, "Completions": 2, "Embedding": 4, "TensorBased": 8, "Prefill": 16,
             "Images": 32, "Audios": 64, "Rerank": 128, "Videos": 256}
    Chat: "ModelType"
    Completions: "ModelType"
    Embedding: "ModelType"
    TensorBased: "ModelType"
    Prefill: "ModelType"
    Images: "ModelType"
    Audios: "ModelType"
    Rerank: "ModelType"
    Videos: "ModelType"
    Empty: "ModelType"

    def __init__(self, bits: int) -> None:
        self.bits = bits

    def __or__(self, other: "ModelType") -> "ModelType":
        if not isinstance(other, ModelType):
            return NotImplemented
        return ModelType(self.bits | other.bits)

    def __and__(self, other: "ModelType") -> "ModelType":
        return ModelType(self.bits & other.bits)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelType) and other.bits == self.bits

    def __hash__(self) -> int:
        return hash(self.bits)

    def names(self) -> list:
        return [name for name, bit in self._BITS.items() if self.bits & bit]

    def __repr__(self) -> str:
        return " | ".join(f"ModelType.{n}" for n in self.names()) or "ModelType.Empty"

    def supports_chat(self) -> bool:
        return bool(self.bits & 1)

    def supports_completions(self) -> bool:
        return bool(self.bits & 2)

    def supports_embedding(self) -> bool:
        return bool(self.bits & 4)

    def supports_tensor(self) -> bool:
        return bool(self.bits & 8)

    def supports_prefill(self) -> bool:
        return bool(self.bits & 16)

    def as_str(self) -> str:
        return " | ".join(self.names())


for _name, _bit in ModelType._BITS.items():
    setattr(ModelType, _name, ModelType(_bit))
ModelType.Empty = ModelType(0)


class ModelRuntimeConfig:
    """What an engine tells frontends about its capacity and features (copied into the card).

    The attributes are Dynamo 1.6.1's, with its defaults; dynamix's frontend reads the capacity
    numbers and the context length, and carries the rest in the card for other frontends."""

    _FIELDS = {
        "context_length": None, "total_kv_blocks": None, "max_num_seqs": None,
        "max_num_batched_tokens": None, "tool_call_parser": None, "reasoning_parser": None,
        "tokenizer_backend": None, "structural_tag": None,
        "exclude_tools_when_tool_choice_none": True, "data_parallel_start_rank": 0,
        "data_parallel_size": 1, "enable_local_indexer": True,
        "kv_event_publishing_enabled": None, "kv_event_source_mode": None,
        "kv_state_endpoint": None, "enable_eagle": False, "taints": set,
        "stable_routing_id": None, "runtime_data": dict, "topology_domains": dict,
        "kv_transfer_domain": None, "kv_transfer_enforcement": None,
        "kv_transfer_preferred_weight": None, "bootstrap_host": None, "bootstrap_port": None,
    }
    _INTEGERS = ("context_length", "total_kv_blocks", "max_num_seqs", "max_num_batched_tokens",
                 "data_parallel_start_rank", "data_parallel_size", "bootstrap_port")
    __slots__ = tuple(_FIELDS)

    def __init__(self) -> None:
        for name, default in self._FIELDS.items():
            object.__setattr__(self, name, default() if callable(default) else default)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._FIELDS:
            raise AttributeError(f"'ModelRuntimeConfig' object has no attribute '{name}'")
        if name in self._INTEGERS and value is not None and (
                isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"argument '{name}': '{type(value).__name__}' object cannot be "
                            "interpreted as an integer")
        object.__setattr__(self, name, value)

    def set_engine_specific(self, key: str, value: Any) -> None:
        json.dumps(value)  # must be JSON
        self.runtime_data[key] = value

    def get_engine_specific(self, key: str) -> Any:
        return self.runtime_data.get(key)

    def set_structural_tag(self, structural_tag: Optional[dict]) -> None:
        if structural_tag is not None and not isinstance(structural_tag, dict):
            raise TypeError("structural_tag must be a dict or None")
        self.structural_tag = structural_tag

    def set_disaggregated_endpoint(self, bootstrap_host: Optional[str] = None,
                                   bootstrap_port: Optional[int] = None) -> None:
        self.bootstrap_host = bootstrap_host
        self.bootstrap_port = bootstrap_port

    def _card(self) -> dict:
        card = {}
        for name in self._FIELDS:
            value = getattr(self, name)
            if name == "taints":
                value = sorted(value)
            elif name in ("runtime_data", "topology_domains"):
                value = dict(value)
            card[name] = value
        return card


def lora_name_to_id(name: str) -> int:
    """A stable positive 63-bit id for an adapter name."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 1) or 1


def _slug(name: str) -> str:
    chars = [c if (c.isascii() and (c.islower() or c.isdigit() or c in "-_")) else "_"
             for c in name.lower()]
    slug = "".join(chars).lstrip("_")
    return slug or "model"


# Cards this process published, by endpoint: {lora_name: slug or None} (shutdown removes them).
_CARDS: dict = {}


def _endpoint_key(endpoint: Any) -> tuple:
    return (id(endpoint._runtime._core), endpoint.namespace, endpoint.component, endpoint.name)


def _cards_of(endpoint: Any) -> list:
    """The card suffixes (None for the base model) of `endpoint`, forgotten here."""
    return list(_CARDS.pop(_endpoint_key(endpoint), {}).values())


def _file_ref(path: str) -> dict:
    checksum, size = _core.blake3_file(path)
    return {"path": path, "checksum": checksum, "size": size}


def _model_files(model_path: str, custom_template_path: Optional[str]) -> dict:
    """File references and facts of a Hugging Face model folder (spec §6.1)."""
    if not os.path.isdir(model_path):
        if os.path.exists(model_path):
            raise ValueError(f"model_path {model_path!r} is not a directory")
        raise FileNotFoundError(
            f"model_path {model_path!r} does not exist; dynamix cannot fetch models, so "
            "model_path must be a local directory (Hugging Face layout)"
        )
    files = {}
    tokenizer = os.path.join(model_path, "tokenizer.json")
    if not os.path.isfile(tokenizer):
        raise FileNotFoundError(f"{tokenizer} is missing: a Tokens model needs its tokenizer")
    files["tokenizer"] = {"hf_tokenizer_json": _file_ref(tokenizer)}
    config = os.path.join(model_path, "config.json")
    facts: dict = {}
    if os.path.isfile(config):
        files["model_info"] = {"hf_config_json": _file_ref(config)}
        try:
            with open(config, encoding="utf-8") as f:
                facts = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{config} is not valid JSON: {e}") from None
    tokenizer_config = os.path.join(model_path, "tokenizer_config.json")
    if os.path.isfile(tokenizer_config):
        files["prompt_formatter"] = {"hf_tokenizer_config_json": _file_ref(tokenizer_config)}
    template = custom_template_path or os.path.join(model_path, "chat_template.jinja")
    if custom_template_path is not None and not os.path.isfile(custom_template_path):
        raise FileNotFoundError(f"custom_template_path {custom_template_path!r} does not exist")
    if os.path.isfile(template):
        files["chat_template_file"] = {"hf_chat_template": {
            "is_custom": custom_template_path is not None, "file": _file_ref(template)}}
    generation = os.path.join(model_path, "generation_config.json")
    if os.path.isfile(generation):
        files["gen_config"] = {"hf_generation_config_json": _file_ref(generation)}
    return {"files": files, "config": facts}


async def register_model(model_input: ModelInput, model_type: ModelType, endpoint: Any,
                         model_path: str, model_name: Optional[str] = None, *,
                         worker_type: WorkerType = WorkerType.Aggregated,
                         context_length: Optional[int] = None,
                         kv_cache_block_size: Optional[int] = None, migration_limit: int = 0,
                         runtime_config: Optional[ModelRuntimeConfig] = None,
                         user_data: Optional[dict] = None,
                         custom_template_path: Optional[str] = None,
                         lora_name: Optional[str] = None, base_model_path: Optional[str] = None,
                         router_config: Optional[RouterConfig] = None,
                         model_aliases: Optional[list] = None, skip_model_assets: bool = False,
                         ignore_weights: bool = False, **dynamo_only: Any) -> None:
    """Publish this instance's model card for ``endpoint`` (spec §6)."""
    for key in dynamo_only:
        if key not in _DYNAMO_ONLY:
            raise TypeError(f"register_model() got an unexpected keyword argument {key!r}")
        if key not in _ignored_logged:
            _ignored_logged.add(key)
            log.info("register_model: %s is accepted and ignored by dynamix", key)
    if not isinstance(model_input, ModelInput):
        raise TypeError(f"model_input must be a ModelInput, not {type(model_input).__name__}")
    if model_input == ModelInput.Tensor:
        raise NotImplementedError("ModelInput.Tensor is not supported by dynamix")
    if not isinstance(model_type, ModelType):
        raise TypeError(f"model_type must be a ModelType, not {type(model_type).__name__}")
    unsupported = [n for n in model_type.names() if n not in ("Chat", "Completions", "Embedding")]
    if unsupported:
        raise NotImplementedError(f"ModelType.{unsupported[0]} is not supported by dynamix")
    if not model_type.names():
        raise ValueError("model_type is empty: give Chat, Completions or Embedding")
    if not isinstance(worker_type, WorkerType):
        raise TypeError(f"worker_type must be a WorkerType, not {type(worker_type).__name__}")
    if worker_type != WorkerType.Aggregated:
        raise NotImplementedError(
            f"WorkerType.{worker_type.name} is not supported: dynamix has no disaggregated serving yet"
        )
    if (lora_name is None) != (base_model_path is None):
        raise ValueError(
            "lora_name and base_model_path must both be provided together, or neither"
        )
    if not isinstance(model_path, str) or not model_path:
        raise ValueError("model_path must be a non-empty string")
    if user_data is not None:
        if not isinstance(user_data, dict):
            raise TypeError(f"user_data must be a dict, not {type(user_data).__name__}")
        try:
            encoded = json.dumps(user_data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"user_data is not JSON: {e}") from None
        if len(encoded.encode("utf-8")) > _USER_DATA_LIMIT:
            raise ValueError(f"user_data is {len(encoded)} bytes once encoded; the limit is 64 KiB")
    for name, value in (("context_length", context_length),
                        ("kv_cache_block_size", kv_cache_block_size)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} = {value!r} must be a positive integer")
    if not isinstance(migration_limit, int) or migration_limit < 0:
        raise ValueError(f"migration_limit = {migration_limit!r} must be a non-negative integer")

    name = model_name or os.path.basename(os.path.normpath(model_path)) or model_path
    files: dict = {}
    facts: dict = {}
    if model_input == ModelInput.Tokens:
        if skip_model_assets:
            raise ValueError(
                "skip_model_assets=True cannot be used with ModelInput.Tokens: "
                "the frontend needs the tokenizer"
            )
        found = _model_files(model_path, custom_template_path)
        files, facts = found["files"], found["config"]
    elif not skip_model_assets and os.path.isdir(model_path):
        try:
            found = _model_files(model_path, custom_template_path)
            files, facts = found["files"], found["config"]
        except (FileNotFoundError, ValueError) as e:
            log.info("Text model %s: not reading the files of %s (%s)", name, model_path, e)
    length = context_length or (runtime_config.context_length if runtime_config else None) \
        or facts.get("max_position_embeddings") or 0
    display = lora_name or name
    card = {
        "display_name": display,
        "slug": _slug(display),
        "source_path": model_path,
        "model_info": files.get("model_info"),
        "tokenizer": files.get("tokenizer"),
        **{k: files[k] for k in ("prompt_formatter", "chat_template_file", "gen_config")
           if k in files},
        "context_length": int(length),
        "kv_cache_block_size": kv_cache_block_size or 16,
        "migration_limit": migration_limit,
        "model_type": model_type.as_str(),
        "model_input": model_input.name,
        "worker_type": "aggregated",
        "needs": [],
        "user_data": user_data,
        "lora": {"name": lora_name, "base_model_path": base_model_path} if lora_name else None,
        "runtime_config": runtime_config._card() if runtime_config else {},
    }
    if router_config is not None:
        card["router_config"] = router_config._card()
    if model_aliases:
        card["model_aliases"] = [str(a) for a in model_aliases]
    if lora_name:
        card["base_model"] = name
    core = endpoint._runtime._core
    record = {
        "type": "Model",
        "namespace": endpoint.namespace,
        "component": endpoint.component,
        "endpoint": endpoint.name,
        "instance_id": core.instance_id,  # the core writes the current one
        "card_json": card,
    }
    suffix = _slug(lora_name) if lora_name else None
    if suffix:
        record["model_suffix"] = suffix
    await core.put_card(endpoint.namespace, endpoint.component, endpoint.name, suffix, record)
    _CARDS.setdefault(_endpoint_key(endpoint), {})[lora_name] = suffix
    log.info("registered model %s (%s, %s) for %s", display, model_input.name,
             model_type.as_str(), endpoint)


async def unregister_model(endpoint: Any, lora_name: Optional[str] = None) -> None:
    """Delete this instance's card for the base model, or for one adapter (spec §6.2)."""
    _CARDS.get(_endpoint_key(endpoint), {}).pop(lora_name, None)
    suffix = _slug(lora_name) if lora_name else None
    await endpoint._runtime._core.delete_card(endpoint.namespace, endpoint.component,
                                              endpoint.name, suffix)


register_llm = register_model
unregister_llm = unregister_model


class _Later:
    """A Dynamo class dynamix does not provide yet: importable, and constructing it says so."""

    feature = "this feature"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__}: {self.feature} is not supported by dynamix yet")


class KvEventPublisher(_Later):
    feature = "publishing KV events from Python workers"


class ZmqKvEventPublisher(_Later):
    feature = "publishing KV events over ZMQ"


class ZmqKvEventPublisherConfig(_Later):
    feature = "publishing KV events over ZMQ"


class WorkerMetricsPublisher(_Later):
    feature = "publishing worker load metrics from Python workers"


class KvRouter(_Later):
    feature = "the KV router in Python"


class EngineType(_Later):
    feature = "engine routes"
