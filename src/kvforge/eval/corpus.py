"""The texts `kvforge eval` scores: English prose, and Python code.

    prose   the Python documentation's tutorial, FAQ and HOWTOs: human-written English
            prose (the Python Software Foundation's, not ours), read from the reST
            sources Debian's python3.11-doc ships, with the markup taken out: no code
            blocks, directives, headings' underlines or doctest lines; inline roles,
            literals and links reduced to their text
    code    the standard-library modules kvforge-mini's training kept out

A missing corpus is a KVForgeError saying how to install it; `--text FILE` scores any
other text.
"""

import re
from pathlib import Path

from kvforge.errors import KVForgeError
from kvforge.training.data import python_sources, read_sources

CORPORA = ("prose", "code")
PROSE_ROOTS = (Path("/usr/share/doc/python3.11/html/_sources"),)
PROSE_DIRS = ("tutorial", "faq", "howto")  # the documentation's plain-English parts
PROSE_INSTALL = "apt-get install python3.11-doc"

_ROLE = re.compile(r":[\w:.-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`len` -> len
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")  # `text <url>`_ -> text
_LITERAL = re.compile(r"``([^`]+)``")
_REFERENCE = re.compile(r"`([^`]+)`_{0,2}")
_EMPHASIS = re.compile(r"\*\*?([^*\s][^*]*?)\*\*?")
_ROLE_OPEN = re.compile(r":[\w:.-]+:`")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")


def rest_prose(source: str) -> str:
    """The prose paragraphs of a reST document, one a line, markup reduced to text."""
    paragraphs, current = [], []
    for line in source.splitlines():
        stripped = line.strip()
        if not stripped or line[0].isspace() or _UNDERLINE.match(line):
            # blank lines, indented blocks (code, directive bodies, block quotes) and
            # heading underlines end a paragraph
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        if stripped.startswith((".. ", ">>>", "|")) or stripped == "..":
            continue
        current.append(stripped)
    if current:
        paragraphs.append(" ".join(current))
    kept = []
    for text in paragraphs:
        for pattern in (_ROLE, _LINK, _LITERAL, _REFERENCE, _EMPHASIS):
            text = pattern.sub(r"\1", text)
        # what is left of markup cut by a paragraph's end: a literal's or role's opening
        text = _ROLE_OPEN.sub("", text).replace("``", "")
        text = re.sub(r"::$", ":", text).replace("\\", "")
        if len(text.split()) >= 4:  # headings and stray labels are not prose
            kept.append(text)
    return "\n".join(kept)


def prose_root() -> Path:
    for root in PROSE_ROOTS:
        if all((root / d).is_dir() for d in PROSE_DIRS):
            return root
    raise KVForgeError(
        "the prose corpus is the Python documentation's reST sources, which are not "
        f"installed: {PROSE_INSTALL} (or score another file with --text FILE, or the "
        "standard library's code with --corpus code)"
    )


def prose_text(root: Path | None = None) -> str:
    """The tutorial, FAQ and HOWTOs as prose, in a fixed order, documents apart by a
    blank line."""
    root = prose_root() if root is None else root
    files = sorted(p for d in PROSE_DIRS for p in (root / d).glob("*.rst.txt")
                   if p.name != "index.rst.txt")  # fmt: skip
    return "\n\n".join(rest_prose(p.read_text(encoding="utf-8")) for p in files)


def code_text() -> str:
    """The standard-library modules kept out of the built-in model's training."""
    return "\n".join(read_sources(python_sources(held_out=True)))


def corpus_text(name: str) -> str:
    if name == "prose":
        return prose_text()
    if name == "code":
        return code_text()
    raise KVForgeError(f"unknown corpus {name!r}; choose one of: {', '.join(CORPORA)}")
