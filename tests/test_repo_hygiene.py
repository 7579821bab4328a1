"""The repository speaks of the project alone: no product file (everything outside tests/) refers to
the project's own issue tracker or to how the work was organised ("issue 13", "issue-4 bar", "#13",
"the reviewer's", "GPU lease", run directories named after issues such as runs/i13_*). Say what was
measured and why instead. References to other public projects' trackers are fine in the forms
`owner/repo issue N` and `owner/repo#N`."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt"}
SKIPPED_DIRS = {".git", ".venv", "tests", "__pycache__", ".pytest_cache", ".ruff_cache"}

FORBIDDEN = re.compile(
    r"\bissues?[ -]?#?\d+"  # issue 13, issue-4, issue13, issues 3, issue #13
    r"|(?<![^\s(\[])#\d{1,4}\b"  # a bare tracker number: "#13" (not a quoted colour "#333", not png#1)
    r"|\bruns/i\d"  # run directories named after an issue: runs/i13_final, runs/i13/
    r"|\breviewer"  # who asked for what belongs in the tracker, not the repo
    r"|\bGPU lease|\bno GPU was lent|\bwhen the issue was",
    re.IGNORECASE,
)
# Other public projects whose trackers the docs may cite, as `owner/repo issue N` or `owner/repo#N`
# (Flow-GRPO's upstream, whose issues explain some of its defaults). Add a repository here only to cite it.
OTHER_PROJECTS = ("yifan123/flow_grpo",)
CITED = re.compile(r"(?:^|[\s(\[`])(?:" + "|".join(map(re.escape, OTHER_PROJECTS)) + r")[\s`]*$", re.IGNORECASE)


def product_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (so runs/, data/ and the venv never count), falling
    back to a walk of the tree outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        paths = [ROOT / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in ROOT.rglob("*") if p.is_file()]
    return sorted(
        p
        for p in paths
        if p.suffix in SUFFIXES and p.is_file() and not SKIPPED_DIRS.intersection(p.relative_to(ROOT).parts)
    )


def offences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every forbidden phrase not citing one of OTHER_PROJECTS."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in FORBIDDEN.finditer(line):
            if match.group(0)[0] in "iI#" and CITED.search(line[: match.start()]):
                continue
            found.append((number, line.strip()))
            break
    return found


def test_offences_recognise_own_references_and_allow_other_projects():
    own = [
        "fixed in issue 13",
        "the issue-4 bar",
        "see issue13",
        "(#13)",
        "runs/i13_final/digits28",
        "runs/i13/seed28",
        "the reviewer's numbers",
        "Prepared for the next GPU lease",
        "No GPU was lent to this",
        "measured when the issue was filed",
        "Issues 3 and 5",
    ]
    for line in own:
        assert offences(line), line
    fine = [
        "yifan123/flow_grpo issue 233 explains it",
        "(yifan123/flow_grpo#233)",
        "`yifan123/flow_grpo` issue 9",
        'color="#333"',
        "png#1",
        "runs/imagenet",
        "an issue with the cache",
        "released",
    ]
    for line in fine:
        assert not offences(line), line
    assert offences("experiments/digits.md issue 13")  # a path is not another project


def test_product_files_hold_no_process_talk():
    files = product_files()
    assert any(p.name == "README.md" for p in files), "the file list is empty: the walk is broken"
    bad = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        bad += [f"{path.relative_to(ROOT)}:{number}: {line}" for number, line in offences(text)]
    assert not bad, (
        "the project's own issue numbers or process talk in product files (say what was "
        "measured and why instead):\n" + "\n".join(bad)
    )
