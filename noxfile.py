"""Automation: ``nox -s tests`` is the test command README and CI use."""

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint"]

PYPROJECT = nox.project.load_toml("pyproject.toml")


def _install(session: nox.Session, *groups: str) -> None:
    session.install("-e", ".")
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite: embedded transport, RabbitMQ and Redis."""
    _install(session, "test")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def cluster(session: nox.Session) -> None:
    """The fault tests on a test cluster of real hosts (tests/netcluster.py).

    Three nodes, each in a network namespace of its own, reach RabbitMQ and
    Redis over a bridge; each test injects one fault while a search runs.
    Needs root, iproute2 and rabbitmqctl, and RabbitMQ and Redis on
    127.0.0.1 (as ``tests``). ``nox -s tests`` runs these too.
    """
    _install(session, "test")
    session.run("python", "-m", "pytest", "-m", "cluster", *session.posargs)


@nox.session(venv_backend="none")
def smoke(session: nox.Session) -> None:
    """Install like a user: the wheel into a bare venv (no test dependencies),
    two nodes per broker from its CLI, a search over RabbitMQ with Redis
    results and over Redis alone (.ci/install_smoke.sh; CI runs it)."""
    session.run("bash", ".ci/install_smoke.sh", external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check, then mypy on the package (its settings: pyproject.toml)."""
    # mypy follows the package's imports into its dependencies (numpy's and
    # kombu's types): the package is installed too.
    _install(session, "lint")
    session.run("ruff", "check", "clustersearch", "tests", "examples", "benchmarks", "noxfile.py")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """The docs site: Sphinx (numpydoc, PyData theme, MyST), warnings as
    errors, into docs/_build/html."""
    _install(session, "docs")
    session.run(
        "sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html",
        *session.posargs,
    )


@nox.session
def example(session: nox.Session) -> None:
    """The Adult demo on the embedded local cluster."""
    _install(session)
    session.run("python", "examples/adult_grid_search.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Adult grid search: loky vs clustersearch (embedded, RabbitMQ, Redis) vs
    joblib's dask and Ray backends; writes docs/benchmarks.md."""
    _install(session)
    session.install("redis>=5", "distributed", "ray[default]")
    args = session.posargs or [
        "--json", "benchmarks/results/latest.json", "--markdown", "docs/benchmarks.md"
    ]
    session.run("python", "benchmarks/bench_search.py", *args)
    # The Pine64 model from the full grid's measured fit times once
    # `nox -s bench_full` has run (else it samples fit times itself).
    model = ["--markdown", "docs/benchmarks.md"]
    if os.path.exists("benchmarks/results/full_grid.json"):
        model += ["--fit-times", "benchmarks/results/full_grid.json"]
    session.run("python", "benchmarks/pine64_model.py", *model)
    session.run("python", "benchmarks/bench_forest.py", "--markdown", "docs/benchmarks.md")


@nox.session
def bench_full(session: nox.Session) -> None:
    """The original job whole (long: an hour or more on 2 cores): the
    3,360-candidate Adult grid and halving on it (bench_full_grid.py), then
    the Pine64 model from that run's own fit times; writes docs/benchmarks.md."""
    _install(session)
    result = "benchmarks/results/full_grid.json"
    session.run("python", "benchmarks/bench_full_grid.py", "--json", result,
                "--markdown", "docs/benchmarks.md", *session.posargs)  # fmt: skip
    session.run("python", "benchmarks/pine64_model.py", "--fit-times", result,
                "--markdown", "docs/benchmarks.md")  # fmt: skip
