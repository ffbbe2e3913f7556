"""
C{python -m zaiproxy.fake [options]}: run the fake Z.AI in the foreground,
as C{twistd -n --pidfile= zaiproxy-fake [options]} would.

The tap is wired in directly rather than looked up through twisted.plugins,
so this works wherever the package imports, even from an editable install
whose plugin file twistd cannot see.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """
    Parse the tap's options from C{argv} and run twistd with them.
    """
    from twisted.application.service import ServiceMaker
    from twisted.python import usage
    from twisted.scripts.twistd import ServerOptions, runApp  # type: ignore[attr-defined]

    from .tap import Options

    args = sys.argv[1:] if argv is None else argv
    tapOptions = Options()
    try:
        tapOptions.parseOptions(args)
    except usage.UsageError as e:
        sys.stderr.write(f"{tapOptions}\nzaiproxy-fake: {e}\n")
        raise SystemExit(2) from None
    config = ServerOptions()
    config.parseOptions(["--nodaemon", "--no_save", "--pidfile="])
    config.subCommand = "zaiproxy-fake"
    config.subOptions = tapOptions
    config.loadedPlugins = {
        "zaiproxy-fake": ServiceMaker(
            "zaiproxy-fake", "zaiproxy.fake.tap", "A fake Z.AI upstream.", "zaiproxy-fake"
        )
    }
    runApp(config)


if __name__ == "__main__":
    main()
