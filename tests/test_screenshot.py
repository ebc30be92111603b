"""The HTML report renders in a real browser: headless Chromium takes a screenshot of it."""

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from sharded_cache import sharded_family

SHOTS = Path(__file__).parent.parent / "build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _screenshot(page: Path, png: Path, profile: Path) -> None:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--hide-scrollbars",
        "--window-size=1200,1800",
        f"--screenshot={png}",
        page.as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)


def _png_size(png: Path) -> tuple[int, int]:
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed "
    "(Debian: apt-get install chromium; .ci/run installs it in CI)",
)
def test_html_report_renders_in_headless_chromium(tmp_path):
    report = sharded_family("llama", 2)[1].explain()
    page = tmp_path / "report.html"
    page.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'></head><body>{report.to_html()}"
        "</body></html>"
    )
    blank = tmp_path / "blank.html"
    blank.write_text("<!doctype html><html><body></body></html>")
    SHOTS.mkdir(parents=True, exist_ok=True)
    png = SHOTS / "explain_llama_tp2.png"
    png.unlink(missing_ok=True)
    _screenshot(page, png, tmp_path / "profile-a")
    _screenshot(blank, tmp_path / "blank.png", tmp_path / "profile-b")
    assert _png_size(png) == (1200, 1800)
    # text, tables and the SVG compress far worse than an empty white page
    assert png.stat().st_size > 5 * (tmp_path / "blank.png").stat().st_size
    print(f"screenshot: {png}")
