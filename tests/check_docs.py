#!/usr/bin/env python3
"""Checks that every code block in docs/ and README.md marked with
<!-- example: examples/NAME.cpp --> (or examples/NAME.cpp:START-END for a line range)
is exactly that file's text, so shown code cannot drift from code the build compiles and runs."""
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1])
marker = re.compile(r"<!-- example: (\S+?)(?::(\d+)-(\d+))? -->\s*\n```[a-z+]*\n(.*?)```", re.S)
checked, failures = 0, []
for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
    if not doc.exists():
        continue
    for m in marker.finditer(doc.read_text()):
        path, start, end, shown = m.group(1), m.group(2), m.group(3), m.group(4)
        lines = (root / path).read_text().splitlines(keepends=True)
        expected = "".join(lines[int(start) - 1:int(end)] if start else lines)
        checked += 1
        if shown != expected:
            failures.append(f"{doc.relative_to(root)}: the block from {path} differs from the file")
for f in failures:
    print(f)
print(f"{checked} doc snippets checked, {len(failures)} differ")
if checked == 0:
    print("no marked snippets found")
    sys.exit(1)
sys.exit(1 if failures else 0)
