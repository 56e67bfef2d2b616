"""Every ``ddpm ...`` command line shown to a user parses: the worked examples of ``ddpm <command> --help``, and the
commands in the shell blocks of README.md and docs/*.md (a command named in prose, like `ddpm train`, is a name).

Parsing is what can be checked here for all of them (many need a bucket or a cluster to run); it catches the
example that lacks a required flag, names a flag that was renamed, or submits a command that cannot run. The
examples that run end to end on this machine are run by their own tests (the pyfunc block of docs/training.md in
tests/pipelines/test_registry.py, the quickstart in tests/pipelines/test_quickstart.py).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from pipelines.cli import SUBCOMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_lines(text: str) -> list[str]:
    """The ``ddpm ...`` commands in ``text``: backslash continuations joined, comments and env prefixes dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip().lstrip("$ ").strip("`")
        line = re.sub(r"^(?:[A-Z_]+=\S*\s+)+", "", line)  # DDPM_API_KEY=change-me ddpm serve ...
        if line.startswith("ddpm ") and "<" not in line and "..." not in line:
            words = shlex.split(line, comments=True)
            if len(words) > 1 and words[1] in SUBCOMMANDS and "|" not in words:
                found.append(shlex.join(words))
    return found


def help_examples() -> list[tuple[str, str]]:
    out = []
    for name in SUBCOMMANDS:
        with contextlib.redirect_stdout(io.StringIO()) as text, pytest.raises(SystemExit):
            main([name, "--help"])
        # The worked examples are the epilog's indented lines; prose that mentions a command is not one.
        indented = "\n".join(line for line in re.sub(r"\\\n\s*", " ", text.getvalue()).splitlines()
                             if line.startswith("  ") and not line.lstrip().startswith("-"))
        out += [(f"ddpm {name} --help", line) for line in command_lines(indented)]
    return out


def shell_blocks(markdown: str) -> list[str]:
    """The bodies of the fenced code blocks in shell (or no) language, fences matched in order."""
    blocks, current, language = [], None, ""
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current, language = [], line.strip().strip("`").strip()
            else:
                if language in ("", "bash", "sh", "shell", "console"):
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def doc_examples() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        name, text = doc.relative_to(ROOT).as_posix(), doc.read_text()
        for block in shell_blocks(text):
            out += [(name, line) for line in command_lines(block)]
    return out


def parse(line: str) -> None:
    """Parse a ``ddpm`` command line as the CLI would; a usage error fails with argparse's message."""
    words = shlex.split(line)[1:]
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            build_parser(only=words[0]).parse_args([w for w in words if w != "--verbose"])
    except SystemExit as exc:
        assert not exc.code, f"{line}\n{said.getvalue().strip().splitlines()[-1]}"
    if words[0] == "submit" and "--" in words:
        from pipelines.commands.submit import check_command

        check_command(words[words.index("--") + 1:])


@pytest.mark.parametrize("where, line", help_examples() + doc_examples())
def test_documented_command_parses(where, line):
    parse(line)


def test_the_examples_were_found():
    """The scan above is not vacuous: every command's --help shows at least one example it parses."""
    shown = {shlex.split(line)[1] for _, line in help_examples()}
    assert set(SUBCOMMANDS) - shown == set()
    assert len(doc_examples()) >= 20
