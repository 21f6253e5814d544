"""tools/handout.py: the learners' copies hold no outputs and no solutions, and say what to write in their place.

The tool runs as `make handout` and `make solutions` run it, into a temporary folder. Every cell tagged
`solution` becomes a stub of comments: the solution's own instruction (its leading comment lines), or the
exercise's when the solution has none, and a pointer to the exercise cell and the check. Everything else,
exercises and checks included, is as committed, without outputs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "handout.py"
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]-*.ipynb"))
YOUR_CODE_HERE = re.compile(r"^#\s*your code here\s*:\s*", re.IGNORECASE)


def run_tool(*args: str | Path) -> subprocess.CompletedProcess:
    """tools/handout.py with this environment's Python, from the project root, as the Makefile runs it."""
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def tags(cell: nbformat.NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def leading_comments(source: str) -> list[str]:
    lines = source.strip().splitlines()
    comments = []
    for line in lines:
        if not line.strip().startswith("#"):
            break
        comments.append(line.strip())
    return comments


def code_lines(source: str) -> set[str]:
    """The lines of a cell that do something: not blank, not comments."""
    return {line.strip() for line in source.splitlines() if line.strip() and not line.strip().startswith("#")}


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


@pytest.fixture(scope="module")
def handout_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("handout") / "build" / "handout"
    result = run_tool("--out", out, *(path.relative_to(ROOT) for path in NOTEBOOKS))
    assert result.returncode == 0, f"tools/handout.py failed:\n{result.stdout}{result.stderr}"
    assert len(result.stdout.splitlines()) == len(NOTEBOOKS), f"not one line per notebook:\n{result.stdout}"
    return out


@pytest.fixture(scope="module")
def solutions_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("solutions") / "build" / "solutions"
    result = run_tool("--keep-solutions", "--out", out, *(path.relative_to(ROOT) for path in NOTEBOOKS))
    assert result.returncode == 0, f"tools/handout.py --keep-solutions failed:\n{result.stdout}{result.stderr}"
    return out


def both(notebook: Path, folder: Path) -> tuple[nbformat.NotebookNode, nbformat.NotebookNode]:
    """The committed notebook and its copy in folder."""
    copy = folder / notebook.name
    assert copy.exists(), f"no copy of {notebook.name} in {folder}"
    return nbformat.read(notebook, as_version=4), nbformat.read(copy, as_version=4)


by_notebook = pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])


def test_every_notebook_has_a_handout(handout_dir):
    committed = sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb"))

    assert sorted(path.name for path in handout_dir.glob("*.ipynb")) == committed


@by_notebook
@pytest.mark.parametrize("copy", ["handout", "solutions"])
def test_copies_are_valid_and_hold_no_outputs(notebook, copy, handout_dir, solutions_dir):
    _, copied = both(notebook, handout_dir if copy == "handout" else solutions_dir)

    nbformat.validate(copied)
    for index, cell in enumerate(copied.cells):
        assert "execution" not in cell.metadata, f"cell {index} keeps its execution metadata"
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {index} keeps its outputs"
            assert cell.execution_count is None, f"cell {index} keeps its execution count"


@by_notebook
def test_handout_keeps_every_cell_but_the_solutions(notebook, handout_dir):
    committed, handout = both(notebook, handout_dir)

    assert [c.cell_type for c in handout.cells] == [c.cell_type for c in committed.cells]
    assert [tags(c) for c in handout.cells] == [tags(c) for c in committed.cells]
    for index, (was, now) in enumerate(zip(committed.cells, handout.cells, strict=True)):
        if "solution" not in tags(was):
            assert now.source == was.source, f"cell {index} ({tags(was) or was.cell_type}) changed in the handout"
            assert now.get("id") == was.get("id"), f"cell {index} has a new id"


@by_notebook
def test_no_solution_code_remains(notebook, handout_dir):
    committed, handout = both(notebook, handout_dir)
    solutions = [cell for cell in committed.cells if "solution" in tags(cell)]
    elsewhere = set().union(*(code_lines(c.source) for c in committed.cells if "solution" not in tags(c)))
    in_handout = set().union(*(code_lines(c.source) for c in handout.cells))

    left = (set().union(*(code_lines(c.source) for c in solutions)) - elsewhere) & in_handout

    assert not left, f"solution code left in the handout of {notebook.name}: {sorted(left)}"


