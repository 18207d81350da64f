"""Make a results CSV readable again: keep the header and every complete row, move the rest aside.

    python scripts/repair_csv.py results/runs.csv

Everything from the first row that cannot be read on (a quoted field cut short by a crash or a
truncated copy, a row with more or fewer cells than the header, bytes that are not UTF-8) is
appended byte for byte to ``results/runs.csv.rejected``; nothing is deleted. The CSV is rewritten
atomically under the same lock as the runs' appends and keeps its mode. A file that is not a
results CSV of this project (another header or separator) is refused, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from dllm.logging.sinks import ResultsCsvError, repair_results_csv  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="results CSV (results_csv)")
    path = parser.parse_args(argv).csv
    if not path.is_file():
        print(f"{path}: {'is a folder, not a CSV file' if path.is_dir() else 'no such file'}", file=sys.stderr)
        return 2
    try:
        kept, moved = repair_results_csv(path)
    except ResultsCsvError as e:
        print(e, file=sys.stderr)
        return 2
    if moved:
        rejected = f"{path.resolve()}.rejected"  # beside the real file when path is a symlink
        print(f"{path}: header and rows before the first unreadable one kept (rows: {kept}); "
              f"{moved} bytes from there on moved to {rejected}")
    else:
        print(f"{path}: every row is readable (rows: {kept}); nothing to repair")
    return 0


if __name__ == "__main__":
    sys.exit(main())
