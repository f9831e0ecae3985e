"""``python -m bench compare OLD.json NEW.json``: two benchmark results side by side.

Either file may be one section's JSON (``out/bench/<section>.json``) or the whole run's
(``out/bench/all.json``, every section by name; docs/bench-baseline.json is one from this
project's machine). Every number found in both, at the same place, is printed with NEW / OLD;
a change of more than ``--threshold`` (10 %) in the wrong direction is marked ``worse`` —
throughputs and ratios (``…per_s``, ``…_vs_…``) should grow, times (``…_ms``,
``seconds``, ``…_s``) should shrink; others are printed unmarked. ``--fail`` exits 1 when
anything is worse, for a review script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: Path) -> dict:
    """A result file as {section: numbers}."""
    data = json.loads(path.read_text())
    if isinstance(data, dict) and isinstance(data.get("section"), str):
        return {data["section"]: data}
    return data


def numbers(tree: object, prefix: str = "") -> dict[str, float]:
    """Every number in ``tree`` by its dotted path (list items by index); booleans are not
    numbers here."""
    found: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.update(numbers(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found.update(numbers(value, f"{prefix}[{index}]"))
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        found[prefix] = float(tree)
    return found


def direction(path: str) -> int:
    """+1 where more is better, -1 where less is, 0 where the name does not say."""
    name = path.rsplit(".", 1)[-1].split("[", 1)[0]
    if "per_s" in name or "_vs_" in name or name.startswith("ratio") or "speedup" in name:
        return 1
    if name.endswith(("_ms", "_s", "seconds")) or "_ms_" in name:
        return -1
    return 0


def compare(old: dict, new: dict, *, threshold: float = 0.10) -> list[dict]:
    """One row per number present in both: path, old, new, ratio and verdict."""
    before, after = numbers(old), numbers(new)
    rows = []
    for path in sorted(before.keys() & after.keys()):
        a, b = before[path], after[path]
        ratio = b / a if a else (1.0 if b == a else float("inf"))
        sense = direction(path)
        verdict = ""
        if sense and a:
            change = (ratio - 1) * sense
            verdict = "worse" if change < -threshold else "better" if change > threshold else ""
        rows.append({"path": path, "old": a, "new": b, "ratio": ratio, "verdict": verdict})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--threshold", type=float, default=0.10)
    parser.add_argument("--all", action="store_true", help="also print unchanged numbers")
    parser.add_argument("--fail", action="store_true", help="exit 1 when anything is worse")
    args = parser.parse_args(argv)
    rows = compare(load(args.old), load(args.new), threshold=args.threshold)
    shown = [r for r in rows if args.all or r["verdict"] or direction(r["path"])]
    width = max((len(r["path"]) for r in shown), default=10)
    print(f"{'number':<{width}}  {'old':>12}  {'new':>12}  {'new/old':>8}")
    for row in shown:
        print(
            f"{row['path']:<{width}}  {row['old']:>12.4g}  {row['new']:>12.4g}  "
            f"{row['ratio']:>8.3f}  {row['verdict']}"
        )
    worse = [r for r in rows if r["verdict"] == "worse"]
    print(f"{len(rows)} numbers in both; {len(worse)} worse by more than {args.threshold:.0%}")
    return 1 if args.fail and worse else 0


if __name__ == "__main__":
    sys.exit(main())
