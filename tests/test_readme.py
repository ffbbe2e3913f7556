"""
README.rst must match the code: its settings table is the schema, its quick
start is two commands (the second is what CI runs), it renders, and every
metric it names exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import docutils.core
import docutils.nodes

from zaiproxy.metrics import Metrics
from zaiproxy.settings import settingsTable

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.rst").read_text(encoding="utf-8")


def test_settingsTableIsTheSchema() -> None:
    """
    The table between the markers is generated from the settings schema
    (regenerate it with C{python -m zaiproxy.settings}).
    """
    inside = README.split(".. settings-table-start\n\n", 1)[1].split("\n\n.. settings-table-end", 1)[0]
    assert inside == settingsTable()


def test_rendersCleanly() -> None:
    """
    No docutils warning or error anywhere in the README.
    """
    messages: list[str] = []
    doctree = docutils.core.publish_doctree(
        README, settings_overrides={"report_level": 5, "halt_level": 5, "warning_stream": False}
    )
    for node in doctree.findall(docutils.nodes.system_message):
        if node["level"] >= 2:
            messages.append(node.astext())
    assert messages == []


def test_quickStartIsTwoCommands() -> None:
    """
    The quick start holds exactly two commands: set up and run the proxy,
    set up and run the tests; CI runs the second one.
    """
    section = README.split("Quick start\n-----------\n", 1)[1].split("Try it without a key", 1)[0]
    blocks = re.findall(r"::\n\n((?:    .*\n)+)", section)
    commands = [b.strip() for b in blocks]
    assert len(commands) == 2
    run, test = commands
    assert run.startswith("python3 -m venv .venv && .venv/bin/pip install -q . && ")
    assert "twistd -n --pidfile= zaiproxy" in run
    assert test == "python3 -m venv .venv && .venv/bin/pip install -q '.[test]' && .venv/bin/pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in ci
    assert ".venv/bin/pip install --quiet --disable-pip-version-check '.[test]'" in ci
    assert ci.rstrip().endswith("exec .venv/bin/pytest -q")


def test_metricsNamedExist() -> None:
    """
    Every zai_proxy_* metric the README names is exported.
    """
    named = set(re.findall(r"``(zai_proxy_[a-z_]+)``", README))
    exported = set()
    for family in Metrics("x", "0").registry.collect():
        exported.add(family.name + ("_total" if family.type == "counter" else ""))
    assert named and named <= exported, named - exported
