"""The README's Quick start is what CI runs: keep the two from drifting apart."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("pip install")]
    assert len(ci_command) == 1
    readme = (ROOT / "README.md").read_text()
    assert ci_command[0] in readme, f"README.md Quick start lacks CI's command: {ci_command[0]}"
    assert "torch==2.13.0" in ci_command[0]


def test_readme_commands_write_where_no_committed_result_lives():
    """A README command's results_csv / --out must not be a committed file or folder: on a fresh
    clone it would print "skip (exists)" or overwrite the reference copies (results/reference/)."""
    import re
    import subprocess

    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())
    readme = (ROOT / "README.md").read_text()
    targets = set(re.findall(r"results_csv=(\S+?)[`\s]", readme)) | set(re.findall(r"--out (\S+?)[`\s]", readme))
    assert {"results/example_runs.csv", "results/tiny_arith.csv", "results/tables", "results/figures"} <= targets
    for target in targets:
        assert not any(path == target or path.startswith(target.rstrip("/") + "/") for path in tracked), target
    assert any(path.startswith("results/reference/") for path in tracked)  # the reference copies are kept


def test_quick_start_says_what_its_commands_cost():
    """A new user knows what to expect on a small machine: install, default run and tests timed."""
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    import re

    assert re.search(r"install takes about \d+ minutes", quick_start)
    assert re.search(r"default run about \d+ seconds", quick_start)
    assert re.search(r"test suite about \d+ minutes", quick_start)
