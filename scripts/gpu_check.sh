#!/usr/bin/env bash
# The one-shot GPU check (scripts/gpu_check.py): every cache method, eager and compiled, on 8B-shaped
# random-weight LLaDA and Dream, in under 8 minutes on one GPU. Arguments pass through, e.g.
#   scripts/gpu_check.sh                          # writes outputs/gpu_check/gpu_check.{json,md}
#   scripts/gpu_check.sh --tiny --out /tmp/gc     # tiny shapes on CPU (CI)
# Python: $PYTHON, else the repository's .venv, else python3 on PATH. Exits with the check's status:
# 0 passed, 1 a check failed, 2 bad arguments, anything else a crash (3: the script raised).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $root/.venv/bin/python ]]; then python=$root/.venv/bin/python; else python=python3; fi
fi
out=outputs/gpu_check  # the .py's default; the last --out given wins, as with argparse
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        --out) out=${args[i + 1]:-$out} ;;
        --out=*) out=${args[i]#--out=} ;;
    esac
done
# Outputs newer than this stamp are this run's: a crash may leave an earlier run's in place.
stamp=$(mktemp)
trap 'rm -f "$stamp"' EXIT
status=0
"$python" "$root/scripts/gpu_check.py" "$@" || status=$?
outputs="$out/gpu_check.json, $out/gpu_check.md"
written=0
if [[ $out/gpu_check.json -nt $stamp && $out/gpu_check.md -nt $stamp ]]; then written=1; fi
if ((status == 2)); then
    echo "gpu_check: bad arguments, nothing run" >&2
elif ((status <= 1 && written)); then  # an exit 1 without outputs is a crash (e.g. an import error)
    verdict=$( ((status == 0)) && echo passed || echo FAILED)
    echo "gpu_check: $verdict; outputs: $outputs"
elif ((written)); then
    echo "gpu_check: crashed (exit $status) after writing its outputs: $outputs" >&2
else
    echo "gpu_check: crashed (exit $status); no outputs written" >&2
fi
exit "$status"
