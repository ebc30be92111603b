"""pytest plugin (entry point `pytest11`): the `assert_golden` fixture and `--update-goldens`.

    def test_llama_plan(assert_golden):
        sharded = autoshard(model, 8, example_inputs=(ids,))
        assert_golden(sharded, "llama_tp8")   # compares with goldens/llama_tp8.txt beside the test

A mismatch fails with a unified diff. Goldens are written only with `--update-goldens` or
NXD_UPDATE_GOLDENS=1, and each write is reported as a warning: never silently.
"""

from __future__ import annotations

import os
import warnings

import pytest

# torch is imported only when a test uses the fixture: this module loads in every pytest run
# of an environment where nxd-autoshard is installed.


ENV_VAR = "NXD_UPDATE_GOLDENS"


FOLDER = "goldens"


class GoldenUpdated(UserWarning):
    """A golden file was written because updating was asked for."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nxd-autoshard")
    group.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help=f"rewrite golden graph files that differ (same as {ENV_VAR}=1)",
    )


def update_requested(config: pytest.Config) -> bool:
    """Whether this run may rewrite goldens: the flag or the environment variable."""
    return bool(config.getoption("update_goldens", False)) or os.environ.get(ENV_VAR, "") not in (
        "",
        "0",
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    if update_requested(config):
        return "nxd-autoshard: golden files that differ WILL BE REWRITTEN (--update-goldens)"
    return None


@pytest.fixture
def assert_golden(request: pytest.FixtureRequest):
    """`assert_golden(sharded_or_text, name)`: compare with `goldens/<name>.txt` beside the test."""
    from nxd_autoshard.inspect.golden import assert_golden as check
    from nxd_autoshard.inspect.golden import golden_text

    update = update_requested(request.config)
    folder = request.path.parent / FOLDER

    def _assert_golden(obj, name: str) -> str:
        path = folder / f"{name}.txt"
        text = obj if isinstance(obj, str) else golden_text(obj)
        before = path.read_text() if path.exists() else None
        check(text, path, update=update)
        if update and before != text:
            warnings.warn(
                GoldenUpdated(f"golden {path} {'created' if before is None else 'rewritten'}"),
                stacklevel=2,
            )
        return text

    return _assert_golden
