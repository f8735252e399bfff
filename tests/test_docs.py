"""The front door: README.md and docs/*.md link only to files and headings that exist, and the README
stays short enough to read in five minutes, with the two commands on its first screen.

Links are read as Markdown renders them: fenced code blocks and inline code are not links. A link's
anchor must be a heading of the target page under GitHub's rule (lowercase; punctuation other than
'-' and '_' dropped; spaces to '-'; a repeated heading gets -1, -2, ...).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
FIRST_SCREEN_LINES = 30

_FENCE = re.compile(r"^(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\".*\")?\s*$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line.lstrip())
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            out.append((n, line))
    return out


def slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading slugs as its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text()):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for n, line in _prose_lines(path.read_text()):
        prose = _INLINE_CODE.sub("", line)
        found += [(n, m.group(1)) for m in _LINK.finditer(prose)]
        m = _REF_DEF.match(prose)
        if m:
            found.append((n, m.group(1)))
    return found


def broken_links(pages: list[Path], root: Path) -> list[str]:
    """One line per link that does not resolve to a file in the repository (and a heading, with #)."""
    problems = []
    for page in pages:
        for n, target in links(page):
            where = f"{page.relative_to(root)}:{n}: {target}"
            if _SCHEME.match(target):
                continue  # http(s), mailto: not checked here (no network)
            path_part, _, anchor = target.partition("#")
            if path_part.startswith("/"):
                problems.append(f"{where}: absolute path; link relative to the page")
                continue
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.is_relative_to(root.resolve()):
                problems.append(f"{where}: leaves the repository")
            elif not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root.resolve())}")
    return problems


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_and_anchor_resolves():
    problems = broken_links(_pages(), ROOT)
    assert not problems, "\n".join(problems)


def test_the_checker_reads_the_real_pages():
    # the README links every topic page and the results: a checker that found no links would pass vacuously
    targets = {t for _, t in links(ROOT / "README.md")}
    for page in ("sd", "cpu", "gpu", "serving", "cpp", "bundle"):
        assert f"docs/{page}.md" in targets, f"the README does not link docs/{page}.md"
    assert any(t.startswith("benchmarks/RESULTS.md") for t in targets)
    assert "docs/demo_quality.png" in targets
    assert "the-demo-pair" in anchors(ROOT / "docs" / "dit.md")


def test_readme_is_short_with_the_two_commands_on_its_first_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move details to docs/"
    first = "\n".join(lines[:FIRST_SCREEN_LINES])
    assert "pip install . && tstitch-trt run" in first
    assert "scripts/test.sh" in first
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command


# --- the checker on planted pages ------------------------------------------------------------------
def _site(tmp_path: Path, readme: str, doc: str) -> tuple[list[Path], Path]:
    (tmp_path / "docs").mkdir()
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "docs" / "page.md").write_text(doc)
    return [tmp_path / "README.md", tmp_path / "docs" / "page.md"], tmp_path


DOC = "# Page\n\n## Use it: `run` (fast)\n\n## Measured\n\n## Measured\n\nBack: [top](../README.md#readme)\n"


def test_checker_passes_good_links(tmp_path):
    readme = ("# Readme\n\n![pic](img.png) [page](docs/page.md) [use](docs/page.md#use-it-run-fast)\n"
              "[second](docs/page.md#measured-1) [self](#readme) [web](https://example.com/x)\n"
              "```\n[in code](missing.md)\n```\n`[inline](missing.md)`\n")
    assert broken_links(*_site(tmp_path, readme, DOC)) == []


@pytest.mark.parametrize("link, expected", [
    ("[gone](docs/nothere.md)", "no such file"),
    ("[pic](docs/img.png)", "no such file"),  # relative to the page, not the repository root
    ("[anchor](docs/page.md#measured-2)", "no heading #measured-2 in docs/page.md"),
    ("[self](#nowhere)", "no heading #nowhere in README.md"),
    ("[up](../outside.md)", "leaves the repository"),
    ("[abs](/docs/page.md)", "absolute path"),
    ("[ref]: docs/missing.md", "no such file"),
])
def test_checker_fails_a_planted_broken_link(tmp_path, link, expected):
    problems = broken_links(*_site(tmp_path, f"# Readme\n\n{link}\n", DOC))
    assert len(problems) == 1 and expected in problems[0], problems
