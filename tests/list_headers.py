#!/usr/bin/env python3
"""Prints every public header below the given include directory, one per line, relative to it."""
import pathlib
import sys

root = pathlib.Path(sys.argv[1])
for path in sorted(root.rglob("*.hpp")):
    print(path.relative_to(root).as_posix())
