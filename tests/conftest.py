import json
from pathlib import Path

import pytest

CONFIGS = Path(__file__).parent / "configs"
FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "bert"]


def config_dict(family: str, **overrides) -> dict:
    data = json.loads((CONFIGS / f"{family}.json").read_text())
    data.update(overrides)
    return data


def wide_heads(family: str) -> dict:
    """The family's tiny config with 8 heads (and 8 KV heads) so tp=8 divides them."""
    if family == "gpt2":
        return config_dict(family, n_head=8)
    extra = {"num_key_value_heads": 8} if family in ("llama", "mistral", "qwen2") else {}
    return config_dict(family, num_attention_heads=8, **extra)


@pytest.fixture
def configs_dir() -> Path:
    return CONFIGS
