"""Entry point: compose the Hydra config and hand it to the pipeline."""
import os
import re
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

# A run folder is <time>-<overrides>, or <time> alone when there are none (no trailing dash).
OmegaConf.register_new_resolver("dllm.dash", lambda text: f"-{text}" if text else "", replace=True)

FREE_TEXT_KEYS = ("prompt=",)
# These print the config or help and run nothing, so the overrides are not checked first: `--cfg job
# +experiment=published` shows the experiment even on a model without published settings.
INSPECT_FLAGS = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help")


def quote_free_text(argv: list[str]) -> list[str]:
    """Let `prompt="1+1="` through: Hydra's override grammar rejects '=', ':' etc. unquoted."""
    quoted = []
    for arg in argv:
        key = next((k for k in FREE_TEXT_KEYS if arg.startswith(k)), None)
        value = arg[len(key):] if key else ""
        if key and not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
            # Literal text. OmegaConf reads "${" as an interpolation unless escaped as "\${" (the backslashes
            # before it doubled); Hydra's quoted string reads backslashes only before a quote (its
            # closing one included), doubled there, and the quote itself as \'.
            value = re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", value)
            value = re.sub(r"(\\*)('|\Z)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value)
            arg = key + "'" + value + "'"
        quoted.append(arg)
    return quoted


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from dllm.pipeline import run

    try:
        run(cfg)
    except ValueError as err:  # a setting, checkpoint or results file refused: one line, no traceback
        if cfg.get("debug") is True or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}\n(debug=true or HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv = quote_free_text(sys.argv)
    from dllm.overrides import unknown_key_message

    args = sys.argv[1:]
    checked = os.environ.get("HYDRA_FULL_ERROR") != "1" and not any(a.split("=")[0] in INSPECT_FLAGS for a in args)
    message = unknown_key_message(args) if checked else None
    # A sweep run here (not on SLURM nodes, whose devices this machine may not have) checks every job
    # before the first one runs.
    in_process = not any(a.startswith("hydra/launcher=slurm") for a in args)
    if checked and not message and in_process and any(a in ("-m", "--multirun") for a in args):
        from dllm.overrides import refused_job_message

        message = refused_job_message(args)
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    main()
