"""The documentation's Python snippets run: every ```python block of README.md and docs/*.md.

Each page's blocks run in order in one namespace (a later block may use an earlier block's names),
on CPU, with tracebacks pointing at the markdown's own lines. A block that cannot run on a CPU in
seconds (GPU only, long training, a signature rather than a program) is marked in the markdown by
an HTML comment on the line before its fence, ``<!-- not-tested: why -->``; only those are skipped,
and the test prints which.
"""

import dataclasses
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*not-tested:(?P<reason>.*?)-->\s*$")
_MARKER_START = re.compile(r"<!--\s*not-tested")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block of a markdown page."""

    language: str  # the first word of the fence's info string ("" when none)
    first_line: int  # 1-based line number of the block's first code line in the page
    code: str  # the code, with the fence's indentation removed
    skip_reason: str | None  # the reason of a `<!-- not-tested: ... -->` marker, if any


def parse_blocks(text: str, name: str = "<markdown>") -> list[Block]:
    """Fenced code blocks of a markdown text (CommonMark fences of ``` or ~~~, maybe indented).

    Raises ValueError on an unclosed fence, a not-tested marker without a reason, or a marker that
    is not on the line right before a ```python fence.
    """
    lines = text.splitlines()
    blocks, i, marked_lines = [], 0, set()
    while i < len(lines):
        opened = _FENCE_OPEN.match(lines[i])
        if not opened:
            i += 1
            continue
        indent, fence = opened["indent"], opened["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
        if end is None:
            raise ValueError(f"{name}:{i + 1}: the code fence opened here is never closed")
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                for line in lines[i + 1:end]]
        language = (opened["info"].split() or [""])[0].lower()
        marker = _MARKER.match(lines[i - 1]) if i > 0 else None
        reason = None
        if marker:
            reason = marker["reason"].strip()
            if not reason:
                raise ValueError(f"{name}:{i}: a not-tested marker must say why "
                                 "(<!-- not-tested: needs a GPU -->)")
            if language != "python":
                raise ValueError(f"{name}:{i}: a not-tested marker must precede a ```python fence; "
                                 f"this one precedes a {language or 'plain'} block")
            marked_lines.add(i - 1)
        blocks.append(Block(language, i + 2, "\n".join(body) + "\n", reason))
        i = end + 1
    for k, line in enumerate(lines):
        if _MARKER_START.search(line) and k not in marked_lines:
            raise ValueError(f"{name}:{k + 1}: a not-tested marker must be alone on the line right "
                             "before a ```python fence: <!-- not-tested: why -->")
    return blocks


def _pages() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _python_blocks(page: pathlib.Path) -> list[Block]:
    rel = str(page.relative_to(ROOT))
    return [b for b in parse_blocks(page.read_text(), rel) if b.language == "python"]


def _pages_with_python() -> list[pathlib.Path]:
    return [p for p in _pages() if _python_blocks(p)]


@pytest.mark.parametrize("page", _pages_with_python(), ids=lambda p: p.name)
def test_page_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes lands here
    rel = page.relative_to(ROOT)
    namespace = {"__name__": f"docs_{page.stem}"}
    ran, skipped = 0, []
    for block in _python_blocks(page):
        where = f"{rel}:{block.first_line}"
        if block.skip_reason is not None:
            skipped.append(f"{where} ({block.skip_reason})")
            continue
        # Pad with blank lines so line numbers in tracebacks are the page's own.
        code = compile("\n" * (block.first_line - 1) + block.code, str(page), "exec")
        try:
            exec(code, namespace)  # noqa: S102 (running the documentation is the point)
        except Exception as error:
            raise AssertionError(f"the snippet at {where} failed: {error!r}") from error
        ran += 1
    for s in skipped:
        print(f"not tested (marked): {s}")
    if not ran:
        pytest.skip(f"every python block of {rel} is marked not-tested: {'; '.join(skipped)}")


def test_every_page_parses_and_some_snippets_run():
    pages = _pages()
    assert ROOT / "README.md" in pages and len(pages) >= 2
    runnable = [b for p in pages for b in _python_blocks(p) if b.skip_reason is None]
    assert len(runnable) >= 5  # guards against a parser that silently finds nothing


def test_parser_on_fences_markers_and_errors():
    text = "\n".join([
        "# page",                        # 1
        "```python",                     # 2
        "a = 1",                         # 3
        "```",                           # 4
        "<!-- not-tested: needs a GPU -->",  # 5
        "```python",                     # 6
        "gpu_only()",                    # 7
        "```",                           # 8
        "1. a list item",                # 9
        "   ```bash",                    # 10
        "   echo hi",                    # 11
        "   ```",                        # 12
        "   ```python",                  # 13
        "   b = a + 1",                  # 14
        "       c = 2",                  # 15
        "   ```",                        # 16
        "~~~~",                          # 17
        "```python",                     # 18 (inside a ~~~~ block: text, not a fence)
        "~~~~",                          # 19
    ])
    blocks = parse_blocks(text)
    assert [(b.language, b.first_line, b.skip_reason) for b in blocks] == [
        ("python", 3, None), ("python", 7, "needs a GPU"), ("bash", 11, None),
        ("python", 14, None), ("", 18, None)]
    assert blocks[0].code == "a = 1\n" and blocks[3].code == "b = a + 1\n    c = 2\n"
    with pytest.raises(ValueError, match="never closed"):
        parse_blocks("```python\nx = 1\n")
    with pytest.raises(ValueError, match="must say why"):
        parse_blocks("<!-- not-tested: -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="precede a ```python fence"):
        parse_blocks("<!-- not-tested: shell -->\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="alone on the line right before"):
        parse_blocks("<!-- not-tested: stray -->\n\n```python\nx = 1\n```\n")