@by_notebook
def test_each_stub_says_what_to_write(notebook, handout_dir):
    committed, handout = both(notebook, handout_dir)

    for index, (was, now) in enumerate(zip(committed.cells, handout.cells, strict=True)):
        if "solution" not in tags(was):
            continue
        stub = now.source.splitlines()
        assert stub and all(line.startswith("#") for line in stub), f"the stub in cell {index} is not all comments"
        assert "exercise cell above" in stub[-1] and "check below" in stub[-1], f"cell {index}: {stub[-1]!r}"
        instruction = leading_comments(was.source)
        if instruction:
            assert stub[:-1] == instruction, f"the stub in cell {index} does not repeat the solution's instruction"
        else:
            exercise = next(c for c in reversed(committed.cells[:index]) if "exercise" in tags(c))
            asked = [YOUR_CODE_HERE.sub("", line) for line in leading_comments(exercise.source)]
            assert asked, f"neither the solution in cell {index} nor its exercise says what to write"
            assert words(" ".join(stub[:-1])) == words(" ".join(asked)), f"the stub in cell {index}: {stub}"


@by_notebook
def test_solutions_copy_keeps_the_solutions(notebook, solutions_dir):
    committed, solutions = both(notebook, solutions_dir)

    assert [c.source for c in solutions.cells] == [c.source for c in committed.cells]
    assert [tags(c) for c in solutions.cells] == [tags(c) for c in committed.cells]


# The tool on small notebooks of the test's own: the fallback, the errors, the output folder.


def write_notebook(path: Path, *cells: tuple[str, list[str]]) -> Path:
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(source, metadata={"tags": cell_tags}) for source, cell_tags in cells]
    )
    notebook.cells[0].outputs = [nbformat.v4.new_output("stream", text="hello\n")]
    notebook.cells[0].execution_count = 3
    notebook.cells[0].metadata["execution"] = {"iopub.status.idle": "2024-01-01T00:00:00Z"}
    nbformat.write(notebook, path)
    return path


def test_a_solution_without_an_instruction_gets_its_exercise_s(tmp_path):
    notebook = write_notebook(
        tmp_path / "01-small.ipynb",
        ("answer = None", []),
        ("# Your code here: keep the answer in answer.\nanswer = None", ["exercise"]),
        ("answer = 42", ["solution"]),
        ("assert answer == 42, 'answer is not 42'", ["check"]),
    )

    result = run_tool("--out", tmp_path / "out", notebook)

    assert result.returncode == 0, result.stderr
    stub = nbformat.read(tmp_path / "out" / "01-small.ipynb", as_version=4).cells[2]
    assert stub.source.splitlines() == [
        "# Keep the answer in answer.",
        "# Write your answer in the exercise cell above, then run the check below.",
    ]
    assert tags(stub) == ["solution"]


def test_an_exercise_without_a_check_is_refused(tmp_path):
    notebook = write_notebook(
        tmp_path / "01-small.ipynb",
        ("# Your code here: keep the answer in answer.\nanswer = None", ["exercise"]),
        ("# Keep 42 in answer.\nanswer = 42", ["solution"]),
        ("print(answer)", []),
        ("print(answer)", []),
        ("assert answer == 42, 'answer is not 42'", ["check"]),
    )

    result = run_tool("--out", tmp_path / "out", notebook)

    assert result.returncode != 0
    assert "01-small.ipynb" in result.stderr and "not followed within 3 cells" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists(), "a handout was written for a notebook that was refused"


def test_a_solution_nobody_describes_is_refused(tmp_path):
    notebook = write_notebook(
        tmp_path / "01-small.ipynb",
        ("answer = None", ["exercise"]),
        ("answer = 42", ["solution"]),
        ("assert answer == 42, 'answer is not 42'", ["check"]),
    )

    result = run_tool("--out", tmp_path / "out", notebook)

    assert result.returncode != 0
    assert "cell 1" in result.stderr and "comment" in result.stderr, result.stderr


def test_the_notebook_itself_is_never_overwritten(tmp_path):
    notebook = write_notebook(tmp_path / "01-small.ipynb", ("print('hello')", []))
    before = notebook.read_bytes()

    result = run_tool("--out", tmp_path, notebook)

    assert result.returncode != 0
    assert "overwrite" in result.stderr, result.stderr
    assert notebook.read_bytes() == before


def test_the_folder_is_created_and_a_second_run_writes_the_same(tmp_path):
    notebook = write_notebook(
        tmp_path / "01-small.ipynb",
        ("# Your code here: keep the answer in answer.\nanswer = None", ["exercise"]),
        ("# Keep 42 in answer.\nanswer = 42", ["solution"]),
        ("assert answer == 42, 'answer is not 42'", ["check"]),
    )
    out = tmp_path / "build" / "handout"

    first = run_tool("--out", out, notebook)
    written = (out / notebook.name).read_bytes()
    second = run_tool("--out", out, notebook)

    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.strip() == f"wrote {out / notebook.name}: 1 exercise(s), 1 solution(s) replaced by stubs"
    assert (out / notebook.name).read_bytes() == written
    assert nbformat.read(out / notebook.name, as_version=4).cells[0].outputs == []
