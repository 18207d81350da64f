"""The README's Quick start is what CI runs: keep the two from drifting apart."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("pip install")]
    assert len(ci_command) == 1
    readme = (ROOT / "README.md").read_text()
    assert ci_command[0] in readme, f"README.md Quick start lacks CI's command: {ci_command[0]}"
    assert "torch==2.13.0" in ci_command[0]
