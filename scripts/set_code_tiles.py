"""Make a tile sweep's fastest exact tiles the code kernel's default: rewrites the ``GPU_TILES = {...}`` line of
``kernels/triton_code_score.py`` from ``score_kernel_sweep.py``'s BEST.json, so the GPU suite can run on the new default
in the call that swept it, and the same line is committed here from the JSON that came back.

    python3 scripts/set_code_tiles.py BEST.json
"""
from __future__ import annotations

import json
import pathlib
import re
import sys

from shadowkv_fx.kernels import triton_code_score

KERNEL = pathlib.Path(triton_code_score.__file__)
KEYS = tuple(triton_code_score.GPU_TILES)  # the line keeps the committed keys, in their order


def main(best_path: str) -> None:
    best = json.loads(pathlib.Path(best_path).read_text())
    if set(best) != set(KEYS):
        raise SystemExit(f"{best_path}: want the keys {KEYS}, got {sorted(best)} (no exact tiles in the sweep?)")
    line = "GPU_TILES = {" + ", ".join(f"{json.dumps(k)}: {json.dumps(best[k])}" for k in KEYS) + "}"
    source = KERNEL.read_text()
    new, count = re.subn(r"^GPU_TILES = \{.*\}$", line, source, flags=re.M)
    if count != 1:
        raise SystemExit(f"{KERNEL}: found {count} GPU_TILES lines, want 1")
    KERNEL.write_text(new)
    print(line)


if __name__ == "__main__":
    main(*sys.argv[1:2])
