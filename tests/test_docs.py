"""The documentation is true where it can be checked: the site builds with ``mkdocs build --strict``
(no warning: every page in the nav, every link and anchor resolves), the README's links resolve, its
two quick-start commands are the ones CI runs, and its example and the ``guard.dp.load`` example
run as written."""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from markdown.extensions.toc import slugify
from pydantic import BaseModel
from typer.testing import CliRunner

from guard import policy
from guard.policy import Policy

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLE = "## Example: guard a FastAPI prediction server"


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a Markdown heading line) up to the next heading of its level."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n") + len(heading) + 1
    following = re.search(rf"^{level} ", text[start:], re.MULTILINE)
    return text[start:start + following.start()] if following else text[start:]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def test_the_site_builds_strictly_without_warnings(tmp_path):
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                            str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                           check=False, cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stdout + built.stderr
    assert "WARNING" not in built.stderr, built.stderr
    assert (tmp_path / "site" / "policy" / "index.html").exists()


def test_the_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 250
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        assert target.exists(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.MULTILINE)
            assert anchor in {slugify(heading, "-") for heading in headings}, link


def test_the_quick_start_commands_are_the_ones_ci_runs():
    commands = code_blocks(section(README, "## Quick start"), "bash")[0]
    install, tests = [line.strip() for line in commands.splitlines()]
    assert commands in (ROOT / "docs" / "index.md").read_text()  # the site's home page gives the same two
    ci = (ROOT / ".ci" / "run").read_text()
    ci_install = shlex.split(re.search(r"^python3 -m (pip install .*)$", ci, re.MULTILINE).group(1))
    ci_install.remove("-q")
    assert shlex.split(tests) == [*ci_install, "&&", *shlex.split(ci.strip().splitlines()[-1])]
    pin = next(word for word in ci_install if word.startswith("torch=="))
    assert shlex.split(install) == ["pip", "install", pin, "-e", ".", "&&", "guard", "bench"]
    assert f"pip install {pin} -e ." in section(README, "## Install")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'guard = "guard.cli:main"' in pyproject and 'harness = "benchmarks.cli:register"' in pyproject


def test_the_readme_example_guards_the_app_as_it_says():
    namespace: dict = {}
    exec(code_blocks(section(README, EXAMPLE), "python")[0], namespace)  # noqa: S102 (the documented example)
    curl = code_blocks(section(README, EXAMPLE), "bash")[0]
    body = orjson.loads(re.search(r"-d '(.*)'", curl).group(1))
    promised = orjson.loads(re.search(r"^# (\{.*\})$", curl, re.MULTILINE).group(1))

    async def ask() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=namespace["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.post("/predict", json=body),
                    await client.post("/predict", json={**body, "sepal_length": str(body["sepal_length"])}),
                    await client.post("/predict", json={**body, "petal_width": "wide"})]

    answer, as_string, refused = asyncio.run(ask())
    assert answer.json() == promised == as_string.json()
    assert refused.status_code == 422 and refused.json()["error"] == "invalid_features"


DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_every_policy_example_in_the_docs_loads(tmp_path, monkeypatch):
    """Each TOML block is a policy (or a part of one) that ``Policy`` accepts as written; a user's
    feature function the example names is given to it as a module."""
    (tmp_path / "my_service").mkdir()
    (tmp_path / "my_service" / "__init__.py").write_text("")
    (tmp_path / "my_service" / "guarding.py").write_text("def features(document, query):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    blocks = [block for page in DOCS for block in code_blocks(page.read_text(), "toml")]
    assert len(blocks) >= 6
    for number, block in enumerate(blocks):
        path = tmp_path / f"example{number}.toml"
        path.write_text(block if block.startswith("secret") else f'secret = "a docs test secret"\n{block}')
        Policy.from_file(path)


def test_the_docs_name_every_policy_setting():
    documented = "\n".join(page.read_text() for page in DOCS)
    models = [model for model in vars(policy).values()
              if isinstance(model, type) and issubclass(model, BaseModel) and model.__module__ == policy.__name__]
    settings = {name for model in models for name in model.model_fields}
    assert len(settings) > 40
    spellings = ("`{}`", ".{}`", "{} =", "[{}]", "[{}.", ".{}]")
    missing = sorted(name for name in settings if not any(form.format(name) in documented for form in spellings))
    assert missing == []


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Optimal order")
def test_the_dp_load_example_runs_as_written(tmp_path, monkeypatch):
    from guard.cli import app

    deployment = (ROOT / "docs" / "deployment.md").read_text()
    serving = section(deployment, "## Serving a model trained with `guard train-dp`")
    command = shlex.split(code_blocks(serving, "bash")[0])
    assert command[:2] == ["guard", "train-dp"]
    monkeypatch.chdir(tmp_path)
    trained = CliRunner().invoke(app, command[1:])
    assert trained.exit_code == 0, trained.output
    namespace: dict = {}
    exec(code_blocks(serving, "python")[0], namespace)  # noqa: S102 (the documented example)
    assert namespace["probabilities"].shape == (5, 2)
    np.testing.assert_allclose(namespace["probabilities"].sum(axis=1), 1.0)
    assert set(namespace["labels"]) <= {0, 1}
