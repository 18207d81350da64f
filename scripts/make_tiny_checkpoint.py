"""Write a tiny random LLaDA / Dream / LLaDA-MoE checkpoint folder in the real on-disk format.

    python scripts/make_tiny_checkpoint.py --family llada --out /tmp/tiny_llada
    python scripts/make_tiny_checkpoint.py --family llada_moe --out /tmp/tiny_llada_moe
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without pip install -e

from dllm import seed_argument  # noqa: E402
from dllm.atomic import make_out_folder  # noqa: E402
from dllm.models.tiny import SPECIALS, make_tiny_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(SPECIALS))
    parser.add_argument("--out", required=True, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=seed_argument, default=0, help="weight initialisation seed")
    parser.add_argument(
        "--shard-bytes", type=int, default=2**30, help="max bytes per safetensors shard (small values shard)"
    )
    args = parser.parse_args(argv)
    if args.shard_bytes < 1:
        parser.error(f"--shard-bytes={args.shard_bytes} must be >= 1")
    try:
        make_out_folder(args.out)
    except ValueError as error:
        parser.error(str(error))
    folder = make_tiny_checkpoint(args.family, args.out, seed=args.seed, max_shard_bytes=args.shard_bytes)
    print(folder)


if __name__ == "__main__":
    main()
