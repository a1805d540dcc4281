"""The Triton kernels whose GPU-only branches the CPU interpreter never compiles (inline PTX, tensor-core dots, the
pipelined loop, the split top-k), compiled here ahead of time for the H100 (sm_90) by Triton's own ptxas: a kernel
that would not build on the GPU fails CI, not the next device session. Triton here may be newer than the GPU
machine's; this checks that the code builds for Hopper, not how fast it runs."""
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - a Triton without the ahead-of-time API
    pytest.skip("this Triton has no ahead-of-time compile API", allow_module_level=True)

from shadowkv_fx.kernels import triton_code_score, triton_topk  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
POINTERS = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.uint8: "*u8", torch.int32: "*i32",
            torch.int64: "*i64"}


def _ptxas_present() -> bool:
    nvidia = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(nvidia) or bool(os.environ.get("TRITON_PTXAS_PATH"))


pytestmark = pytest.mark.skipif(not _ptxas_present(), reason="Triton's ptxas is not installed here")


# integer arguments a decode launch passes as multiples of 16 at the 8B shape (strides of q, codes, scales and scores),
# which Triton's launcher specialises as such, as it does every pointer from torch's allocator: without the hint the
# build is another kernel (the code kernel's codes then load a byte at a time instead of by 16-byte cp.async)
ALIGNED_INTS = {"s_qb", "s_qh", "s_qn", "s_cb", "s_ch", "s_cc", "s_sb", "s_sh", "s_b", "s_h"}


def compile_for_hopper(kernel, args: dict, constexprs: dict, num_warps: int) -> bytes:
    """``kernel`` built to a cubin for sm_90: ``args`` maps each runtime parameter to a dtype (a pointer of it),
    ``"i32"`` or ``"fp32"``; ``constexprs`` the rest. Pointers and ``ALIGNED_INTS`` carry the divisibility-by-16
    hint a GPU launch gives them."""
    signature = {name: POINTERS.get(kind, kind) for name, kind in args.items()}
    signature.update({name: "constexpr" for name in constexprs})
    names = list(kernel.arg_names)  # attrs go by the kernel's parameter order
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in args
             if signature[name].startswith("*") or name in ALIGNED_INTS}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps}).asm["cubin"]


TOPK_ROW = {"C": "i32", "K": "i32", "SLOTS": "i32", "Hkv": "i32", "s_b": "i32", "s_h": "i32", "s_c": "i32"}
CODE_ARGS = {"q": torch.bfloat16, "codes": torch.uint8, "code_scale": torch.float32, "sel": torch.uint8,
             "logits": torch.float32, "blk_max": torch.float32, "blk_sum": torch.float32, "scale": "fp32",
             **{name: "i32" for name in ("n", "C", "NB", "Hkv", "s_qb", "s_qh", "s_qn", "s_qd", "s_cb", "s_ch", "s_cc",
                                         "s_sb", "s_sh", "s_sd")}}
CODE_FORMS = ("fp16_bits", "int8x2", "fp16_asm", "fp16_asm_phases", "fp16_asm_phases_tokens")


def builds() -> dict:
    """Each case: (kernel, runtime args, constexprs, warps). The code kernel in every timed dot form as a decode step
    launches it (Llama-3.1-8B heads, chunks of 8, G = 4, 16 blocks x 3 stages; the phases form with the 4 phases
    ``score_code_chunks`` picks at G = 4) and at the committed ``GPU_TILES``; the top-k's one-program kernel from
    scores and from candidates' keys, and its segment kernel."""
    cases = {}
    for from_keys in (False, True):
        args = {"scores": torch.int32 if from_keys else torch.float32, "out_idx": torch.int64,
                "out_picked": torch.uint8, **TOPK_ROW, **({"cand_idx": torch.int32} if from_keys else {})}
        constexprs = {"BLOCK_C": 4096, "FROM_KEYS": from_keys, **({} if from_keys else {"cand_idx": None})}
        cases[f"top_chunks_kernel from_keys={from_keys}"] = (triton_topk.top_chunks_kernel, args, constexprs, 8)
    args = {"scores": torch.bfloat16, "cand_key": torch.int32, "cand_idx": torch.int32, "C": "i32", "KS": "i32",
            "SEG": "i32", "S": "i32", "Hkv": "i32", "s_b": "i32", "s_h": "i32", "s_c": "i32"}
    cases["segment_top_kernel"] = (triton_topk.segment_top_kernel, args, {"BLOCK_S": 1024}, 8)
    tiles = triton_code_score.GPU_TILES
    for form in (*CODE_FORMS, "default"):  # "default": GPU_TILES as committed, its form at its tiles
        dot_form, token_rows = triton_code_score.DOT_FORMS[tiles["dot"] if form == "default" else form]
        phases = 4 if dot_form == triton_code_score.DOT_FORMS["fp16_asm_phases"][0] else 1
        block_t, blocks, stages, warps = ((tiles["block_t"], tiles["blocks"], tiles["stages"], tiles["num_warps"])
                                          if form == "default" else (128, 16, 3, 4))
        constexprs = {"G": 4, "HALF": 64, "L": 8, "BLOCK_M": 16 // phases, "BLOCK_C": block_t // 8, "BLOCK_H": 64,
                      "FAST_DOT": True, "DOT_FORM": dot_form, "TOKEN_ROWS": token_rows, "BLOCKS": blocks,
                      "STAGES": stages, "ASM": True, "PHASES": phases}
        cases[f"code_logits_kernel {form}"] = (triton_code_score.code_logits_kernel, CODE_ARGS, constexprs, warps)
    return cases


def build_all() -> None:
    """Run in a process without TRITON_INTERPRET (under it ``@triton.jit`` makes interpreter functions, which do not
    compile): prints ``{case: "ok" or the error}`` as JSON."""
    results = {}
    for name, (kernel, args, constexprs, warps) in builds().items():
        try:
            results[name] = "ok" if compile_for_hopper(kernel, args, constexprs, warps) else "empty cubin"
        except Exception as failure:  # reported per case by the test
            results[name] = f"{type(failure).__name__}: {str(failure)[-2000:]}"
    print(json.dumps(results))


@pytest.fixture(scope="module")
def built() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", "from tests.test_kernels_compile_hopper import build_all; build_all()"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [
    "top_chunks_kernel from_keys=False", "top_chunks_kernel from_keys=True", "segment_top_kernel",
    *(f"code_logits_kernel {form}" for form in (*CODE_FORMS, "default"))])
def test_kernel_builds_for_hopper(built, case):
    assert built[case] == "ok", f"{case} does not build for sm_90: {built[case]}"
