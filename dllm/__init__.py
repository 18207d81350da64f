"""dllm-cache-bench: training-free KV-cache methods for diffusion LMs, measured for accuracy and speed."""
from pathlib import Path

#: The checkout the package runs from (editable install): git metadata, committed assets.
REPO_ROOT = Path(__file__).resolve().parents[1]
