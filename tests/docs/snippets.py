#!/usr/bin/env python3
"""Doc snippets are built, not copied: a Markdown code block preceded by
`<!-- snippet: PATH -->` must equal the file PATH (an example or test that CI
compiles and runs). `--check` fails on drift; `--update` rewrites the blocks."""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PATTERN = re.compile(r"<!-- snippet: (?P<path>[^ ]+) -->\n```(?P<lang>[a-z+]*)\n(?P<body>.*?)```", re.S)


def process(update: bool) -> int:
    problems = 0
    files = [p for p in [ROOT / "README.md"] if p.exists()] + [*sorted((ROOT / "docs").rglob("*.md"))]
    for md in files:
        text = md.read_text()

        def replace(m: re.Match) -> str:
            nonlocal problems
            src = ROOT / m.group("path")
            if not src.is_file():
                print(f"{md.relative_to(ROOT)}: snippet source {m.group('path')} does not exist")
                problems += 1
                return m.group(0)
            body = src.read_text()
            if body != m.group("body"):
                if not update:
                    print(f"{md.relative_to(ROOT)}: snippet of {m.group('path')} differs from the file "
                          f"(run tests/docs/snippets.py --update)")
                    problems += 1
                return f"<!-- snippet: {m.group('path')} -->\n```{m.group('lang')}\n{body}```"
            return m.group(0)

        new = PATTERN.sub(replace, text)
        if update and new != text:
            md.write_text(new)
            print(f"updated {md.relative_to(ROOT)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(process("--update" in sys.argv))
