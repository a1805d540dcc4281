#!/usr/bin/env python3
"""Fail when a test run skipped anything but the GPU-only tests (on a GPU machine: anything).

A missing SmolLM2, a missing Triton or Triton kernels imported without TRITON_INTERPRET turn
whole test files into skips, and pytest still exits 0; scripts/test.sh runs this over the junit
XML of each leg. Usage: python scripts/check_skips.py REPORT.xml [REPORT.xml ...]
"""
from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def skips(report: str) -> list[tuple[str, str]]:
    """(test, reason) of every skipped test case in a junit XML report."""
    found = []
    for case in ET.parse(report).getroot().iter("testcase"):
        for skipped in case.findall("skipped"):
            reason = skipped.get("message", "")
            if reason == "collection skipped":  # a module-level skip: "(file, line, 'Skipped: <reason>')"
                match = re.search(r"Skipped: (.*)'\)\s*$", skipped.text or "")
                reason = match.group(1) if match else (skipped.text or reason)
            found.append((f"{case.get('classname')}::{case.get('name')}".lstrip(":"), reason))
    return found


def main(reports: list[str]) -> int:
    import torch

    from tests.models import CUDA_ONLY_REASON

    allowed = set() if torch.cuda.is_available() else {CUDA_ONLY_REASON}
    found = [s for report in reports for s in skips(report)]
    unexpected = [(test, reason) for test, reason in found if reason not in allowed]
    counts = Counter(reason for _, reason in found)
    print(f"{len(found)} skipped: " + "; ".join(f"{n} x {r!r}" for r, n in counts.items()) if found else "0 skipped")
    if unexpected:
        print(f"{len(unexpected)} unexpected skip(s); only {sorted(allowed) or 'none'} may skip here:")
        for test, reason in unexpected:
            print(f"  {test}: {reason}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
