"""CI runs the README's test command; a README edit must not leave it empty or stale."""
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_finds_the_readme_test_command():
    printed = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True,
                             check=True).stdout.strip()
    readme = (ROOT / "README.md").read_text().splitlines()
    marker = readme.index("<!-- test-command -->")
    assert readme[marker + 1].startswith("```")
    assert printed == readme[marker + 2].strip()
    assert "pytest" in printed
