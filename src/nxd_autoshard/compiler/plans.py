"""Declarative plans: module-name patterns mapped to parallel styles, as a dict or a YAML file."""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Mapping

import torch
import yaml

from nxd_autoshard.ir.errors import PlanError

__all__ = ["STYLES", "FAMILY_PLANS", "load_plan", "plan_file", "resolve_styles"]


STYLES = ("column", "row", "vocab_parallel", "replicate")


# model_type (HF config) -> plan file in passes/
FAMILY_PLANS = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "bert": "bert",
}


def _passes_dir() -> Path:
    shipped = resources.files("nxd_autoshard") / "passes"
    if shipped.is_dir():
        return Path(str(shipped))
    return Path(__file__).resolve().parents[3] / "passes"


def plan_file(name: str) -> Path:
    """Path of a plan shipped in passes/ (by family or file name)."""
    path = _passes_dir() / f"{FAMILY_PLANS.get(name, name)}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in _passes_dir().glob("*.yaml"))
        raise PlanError(
            f"no plan file for '{name}'; shipped plans: {', '.join(known)}; "
            "pass plan='auto' to infer one, or a dict of pattern -> style"
        )
    return path


def load_plan(plan: str | Path | Mapping[str, str]) -> dict[str, str]:
    """Rules of a plan given as a dict, a YAML path, or the name of a shipped family plan."""
    if isinstance(plan, Mapping):
        rules = dict(plan)
    else:
        path = Path(plan)
        if not path.is_file():
            path = plan_file(str(plan))
        rules = yaml.safe_load(path.read_text()) or {}
        if not isinstance(rules, dict):
            raise PlanError(f"plan file {path} must map module patterns to styles")
    for pattern, style in rules.items():
        if style not in STYLES:
            raise PlanError(
                f"plan rule '{pattern}: {style}': unknown style '{style}'; "
                f"use one of {', '.join(STYLES)}"
            )
    return rules


def _compile(pattern: str) -> re.Pattern:
    parts = [r"[^.]+" if part == "*" else part for part in pattern.split(".")]
    try:
        return re.compile(r"\.".join(parts))
    except re.error as err:
        raise PlanError(f"plan pattern '{pattern}' is not a valid pattern: {err}") from None


def resolve_styles(model: torch.nn.Module, rules: Mapping[str, str]) -> dict[str, str]:
    """Expand plan rules to {parameter name: style}; a pattern that matches nothing is an error."""
    modules = [name for name, _ in model.named_modules() if name]
    styles: dict[str, str] = {}
    for pattern, style in rules.items():
        regex = _compile(pattern)
        matched = [m for m in modules if regex.fullmatch(m)]
        if not matched:
            probe = pattern.replace("*", "0")
            near = difflib.get_close_matches(probe, modules, n=5, cutoff=0.5)
            raise PlanError(
                f"plan pattern '{pattern}' matches no module of {type(model).__name__}; "
                + (f"near misses: {', '.join(near)}" if near else "no module name is close")
                + ". Patterns are full module paths, '*' matches one path segment and "
                "(a|b) alternatives are allowed; print(model) lists the names."
            )
        for mod in matched:
            for pname, _ in model.get_submodule(mod).named_parameters(recurse=False):
                styles[f"{mod}.{pname}"] = style
    # tied parameters (GPT-2's wte / lm_head) share one style under every name
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    for names in aliases.values():
        chosen = [styles[n] for n in names if n in styles]
        if chosen:
            for n in names:
                styles.setdefault(n, chosen[0])
    return styles
