"""Write the learners' copies of the notebooks: no outputs, and each solution replaced by a stub saying what to write.

    python tools/handout.py --out build/handout notebooks/[0-9][0-9]-*.ipynb
    python tools/handout.py --keep-solutions --out build/solutions notebooks/[0-9][0-9]-*.ipynb

Every code cell loses its outputs, its execution count and its execution metadata. A cell tagged `solution`
becomes a cell of comments only, in the same place and with the same tags, so the exercise and its check keep
their positions: the solution's leading comment lines (the instruction it begins with), or, if it has none,
the leading comment lines of the exercise cell before it, then a line pointing to the exercise cell and the
check. With --keep-solutions the solutions stay as they are: the facilitator's copy.

Before writing anything, every notebook is checked: each cell tagged `exercise` must be followed within
three cells by a cell tagged `check`, and each solution must have an instruction to turn into a stub.
Running it twice gives the same files.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

EXERCISE, SOLUTION, CHECK = "exercise", "solution", "check"
CHECK_WITHIN = 3
POINTER = "# Write your answer in the exercise cell above, then run the check below."
CELL_METADATA_DROPPED = ("execution", "ExecuteTime")
YOUR_CODE_HERE = re.compile(r"^#\s*your code here\s*:\s*", re.IGNORECASE)


class HandoutError(Exception):
    """A notebook does not follow the exercise convention, so no handout can be written for it."""


@dataclass
class Handout:
    """One notebook ready to write, and what was done to it."""

    source: Path
    notebook: nbformat.NotebookNode
    exercises: int
    stubs: int


def tags(cell: nbformat.NotebookNode) -> list[str]:
    """The cell's tags, or an empty list."""
    return list(cell.get("metadata", {}).get("tags", []))


def leading_comments(source: str) -> list[str]:
    """The comment lines a cell begins with (blank lines before them are skipped), without trailing spaces."""
    comments: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if not stripped and not comments:
            continue
        if not stripped.startswith("#"):
            break
        comments.append(stripped)
    return comments


def as_instruction(exercise_comments: list[str]) -> list[str]:
    """An exercise's comment lines as an instruction: '# Your code here: create X' becomes '# Create X'."""
    if not exercise_comments:
        return []
    first, *rest = exercise_comments
    body = YOUR_CODE_HERE.sub("", first, count=1)
    if body != first:
        first = "# " + body[:1].upper() + body[1:]
    return [first, *rest]


def stub_source(cells: list[nbformat.NotebookNode], index: int, where: str) -> str:
    """The comments that replace the solution cell at `index`: what to write, and where."""
    instruction = leading_comments(cells[index].source)
    if not instruction:
        exercise = next((cells[i] for i in range(index - 1, -1, -1) if EXERCISE in tags(cells[i])), None)
        instruction = as_instruction(leading_comments(exercise.source)) if exercise is not None else []
    if not instruction:
        raise HandoutError(
            f"{where}: the solution in cell {index} begins with no comment saying what to write, and no exercise "
            "cell before it has one: start the solution with comment lines such as '# Create the stream ORDERS ...'"
        )
    return "\n".join([*instruction, POINTER])


def check_exercises(cells: list[nbformat.NotebookNode], where: str) -> int:
    """Raise HandoutError unless every exercise is followed within three cells by a check; return the count."""
    exercises = [i for i, cell in enumerate(cells) if EXERCISE in tags(cell)]
    for i in exercises:
        if not any(CHECK in tags(cell) for cell in cells[i + 1 : i + 1 + CHECK_WITHIN]):
            first_line = next(iter(cells[i].source.splitlines()), "")
            raise HandoutError(
                f"{where}: the exercise in cell {i} ({first_line!r}) is not followed within {CHECK_WITHIN} cells "
                f"by a cell tagged '{CHECK}': add a check cell that tests the answer, or fix the tags"
            )
    return len(exercises)


def clear(cell: nbformat.NotebookNode) -> None:
    """Remove what running the cell left behind: outputs, execution count, execution metadata."""
    for key in CELL_METADATA_DROPPED:
        cell.metadata.pop(key, None)
    if cell.cell_type == "code":
        cell.outputs = []
        cell.execution_count = None


def prepare(path: Path, keep_solutions: bool) -> Handout:
    """Read one notebook and make its handout, or raise HandoutError saying what is wrong with it."""
    where = str(path)
    try:
        notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    except (OSError, ValueError) as exc:
        raise HandoutError(f"{where}: cannot read it as a notebook: {exc}") from exc
    if notebook.nbformat != 4:
        notebook = nbformat.convert(notebook, 4)
    cells = notebook.cells
    exercises = check_exercises(cells, where)
    stubs = 0
    for index, cell in enumerate(cells):
        clear(cell)
        if SOLUTION in tags(cell) and not keep_solutions:
            cell.source = stub_source(cells, index, where)
            stubs += 1
    return Handout(source=path, notebook=notebook, exercises=exercises, stubs=stubs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help="the notebooks to copy, e.g. notebooks/01-*.ipynb")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the copies to (created)")
    parser.add_argument("--keep-solutions", action="store_true", help="keep the solutions: the facilitator's copy")
    args = parser.parse_args(argv)

    out: Path = args.out
    try:
        handouts = [prepare(path, args.keep_solutions) for path in args.notebooks]
        names = [h.source.name for h in handouts]
        if len(set(names)) != len(names):
            raise HandoutError(f"two notebooks share a file name, so one copy would overwrite the other: {names}")
        for handout in handouts:
            if (out / handout.source.name).resolve() == handout.source.resolve():
                raise HandoutError(
                    f"{handout.source}: --out would overwrite the notebook itself; choose another folder"
                )
    except HandoutError as exc:
        print(f"handout: {exc}", file=sys.stderr)
        return 1

    out.mkdir(parents=True, exist_ok=True)
    for handout in handouts:
        nbformat.validate(handout.notebook)
        target = out / handout.source.name
        nbformat.write(handout.notebook, target)
        done = "solutions kept" if args.keep_solutions else f"{handout.stubs} solution(s) replaced by stubs"
        print(f"wrote {target}: {handout.exercises} exercise(s), {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
