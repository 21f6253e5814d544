""".github/workflows/ci.yml: a fork's CI runs `make test` on every supported Python, and against the pinned container.

The container is started in a step, not as a job service, because a service container cannot be given a
command and so cannot run JetStream; the job then waits, boundedly, for its health check, and points the
tests at it with NATS_URL. Its image is the one docker-compose.yml pins.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
PYTHONS = ["3.11", "3.12", "3.13"]
BUDGET_MINUTES = 90


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


@pytest.fixture(scope="module")
def jobs(workflow) -> dict[str, dict]:
    return workflow["jobs"]


@pytest.fixture(scope="module")
def compose_image() -> str:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose["services"]["nats"]["image"]


def runs(job: dict) -> list[str]:
    """The shell commands of a job's steps, one line each."""
    return [line.strip() for step in job.get("steps", []) for line in step.get("run", "").splitlines()]


def uses(job: dict) -> list[str]:
    """The actions a job's steps use, without their versions."""
    return [step["uses"].split("@")[0] for step in job.get("steps", []) if "uses" in step]


def docker_runs(job: dict) -> list[list[str]]:
    """The words of each `docker run` command in a job's steps."""
    return [shlex.split(line) for line in runs(job) if line.startswith("docker run")]


def container_job(jobs: dict[str, dict]) -> tuple[str, dict]:
    found = [(name, job) for name, job in jobs.items() if docker_runs(job)]
    assert len(found) == 1, f"want one job that starts the nats container, found {[name for name, _ in found]}"
    return found[0]


def step_index(job: dict, text: str) -> int:
    found = [i for i, step in enumerate(job["steps"]) if text in step.get("run", "")]
    assert found, f"no step runs {text!r}"
    return found[0]


def test_it_runs_on_pushes_and_pull_requests(workflow):
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true

    assert {"push", "pull_request"} <= set(triggers)


def test_the_matrix_covers_every_supported_python(jobs):
    matrices = {name: job["strategy"]["matrix"] for name, job in jobs.items() if "strategy" in job}
    versions = {name: matrix.get("python-version") for name, matrix in matrices.items()}
    [(name, pythons)] = [(name, v) for name, v in versions.items() if v]
    job = jobs[name]

    assert pythons == PYTHONS, f"the matrix of {name} lists {pythons!r}: quote them, or 3.10 would read as 3.1"
    assert job["runs-on"] == "ubuntu-latest"
    assert uses(job)[:2] == ["actions/checkout", "actions/setup-python"]
    setup = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["python-version"] == "${{ matrix.python-version }}"
    assert "make test" in runs(job)


def test_every_job_stops_within_the_budget(jobs):
    for name, job in jobs.items():
        assert job.get("timeout-minutes", 360) <= BUDGET_MINUTES, f"job {name} may run past {BUDGET_MINUTES} minutes"


def test_the_container_job_starts_the_pinned_image_with_jetstream_in_a_step(jobs, compose_image):
    name, job = container_job(jobs)
    [words] = docker_runs(job)

    assert "services" not in job, f"job {name} uses services:, whose container cannot be given --jetstream"
    assert compose_image in words, f"job {name} runs {words}, not docker-compose.yml's image {compose_image}"
    after_image = words[words.index(compose_image) + 1 :]
    assert {"--jetstream", "-js"} & set(after_image), f"job {name} starts the server without JetStream: {words}"
    assert "4222:4222" in words, f"job {name} does not publish the client port 4222: {words}"


def test_the_container_job_waits_for_health_then_points_the_tests_at_it(jobs):
    name, job = container_job(jobs)
    started, healthy, tested = step_index(job, "docker run"), step_index(job, "healthz"), step_index(job, "make test")
    wait = job["steps"][healthy]["run"]
    nats_url = {**job.get("env", {}), **job["steps"][tested].get("env", {})}.get("NATS_URL")

    assert started < healthy < tested, f"job {name} should start the server, wait for its health, then test"
    assert "for " in wait and "exit 1" in wait, f"job {name} waits for the health check without a bounded loop"
    assert nats_url == "nats://localhost:4222", f"job {name} sets NATS_URL to {nats_url!r}"
