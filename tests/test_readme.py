"""The README's contents list and its links within the page follow its headings, so neither rots."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- contents -->\n(.*?)<!-- /contents -->\n", re.S)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, characters other than letters, digits,
    spaces, hyphens and underscores dropped, spaces made hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def headings(text: str) -> list[tuple[int, str]]:
    """``(level, title)`` of the ``##`` and ``###`` headings outside code blocks, after the contents list."""
    found, fenced = [], False
    for line in text[text.index("<!-- /contents -->"):].splitlines():
        fenced ^= line.startswith("```")
        match = None if fenced else re.match(r"(#{2,3}) (.+)", line)
        if match:
            found.append((len(match.group(1)), match.group(2).strip()))
    return found


def contents(text: str) -> str:
    """The contents list the headings make: a line per ``##`` heading, ``###`` ones indented under it."""
    return "".join(f"{'  ' * (level - 2)}- [{title}](#{slug(title)})\n" for level, title in headings(text))


def test_the_contents_list_every_section():
    text = README.read_text()
    expected = contents(text)
    assert BLOCK.search(text).group(1) == expected, \
        f"the README's contents list is out of date; put this between its markers:\n{expected}"


def test_every_link_within_the_page_names_a_heading():
    """The prose's links to sections (the contents list aside) lead to headings that exist."""
    text = README.read_text()
    anchors = {slug(title) for _, title in headings(text)}
    targets = re.findall(r"\]\(#([^)]+)\)", BLOCK.sub("", text))
    assert len(targets) >= 3 and [target for target in targets if target not in anchors] == []
