"""``python -m bench [--long] [--only SECTION]... [--repeat N]``: run benchmark sections, print
their tables and write each section's numbers to ``out/bench/<section>.json`` and all of them
to ``out/bench/all.json``. ``python -m bench compare OLD.json NEW.json`` prints two results
side by side with their ratios (bench/compare.py).

Without options (``make bench``) the quick sections run (:data:`QUICK`); ``--long``
(``make bench-long``) adds the ones sized for datasets (:data:`LONG`: the data path over
2,000 images, Redis bookkeeping of two million-item batches, a million-member archive through
the stack, which needs several GB of disk); ``--only`` runs the sections named, quick or
long. A section is a function
``(repeat: int) -> dict`` registered in :data:`SECTIONS`; it prints its own table and returns
the numbers to store.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from bench import (
    bookkeeping,
    bulk,
    compare,
    core,
    cpu_fast,
    datapath,
    examples,
    models,
    reuse,
    scale,
    service,
)

# docs/benchmarks.md and README.md say what each costs.
QUICK = ("core", "fast", "models", "service", "bulk", "examples", "reuse")
LONG = ("datapath", "bookkeeping", "scale")
SECTIONS: dict[str, Callable[[int], dict]] = {
    "core": core.run,
    "fast": cpu_fast.run,
    "models": models.run,
    "service": service.run,
    "bulk": bulk.run,
    "examples": examples.run,
    "datapath": datapath.run,
    "reuse": reuse.run,
    "bookkeeping": bookkeeping.run,
    "scale": scale.run,
}


def selected(only: list[str] | None, long: bool) -> list[str]:
    """The sections to run, in :data:`SECTIONS`' order."""
    wanted = set(only) if only else set(QUICK) | (set(LONG) if long else set())
    return [name for name in SECTIONS if name in wanted]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return compare.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(SECTIONS), help="run just this section"
    )
    parser.add_argument(
        "--long", action="store_true", help=f"add the long sections: {', '.join(LONG)}"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per image")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    every: dict[str, dict] = {}
    for name in selected(args.only, args.long):
        numbers = SECTIONS[name](max(1, args.repeat))
        every[name] = numbers
        path = args.out / f"{name}.json"
        path.write_text(json.dumps(numbers, indent=2) + "\n")
        print(f"wrote {path}")
    # Written after each run as a whole, for ``python -m bench compare``.
    (args.out / "all.json").write_text(json.dumps(every, indent=2) + "\n")
    print(f"wrote {args.out / 'all.json'}; compare with: python -m bench compare OLD.json NEW.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
