"""Open a report in headless Chromium as a reader would (a 1400x1000 window) and say what the browser
saw: the page's text, its images and whether each loaded, every resource it requested, and where the
summary and the first privacy-utility figure are on the first screen. Chromium comes from the
distribution's packages (``apt-get install chromium``); without it the browser tests skip."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

WINDOW = (1400, 1000)
PROBE = """<script>
window.addEventListener('load', () => {
  const box = (selector) => { const e = document.querySelector(selector);
    return e ? e.getBoundingClientRect().toJSON() : null; };
  const probe = {
    text: document.body.innerText,
    images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth, alt: i.alt})),
    resources: performance.getEntriesByType('resource').map(r => r.name),
    viewport: [window.innerWidth, window.innerHeight],
    summary: box('#summary table'), tradeoff: box('#tradeoffs img'),
  };
  const out = document.createElement('pre'); out.id = 'probe'; out.textContent = JSON.stringify(probe);
  document.body.appendChild(out);
});
</script>"""
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         f"--window-size={WINDOW[0]},{WINDOW[1]}", "--host-resolver-rules=MAP * ~NOTFOUND")
"""No sandbox (tests may run as root); every host name unresolvable, so no request can leave."""
MARKDOWN = (r"\*\*\S", r"`", r"(?m)^#{1,6} ", r"\|\s*---", r"\[[^\]]+\]\([^)]+\)", r"(?<!\w)__\w")
"""Markdown syntax that would show if the page were Markdown pasted into HTML."""


def chromium() -> str:
    """The Chromium binary, or skip the test saying how to get it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on PATH: apt-get install chromium (.ci/run installs it as root)")


def open_page(page: Path, tmp_path: Path) -> dict:
    """What Chromium saw of ``page`` (a copy with a probe script appended, so the page itself is
    untouched): ``text``, ``images``, ``resources``, ``viewport``, ``summary`` and ``tradeoff`` boxes,
    and ``dom`` (the whole DOM after load)."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([chromium(), *FLAGS, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r"<pre id=\"probe\">(.*?)</pre>", dom, re.DOTALL)
    assert found, f"the probe did not run: {dom[-500:]}"
    return {**json.loads(html.unescape(found.group(1))), "dom": dom}


def screenshot(page: Path, path: Path) -> bytes:
    """The first 1400x1000 pixels of ``page`` as PNG bytes, also written to ``path``."""
    subprocess.run([chromium(), *FLAGS, f"--screenshot={path}", page.resolve().as_uri()],
                   capture_output=True, timeout=120, check=True)
    return path.read_bytes()


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def markdown_leaks(text: str) -> list[str]:
    """The Markdown syntax found in a page's visible text."""
    return [match.group(0) for pattern in MARKDOWN for match in re.finditer(pattern, text)]


def external_references(dom: str) -> list[str]:
    """Every ``src``, ``href`` or CSS ``url(...)`` in the DOM that is not a data URI or an in-page anchor."""
    found = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", dom) + re.findall(r"url\(([^)]*)\)", dom)
    return [ref for ref in found if not ref.strip("'\" ").startswith(("data:", "#"))]
