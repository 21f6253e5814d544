"""Every check fails, in plain words, on a wrong answer: each learner's copy is run as a learner first opens it.

nbval runs the committed notebooks, whose solutions are filled in, so it proves that every exercise can be
solved and that its check accepts a right answer. It cannot see a check that accepts anything: such a check
tells a learner who wrote nothing, or the wrong thing, that they got it right. So each notebook with checks
is made into its handout (tools/handout.py: solutions replaced by stubs, the exercise cells left as their
placeholders) and run top to bottom in a kernel of its own against the run's server, errors allowed. Every
`check` cell must then fail with an AssertionError that says in words what is wrong, and every other cell
must still run (cells tagged `raises-exception` excepted): a learner who skips an exercise can still read
on, and the cleanup cell copes with answers never given.

It is slow, since each notebook with checks runs once more, and it is kept in the default run on purpose:
a check that cannot fail looks exactly like a check that works, in every other test. A notebook with no
`check` cells is skipped, and says so.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]-*.ipynb"))
HANDOUT = ROOT / "tools" / "handout.py"
CELL_TIMEOUT = 180  # seconds a cell may run: the 120 s nbval allows, and room for a busy machine
KERNEL_STARTUP_TIMEOUT = 120
CHECK = "check"
WORD = re.compile(r"[A-Za-z]{2,}")


def tags(cell: nbformat.NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def errors(cell: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [output for output in cell.get("outputs", []) if output.get("output_type") == "error"]


def plain_words(message: str) -> bool:
    """A message a learner can act on: at least three words, not a traceback or a bare value."""
    return len(WORD.findall(message)) >= 3 and "Traceback" not in message


def first_line(cell: nbformat.NotebookNode) -> str:
    return next(iter(cell.source.splitlines()), "")


def make_handout(notebook: Path, out: Path) -> nbformat.NotebookNode:
    """The learner's copy of one notebook, written by tools/handout.py as `make handout` does."""
    result = subprocess.run(
        [sys.executable, str(HANDOUT), "--out", str(out), str(notebook)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"tools/handout.py failed on {notebook.name}:\n{result.stdout}{result.stderr}"
    return nbformat.read(out / notebook.name, as_version=4)


def problems_in(executed: nbformat.NotebookNode) -> list[str]:
    """What is wrong with a run of a handout: checks that passed or failed badly, other cells that errored."""
    problems = []
    for index, cell in enumerate(executed.cells):
        if cell.cell_type != "code":
            continue
        cell_errors = errors(cell)
        where = f"cell {index} ({first_line(cell)!r})"
        if CHECK in tags(cell):
            if not cell_errors:
                problems.append(f"the check in {where} passed with its exercise unanswered: it cannot fail")
                continue
            error = cell_errors[0]
            if error.ename != "AssertionError":
                problems.append(f"the check in {where} failed with {error.ename}: {error.evalue}, not AssertionError")
            elif not plain_words(error.evalue):
                problems.append(f"the check in {where} failed with the message {error.evalue!r}, not plain words")
        elif cell_errors and "raises-exception" not in tags(cell):
            error = cell_errors[0]
            problems.append(f"{where} raised {error.ename}: {error.evalue}")
    return problems


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_every_check_fails_on_an_unanswered_exercise(notebook, tmp_path):
    original = nbformat.read(notebook, as_version=4)
    checks = [cell for cell in original.cells if CHECK in tags(cell)]
    if not checks:
        pytest.skip(f"{notebook.name} has no cells tagged '{CHECK}' yet, so there is no check to prove")
    handout = make_handout(notebook, tmp_path / "handout")

    client = NotebookClient(
        handout,
        timeout=CELL_TIMEOUT,
        startup_timeout=KERNEL_STARTUP_TIMEOUT,
        allow_errors=True,
        record_timing=False,
        kernel_name=handout.metadata.get("kernelspec", {}).get("name", "python3"),
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    # The kernel gets this process's environment, so NATS_URL names the run's server (set in conftest.py).
    executed = client.execute(env=dict(os.environ))

    assert sum(CHECK in tags(cell) for cell in executed.cells) == len(checks), "the handout lost some checks"
    problems = problems_in(executed)
    assert not problems, f"{notebook.name}, run as handed out:\n" + "\n".join(problems)


def ran(source: str, cell_tags: list[str], error: tuple[str, str] | None) -> nbformat.NotebookNode:
    """A code cell as a run leaves it: with an error output, or with none."""
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": cell_tags})
    if error is not None:
        cell.outputs = [nbformat.v4.new_output("error", ename=error[0], evalue=error[1], traceback=[])]
    return cell


def test_the_judge_names_each_kind_of_bad_run():
    executed = nbformat.v4.new_notebook(
        cells=[
            ran("assert True", [CHECK], None),
            ran("answer.x", [CHECK], ("NameError", "name 'answer' is not defined")),
            ran("assert answer", [CHECK], ("AssertionError", "")),
            ran("1 / 0", [], ("ZeroDivisionError", "division by zero")),
            ran("1 / 0", ["raises-exception"], ("ZeroDivisionError", "division by zero")),
            ran("assert answer", [CHECK], ("AssertionError", "answer is still None: keep the reply in answer")),
        ]
    )

    problems = problems_in(executed)

    assert len(problems) == 4, problems
    assert "cell 0 ('assert True') passed with its exercise unanswered" in problems[0]
    assert "NameError" in problems[1]
    assert "not plain words" in problems[2]
    assert problems[3] == "cell 3 ('1 / 0') raised ZeroDivisionError: division by zero"
