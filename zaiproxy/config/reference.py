# -*- test-case-name: tests.test_settings -*-
"""
The settings as documents: README.rst's table and C{etc/zaiproxy.env},
both made from the declarations in L{zaiproxy.config.settings} so they
cannot drift from the code (tests compare them).

Regenerate them with C{python -m zaiproxy.config.reference} (the table)
and C{python -m zaiproxy.config.reference --env} (the file).
"""

from __future__ import annotations

import sys

from zaiproxy.config.settings import settingSpecs

__all__ = ["environmentTemplate", "settingsTable"]


def settingsTable() -> str:
    """
    The reStructuredText table of every setting (README.rst holds a copy).
    """
    rows = [
        (
            f"``{s.env}``",
            "*required*" if s.default is None else f"``{s.default}``" if s.default else "(empty)",
            s.help,
        )
        for s in settingSpecs()
    ]
    header = ("Variable", "Default", "Meaning")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    rule = " ".join("=" * width for width in widths)
    lines = [rule, " ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(), rule]
    lines += [" ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(rule)
    return "\n".join(lines)


def environmentTemplate() -> str:
    """
    etc/zaiproxy.env: every setting with its default, commented out.
    """
    lines = [
        "# zaiproxy settings, read by systemd (EnvironmentFile=) and by",
        "# `twistd zaiproxy --config`. Every setting is listed with its default;",
        "# uncomment a line to change it. Keep this file readable only by root and",
        "# the service's group (it holds the Z.AI key): install -m 0640, chgrp zaiproxy.",
        "",
    ]
    for spec in settingSpecs():
        lines.append("# " + spec.help)
        lines.append(f"{spec.env}=" if spec.default is None else f"#{spec.env}={spec.default}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write((environmentTemplate() if sys.argv[1:] == ["--env"] else settingsTable()) + "\n")
