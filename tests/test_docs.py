"""The README and docs/ cannot drift from the repository or the command line.

Every relative link must resolve (to a file, and to a heading when it names an anchor); every
``qaconv ...`` and ``torchrun ... -m qaconv_ext ...`` line of a shell block must be accepted by the
``qaconv`` parser (which imports no PyTorch), and every command named in the prose must name a real
sub-command and real options (with valid choices).
"""
from __future__ import annotations

import argparse
import re
import shlex
import unicodedata
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from qaconv_ext.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
README_LINE_LIMIT = 250

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```(\w*)\s*$")
_INLINE = re.compile(r"`([^`]+)`")


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set:
    anchors, in_code = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def _prose_and_blocks(text: str) -> Tuple[str, List[Tuple[str, List[str]]]]:
    """The text outside fenced blocks, and the fenced blocks as (language, lines)."""
    prose, blocks, current = [], [], None
    for line in text.splitlines():
        fence = _FENCE.match(line)
        if fence and current is None:
            current = (fence.group(1), [])
        elif fence or (current is not None and line.strip() == "```"):
            blocks.append(current)
            current = None
        elif current is not None:
            current[1].append(line)
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def _links() -> Iterator[Tuple[Path, str]]:
    for doc in DOCS:
        prose, _ = _prose_and_blocks(doc.read_text(encoding="utf-8"))
        for target in _LINK.findall(prose):
            if not re.match(r"[a-z]+:", target):
                yield doc, target


def _shell_commands(lines: List[str]) -> Iterator[str]:
    """Shell lines joined over trailing backslashes, comments removed."""
    joined = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        yield joined + line
        joined = ""


def _qaconv_argv(command: str) -> List[str]:
    """The ``qaconv`` arguments of a command line, or [] when it runs something else."""
    words = shlex.split(command, comments=True)
    if words[:1] == ["qaconv"]:
        return words[1:] or ["--help"]
    if words[:1] == ["torchrun"] and "qaconv_ext" in words:
        return words[words.index("qaconv_ext") + 1:]
    return []


def _commands() -> Iterator[Tuple[Path, str]]:
    """Whole command lines: those of the shell blocks."""
    for doc in DOCS:
        _, blocks = _prose_and_blocks(doc.read_text(encoding="utf-8"))
        for language, lines in blocks:
            if language in ("bash", "sh", "shell", "console"):
                for command in _shell_commands(lines):
                    if _qaconv_argv(command):
                        yield doc, command.strip()


def _mentions() -> Iterator[Tuple[Path, str]]:
    """Commands named in the prose (`qaconv eval --rerank`): often a fragment of a command line."""
    for doc in DOCS:
        prose, _ = _prose_and_blocks(doc.read_text(encoding="utf-8"))
        for span in _INLINE.findall(prose):
            span = " ".join(span.split())
            if span == "qaconv" or span.startswith("qaconv ") or span.startswith("torchrun "):
                yield doc, span


def _check_mention(argv: List[str]) -> None:
    """The sub-command path exists, every option belongs to it, and a value given to an option with
    choices is one of them (required arguments may be left out)."""
    parser = build_parser()
    words = list(argv)
    while words and not words[0].startswith("-"):
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            break
        name = words.pop(0)
        assert name in subparsers[0].choices, f"no sub-command {name!r}"
        parser = subparsers[0].choices[name]
    options = parser._option_string_actions
    for i, word in enumerate(words):
        if not word.startswith("-") or word == "-":
            continue
        flag, _, value = word.partition("=")
        assert flag in options, f"{parser.prog} has no option {flag}"
        action = options[flag]
        if not value and action.nargs != 0 and i + 1 < len(words) and not words[i + 1].startswith("-"):
            value = words[i + 1]
        if action.choices is not None and value:
            assert value in action.choices, f"{parser.prog} {flag}: {value!r} is not one of {list(action.choices)}"


LINKS = list(_links())
COMMANDS = list(_commands())
MENTIONS = list(_mentions())


def test_the_docs_are_found():
    names = {p.name for p in DOCS}
    for name in ("TRAINING.md", "SEARCH.md", "DISTRIBUTED.md", "PERFORMANCE.md", "ARCHITECTURE.md",
                 "DEMO.md", "CUDA.md", "POSTPROCESS.md", "VIZ.md"):
        assert name in names
    assert len(LINKS) > 20 and len(COMMANDS) > 20 and len(MENTIONS) > 20


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_LINE_LIMIT, f"README.md has {len(lines)} lines (at most {README_LINE_LIMIT})"


@pytest.mark.parametrize("doc,target", LINKS, ids=[f"{d.name}:{t}" for d, t in LINKS])
def test_relative_link_resolves(doc: Path, target: str):
    path, _, anchor = target.partition("#")
    file = (doc.parent / path).resolve() if path else doc
    assert file.exists(), f"{doc.name} links to {target}: no such file"
    if anchor:
        assert file.suffix == ".md", f"{doc.name} links to an anchor of a non-Markdown file: {target}"
        assert anchor in _anchors(file), f"{doc.name} links to {target}: no such heading in {file.name}"


def test_slug_rule():
    assert _slug(" The `qaconv` command") == "the-qaconv-command"
    assert _slug(" Evaluation with sparse re-ranking at MSMT17 size") == \
        "evaluation-with-sparse-re-ranking-at-msmt17-size"


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d.name}:{c[:60]}" for d, c in COMMANDS])
def test_command_line_parses(doc: Path, command: str, capsys):
    argv = _qaconv_argv(command)
    assert argv, f"{doc.name}: not a qaconv command: {command}"
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # --help exits 0, a rejected command line exits 2
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.code == 0, f"{doc.name}: `{command}` is refused: {err[-1] if err else exc.code}"


@pytest.mark.parametrize("doc,mention", MENTIONS, ids=[f"{d.name}:{c[:60]}" for d, c in MENTIONS])
def test_command_mention_names_real_options(doc: Path, mention: str):
    argv = _qaconv_argv(mention)
    if not argv:  # `torchrun` alone
        return
    try:
        _check_mention(argv)
    except AssertionError as exc:
        raise AssertionError(f"{doc.name}: `{mention}`: {exc}") from None


@pytest.mark.parametrize("command", ["qaconv eval --rerank-mode sparser --dataset market1501",
                                     "qaconv eval --dataset market1501 --no-such-flag",
                                     "qaconv evaluate --dataset market1501"])
def test_a_wrong_command_line_is_caught(command: str, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(_qaconv_argv(command))
    assert exc.value.code == 2


@pytest.mark.parametrize("mention", ["qaconv eval --rerank-mode sparser", "qaconv eval --no-such-flag",
                                     "qaconv index infos", "qaconv evaluate"])
def test_a_wrong_mention_is_caught(mention: str):
    with pytest.raises(AssertionError):
        _check_mention(_qaconv_argv(mention))
