#!/usr/bin/env python3
"""Compile-fail test: compiles SOURCE with the given command and passes only if compilation
fails with EXPECTED in the diagnostics (so a failure for any other reason is caught)."""
import subprocess
import sys

expected, source, *command = sys.argv[1:]
result = subprocess.run(command + ["-fsyntax-only", source], capture_output=True, text=True)
if result.returncode == 0:
    print(f"{source} compiled, but must fail with: {expected}")
    sys.exit(1)
if expected not in result.stderr:
    print(f"{source} failed, but without '{expected}':\n{result.stderr[:4000]}")
    sys.exit(1)
print(f"{source}: fails as expected ({expected})")
