"""Developer sessions. ``nox`` builds a fresh virtualenv per session (``pip install -e '.[dev]'``,
needs the package index once); ``nox --no-venv --no-install -s lint`` runs in the current
environment instead (offline).

    nox -s tests       # the README's test command: python -m pytest -q
    nox -s lint        # ruff on quantkit/ tests/ examples/ benchmarks/
    nox -s typecheck   # mypy on quantkit/
    nox -s examples    # run every script in examples/ on ../shared/models/stories260K
    nox -s docs        # docs/ and README reference existing commands, options and files,
                       # and docs/cli.md documents every command and option
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.sessions = ["lint", "typecheck", "tests", "docs"]
nox.options.reuse_venv = "yes"


def _install(session: nox.Session) -> None:
    if session.venv_backend != "none":
        session.install("-e", ".[dev]")


@nox.session
def tests(session: nox.Session) -> None:
    _install(session)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    _install(session)
    paths = [p for p in ("quantkit", "tests", "examples", "benchmarks", "noxfile.py", "docs")
             if (ROOT / p).exists()]
    session.run("ruff", "check", *paths)


@nox.session
def typecheck(session: nox.Session) -> None:
    _install(session)
    session.run("mypy", "quantkit")


@nox.session
def examples(session: nox.Session) -> None:
    _install(session)
    for script in sorted((ROOT / "examples").glob("*.py")):
        if not script.name.startswith("_"):
            session.run("python", str(script.relative_to(ROOT)), *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    _install(session)
    session.run("python", "docs/check_docs.py", "--strict")
