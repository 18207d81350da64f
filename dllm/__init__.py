"""dllm-cache-bench: training-free KV-cache methods for diffusion LMs, measured for accuracy and speed."""
from pathlib import Path

#: The checkout the package runs from (editable install): git metadata, committed assets.
REPO_ROOT = Path(__file__).resolve().parents[1]
#: Seeds are 0 ... SEED_BOUND - 1 in run.py and every script: lm-eval seeds numpy with the seed, which
#: takes no more (torch's generators take less than 2**64).
SEED_BOUND = 2**32


def seed_argument(text: str) -> int:
    """The ``type=`` of a script's ``--seed`` option: an integer from 0 to SEED_BOUND - 1."""
    from argparse import ArgumentTypeError

    try:
        seed = int(text)
    except ValueError:
        raise ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= seed < SEED_BOUND:
        raise ArgumentTypeError(f"{seed} must be from 0 to {SEED_BOUND - 1}")
    return seed


def _register_config_resolvers() -> None:
    """Interpolations the YAML presets use; registered on any import of the package, so that a
    config composed outside run.py (tests, notebooks) resolves the same. Without omegaconf there is
    no config to resolve: the models, cache methods and decoders run on torch alone, and so do
    scripts/bench.py and scripts/gpu_check.py (e.g. on a GPU image that has torch and nothing of ours)."""
    try:
        from omegaconf import OmegaConf
    except ModuleNotFoundError:
        return

    # `block_length: ${dllm.min:128,${gen_length}}`: a paper's block, or the whole response when shorter.
    OmegaConf.register_new_resolver("dllm.min", lambda *values: min(values), replace=True)


_register_config_resolvers()
