"""Make a results CSV readable again: keep the header and every complete row, move the rest aside.

    python scripts/repair_csv.py results/runs.csv
    python scripts/repair_csv.py results/runs.csv --append outputs/<date>/<time>   # + that run's row

Everything from the first row that cannot be read on (a quoted field cut short by a crash or a
truncated copy, a row with more or fewer cells than the header, bytes that are not UTF-8) is
appended byte for byte to ``results/runs.csv.rejected``; nothing is deleted. The CSV is rewritten
atomically under the same lock as the runs' appends and keeps its mode. A file that is not a
results CSV of this project (another header or separator) is refused, exit status 2.

``--append RUN_DIR`` then appends the record a run wrote to ``RUN_DIR/metrics.json`` (a run that
finished while its CSV was unreadable says so): unless an ok row with its run key is there already.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import typing
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from dllm.logging.record import FLATTENED, RunRecord, record_key  # noqa: E402
from dllm.logging.sinks import ResultsCsvError, append_csv, existing_keys, repair_results_csv  # noqa: E402
from dllm.registry import PARAMETER_TYPES, type_problem  # noqa: E402

# What says which experiment a row is (every record has them); the dict fields are flattened into
# cache.* / decoding.* / metrics.* columns (record.FLATTENED).
IDENTITY = ("run_id", "run_key", "status", "model", "cache", "decoding", "task")


def read_record(run_dir: Path) -> dict:
    """The row a run folder's metrics.json holds (ValueError naming the problem)."""
    metrics = run_dir / "metrics.json"
    try:
        row = json.loads(metrics.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--append {run_dir}: cannot read {metrics} ({err})") from None
    if not isinstance(row, dict) or not row.get("run_key") or not all(isinstance(k, str) for k in row):
        raise ValueError(f"--append {run_dir}: {metrics} is not a run record (no run_key)")
    missing = [name for name in IDENTITY if not row.get(name)]
    if missing:
        raise ValueError(f"--append {run_dir}: {metrics} is not a whole run record (no {', '.join(missing)})")
    columns = {f.name for f in fields(RunRecord)} - set(FLATTENED)
    unknown = [k for k in row if k not in columns and not k.startswith(tuple(f"{p}." for p in FLATTENED.values()))]
    if unknown:
        raise ValueError(f"--append {run_dir}: {metrics} has columns no run record has: {unknown}")
    hints = typing.get_type_hints(RunRecord)
    for key, value in row.items():
        if key in hints and (problem := _value_problem(value, hints[key])):
            raise ValueError(f"--append {run_dir}: {metrics}: {key}={value!r} (allowed: {problem})")
    return row


def _value_problem(value, hint) -> str | None:
    """What a record's ``value`` must be to be what its field ``hint`` says, or None where it is: a
    hand-edited or damaged metrics.json is refused rather than appended (aggregate.py would refuse
    the whole CSV for it). The registry's check of a setting's type, with texts, and finite numbers
    (a record holds no inf)."""
    problem = type_problem(value, hint, {str: "a text", **PARAMETER_TYPES})
    if problem is None and isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    return problem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="results CSV (results_csv)")
    parser.add_argument("--append", type=Path, metavar="RUN_DIR", help="then append the record in RUN_DIR/metrics.json")
    args = parser.parse_args(argv)
    path = args.csv
    if not path.is_file():
        what = ("is a folder, not a results CSV" if path.is_dir() else "no such file" if not path.exists()
                else "is not a regular file (a device or pipe), not a results CSV")
        parser.error(f"{path}: {what}")
    try:
        row = None if args.append is None else read_record(args.append)
        kept, moved = repair_results_csv(path)
    except (ResultsCsvError, ValueError) as e:
        parser.error(str(e))
    if moved:
        rejected = f"{path.resolve()}.rejected"  # beside the real file when path is a symlink
        print(f"{path}: header and rows before the first unreadable one kept (rows: {kept}); "
              f"{moved} bytes from there on moved to {rejected}")
    else:
        print(f"{path}: every row is readable (rows: {kept}); nothing to repair")
    if row is not None:
        if row.get("status") == "ok" and record_key(row) in existing_keys(path):
            print(f"{path}: already has an ok row with run key {row['run_key']}; {args.append} not appended")
        else:
            try:
                append_csv(path, row)
            except ResultsCsvError as e:
                print(e, file=sys.stderr)
                return 2
            print(f"{path}: appended the record of {args.append} (run key {row['run_key']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
