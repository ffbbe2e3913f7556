"""
README.rst must match the code: its settings table is the schema, its quick
start is two commands (the second is what CI runs), it renders, and every
metric it names exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import docutils.core
import docutils.nodes

from zaiproxy.config.reference import settingsTable
from zaiproxy.observe.metrics import Metrics

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.rst").read_text(encoding="utf-8")


def test_settingsTableIsTheSchema() -> None:
    """
    The table between the markers is generated from the settings schema
    (regenerate it with C{python -m zaiproxy.config.reference}).
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
    assert run.startswith(
        "python3 -m venv .venv && .venv/bin/pip install -q -c requirements/constraints.txt . && "
    )
    assert "twistd -n --pidfile= zaiproxy" in run
    assert test == (
        "python3 -m venv .venv && .venv/bin/pip install -q -c requirements/constraints.txt '.[test]'"
        " && .venv/bin/pytest -q"
    )
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in ci
    assert (
        ".venv/bin/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt '.[test]'"
        in ci
    )
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


def test_serviceInstallMatchesTheRepository() -> None:
    """
    The VM install steps name files that exist and paths, units and a port
    that the units and the settings agree with.
    """
    from support.processes import value

    from zaiproxy.config.settings import loadSettings

    section = README.split("Running as a service\n--------------------\n", 1)[1].split(
        "How the code is laid out\n", 1
    )[0]
    commands = [
        line.strip() for block in re.findall(r"::\n\n((?:    .*\n)+)", section) for line in block.splitlines()
    ]
    service, socketUnit = ROOT / "systemd" / "zaiproxy.service", ROOT / "systemd" / "zaiproxy.socket"
    copied = {
        path for command in commands if command.startswith("install -m") for path in command.split()[3:-1]
    }
    assert copied == {"README.rst", "etc/zaiproxy.env", "systemd/zaiproxy.socket", "systemd/zaiproxy.service"}
    assert all((ROOT / path).is_file() for path in copied)
    venv = value(service, "ExecStart").split()[0].removesuffix("/bin/twistd")
    assert commands[:2] == [f"python3 -m venv {venv}", f"{venv}/bin/pip install ."]
    assert f"install -m 0644 README.rst {venv}/README.rst" in commands
    assert value(service, "Documentation") == f"file://{venv}/README.rst"
    assert f"install -m 0640 etc/zaiproxy.env {value(service, 'EnvironmentFile')}" in commands
    assert f"editor {value(service, 'EnvironmentFile')}" in commands
    assert "install -m 0644 systemd/zaiproxy.socket systemd/zaiproxy.service /etc/systemd/system/" in commands
    assert "systemctl enable --now zaiproxy.socket zaiproxy.service" in commands
    port = value(socketUnit, "ListenStream")
    assert f" --listen tcp:{port} " in value(service, "ExecStart")
    # The unit's user exists and can read (only) the settings file, which
    # the proxy itself re-reads on SIGHUP.
    user = value(service, "User")
    assert value(service, "Group") == user
    assert any(c.startswith("useradd --system --user-group ") and c.endswith(f" {user}") for c in commands)
    assert f"chgrp {user} {value(service, 'EnvironmentFile')}" in commands
    assert value(service, "ExecStart").endswith(f" --config {value(service, 'EnvironmentFile')}")
    assert f"curl -s http://127.0.0.1:{port}/health" in commands
    stateDirectory = "/var/lib/" + value(service, "StateDirectory")
    defaults, _ = loadSettings({"ZAI_API_KEY": "k", "STATE_DIRECTORY": stateDirectory})
    assert f"``{defaults.rateLimitStateFile}``" in section
    assert f"``StateDirectory={value(service, 'StateDirectory')}``" in section
    assert f"``TimeoutStopSec={value(service, 'TimeoutStopSec')}``" in section
    assert f"``RestartPreventExitStatus={value(service, 'RestartPreventExitStatus')}``" in section


def _portTaken(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_keylessDemoRunsPastedAsOneBlock(tmp_path: Path) -> None:
    """
    "Try it without a key", pasted into bash as one block (with this venv's
    bin folder for .venv/bin/), streams a whole answer through the proxy,
    and neither daemon logs a warning or an error; the limiter's state file
    defaults into the state folder of a fresh HOME.
    """
    import os
    import subprocess
    import sys

    if _portTaken(8080) or _portTaken(9999):
        message = "the demo's ports 8080 and 9999 must be free"
        if os.environ.get("CI"):
            raise AssertionError(message)
        import pytest

        pytest.skip(message)
    section = README.split("Try it without a key\n~~~~~~~~~~~~~~~~~~~~\n", 1)[1].split("\n\nAny request", 1)[
        0
    ]
    [block] = re.findall(r"::\n\n((?:    .*\n?)+)", section)
    script = "\n".join(line[4:] for line in block.splitlines())
    script = script.replace(".venv/bin/", str(Path(sys.executable).parent) + "/")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    result = subprocess.run(
        ["bash", "-c", script + "\nkill %1 %2\nwait\n"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = result.stdout
    assert out.count("event: content_block_delta") == 20, out[-3000:]
    assert "event: message_stop" in out
    assert 'zai_proxy_requests_total{method="POST",path="/v1/messages",status_code="200"' in out
    problems = [line for line in out.splitlines() if re.search(r"#(warn|error|critical)\]|Traceback", line)]
    assert problems == [], problems
    assert "Connection refused" not in result.stderr
    assert f"state file={tmp_path}/.local/state/zaiproxy/ceiling.json," in out
    # The ledger, in the same state folder, already holds the answer.
    [answer] = [line for line in out.splitlines() if line.startswith('{"from"')]
    usage = json.loads(answer)
    [row] = usage["rows"]
    assert (row["model"], row["requests"], row["errors"]) == ("glm-4.7", 1, 0)
    assert f"Usage ledger: {tmp_path}/.local/state/zaiproxy/ledger.sqlite3 (schema version 1)" in out
