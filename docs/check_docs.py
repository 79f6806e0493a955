"""Check that README.md and docs/*.md point at things that exist.

- relative links ``[text](path)`` resolve to files;
- paths written in code (``examples/x.py``, ``quantkit/x.py``, ``docs/x.md``) exist;
- every ``quantkit <command> [<sub>] --option`` line uses a real command and real options;
- ``python`` code blocks compile, and ``from quantkit... import names`` import.

    python docs/check_docs.py           # exit 1 with one line per problem
    python docs/check_docs.py --strict  # also: every command and option appears in docs/cli.md
"""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w/.-])((?:examples|quantkit|docs|tests)/[\w./-]+\.(?:py|toml|md))")
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
IMPORT = re.compile(r"^\s*from (quantkit[\w.]*) import (?:\(([^)]*)\)|([^\n]+))", re.M)


def commands() -> dict[str, set[str]]:
    """``"quantize"`` / ``"recipe check"`` → its option strings."""
    import typer

    from quantkit.cli import app

    found: dict[str, set[str]] = {}

    def walk(cmd: Any, prefix: str) -> None:  # a click command (typer may vendor click)
        opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        found[prefix.strip()] = opts
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{prefix} {name}")

    walk(typer.main.get_command(app), "")
    return found


def check_command(line: str, known: dict[str, set[str]]) -> str | None:
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    if "quantkit" not in words:
        return None
    words = words[words.index("quantkit") + 1:]
    if not words or not re.fullmatch(r"[a-z][a-z-]*", words[0]):
        return None  # `quantkit …`, `quantkit --help`: nothing to check
    name = words[0]
    if len(words) > 1 and f"{name} {words[1]}" in known:
        name = f"{name} {words[1]}"
    if name not in known:
        return f"unknown command `quantkit {name}`"
    for w in words:
        opt = w.split("=", 1)[0]
        if opt.startswith("-") and opt not in known[name] and opt != "-":
            return f"`quantkit {name}` has no option {opt}"
    return None


def check(path: Path, known: dict[str, set[str]]) -> list[str]:
    text = path.read_text()
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#", 1)[0]).exists():
            problems.append(f"{rel}: link to missing {target}")
    for target in PATH.findall(text):
        if not (ROOT / target).exists():
            problems.append(f"{rel}: mentions missing file {target}")
    for lang, body in FENCE.findall(text):
        if lang in ("bash", "sh", "console", ""):
            for line in body.replace("\\\n", " ").splitlines():
                problem = check_command(line.lstrip("$ "), known)
                if problem:
                    problems.append(f"{rel}: {problem}")
        if lang == "python":
            try:
                compile(body, f"{rel} code block", "exec")
            except SyntaxError as exc:
                problems.append(f"{rel}: python block does not compile ({exc})")
    for code in re.findall(r"`(quantkit [^`\n]*)`", text):  # inline commands
        problem = check_command(code, known)
        if problem:
            problems.append(f"{rel}: {problem}")
    for module, wrapped, inline in IMPORT.findall(text):
        mod = importlib.import_module(module)
        for name in (n.strip() for n in (wrapped or inline).replace("\n", ",").split(",")):
            if name and not hasattr(mod, name):
                problems.append(f"{rel}: {module} has no {name}")
    return problems


def undocumented(known: dict[str, set[str]], page: Path = ROOT / "docs" / "cli.md") -> list[str]:
    """Commands and options that ``page`` never mentions."""
    text = page.read_text()
    missing = []
    for name, opts in sorted(known.items()):
        if not name:
            continue
        if f"quantkit {name}" not in text:
            missing.append(f"docs/cli.md: command `quantkit {name}` is not documented")
        for opt in sorted(opts - {"--help"}):
            if opt.startswith("--no-") and "--" + opt[5:] in opts:
                continue  # the off switch of a documented flag
            if opt.startswith("--") and not re.search(re.escape(opt) + r"(?![\w-])", text):
                missing.append(f"docs/cli.md: option {opt} of `quantkit {name}` is not documented")
    return missing


def main() -> int:
    sys.path.insert(0, str(ROOT))
    known = commands()
    problems = [p for f in FILES for p in check(f, known)]
    if "--strict" in sys.argv[1:]:
        problems += undocumented(known)
    for p in problems:
        print(p)
    print(f"checked {len(FILES)} files: {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
