"""``ray-lt sweep FILE ...`` and ``ray-lt report FILE ...``: the console entry point.

The same commands as ``python -m ray_lt.sweep`` and ``python -m ray_lt.report``, under one name
that ``pip install`` puts on the PATH.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "sweep": "run an experiment's sweep with Ray Tune, tracked in MLflow",
    "report": "the experiment's ablation tables and plots from its MLflow runs",
}
USAGE = "usage: ray-lt {sweep,report} FILE [options]   (ray-lt COMMAND --help for the options)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        lines = [USAGE, "", "commands:"]
        lines += [f"  {name:8s}{what}" for name, what in COMMANDS.items()]
        print("\n".join(lines))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "sweep":
        from ray_lt.sweep import main as run
    elif command == "report":
        from ray_lt.report import main as run
    else:
        print(f"error: unknown command {command!r}; use one of: sweep, report", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
