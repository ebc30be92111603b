"""Hugging Face helpers: build a model from a local config (no download) and make random inputs."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_config", "build_model", "random_batch"]


def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError(
            "this needs Hugging Face transformers: pip install 'nxd-autoshard[hf]'"
        ) from err
    return transformers


def load_config(source: str | Path | dict | Any):
    """A transformers config from a config.json path, a folder holding one, a dict, or a config."""
    transformers = _transformers()
    if isinstance(source, transformers.PretrainedConfig):
        return source
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no config.json at '{source}': give a config.json or a folder holding one"
            )
        data = json.loads(path.read_text())
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(
            f"config '{source}' has no 'model_type'; it cannot be matched to an architecture"
        )
    return transformers.AutoConfig.for_model(model_type, **data)


def _head_class(config):
    """The Auto class that fits the config's architecture: causal LM, masked LM, seq2seq LM, or bare."""
    transformers = _transformers()
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers.models.auto import modeling_auto as auto

    for mapping, cls in (
        (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, transformers.AutoModelForCausalLM),
        (auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, transformers.AutoModelForMaskedLM),
        (auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, transformers.AutoModelForSeq2SeqLM),
    ):
        if config.model_type in mapping:
            return cls
    return transformers.AutoModel


def build_model(config, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The HF model of a config, with weights drawn from a fixed seed (same on every rank)."""
    config = load_config(config)
    cls = _head_class(config)
    torch.manual_seed(seed)
    if hasattr(cls, "from_config"):
        model = cls.from_config(config, torch_dtype=dtype)
    else:
        model = cls._from_config(config, torch_dtype=dtype)
    return model.eval()


def random_batch(
    model: torch.nn.Module, *, batch: int = 2, seq: int = 16, seed: int = 1
) -> tuple[tuple, dict]:
    """Random token ids and labels that fit the model's vocab: (args, kwargs) for its forward."""
    config = model.config
    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"labels": labels} if "labels" in params else {}
    return (ids,), kwargs
