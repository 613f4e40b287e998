"""`python -m hjepa.bench <subcommand>`: the subcommands are listed in hjepa/bench/__init__.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from hjepa.bench import __doc__ as DOC, data, e2e, loader, masks, memory, pack, step
from hjepa.bench.common import print_table

SUBCOMMANDS = {"step": step, "memory": memory, "masks": masks, "data": data, "loader": loader, "e2e": e2e, "pack": pack}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hjepa.bench", description=DOC.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, module in SUBCOMMANDS.items():
        q = sub.add_parser(name, help=module.HELP)
        if name != "pack":
            q.add_argument("--json", action="store_true", help="one JSON object per row")
            q.add_argument("--out", default=None, help="also append the JSON rows to this file")
        module.add_arguments(q)
    a = p.parse_args(argv)
    if a.cmd == "data" and a.images and not Path(a.images).expanduser().exists():
        raise SystemExit(f"--images {a.images} does not exist")
    rows = SUBCOMMANDS[a.cmd].run(a)
    if rows and not a.json:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
