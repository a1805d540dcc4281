#!/usr/bin/env python3
"""Mutation testing: every named mutant of tests/mutants.py must make a fast subset of the suite fail.

First the subset runs unmutated and must pass (a broken subset would "kill" every mutant). Then,
for each mutant, pytest runs the subset with ``SHADOWKV_MUTANT=<name>`` (tests/conftest.py applies
it), stopping at the first failure (``-x``), the tests expected to kill it first. Only the
explicit ``@example``s of the property tests run (hypothesis profile "mutants"). Prints a table
mutant -> killing test, seconds; exits 1 if any mutant survives.

Usage: python scripts/mutants.py [NAME ...]   (default: every mutant; MUTANT_WORKERS=2 at a time)
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EQUIVALENCE = "tests/test_equivalence.py::test_full_budget_full_rank_equals_dense[llama]"
SELECTION = "tests/test_sparse_decode.py::test_prefill_state_and_selection_follow_the_algorithm"
REUSE = "tests/test_sparse_decode.py::test_value_reuse_changes_no_token_and_serves_repeated_chunks"
FOLD = "tests/test_fold.py::test_full_budget_and_rank_folding_equals_dense"
FOLD_SPECULATION = "tests/test_fold.py::test_prompt_lookup_with_folding_equals_plain_greedy_at_sparse_settings"
RIGHT_PADDED = "tests/test_equivalence.py::test_right_padded_batch_gives_the_left_padded_tokens"
SLOTS = "tests/test_serving_shadowkv.py::test_full_budget_and_rank_tokens_equal_dense_generate_alone"
QUANTIZED = "tests/test_quantized_store.py::test_8bit_values_are_int8_with_scales_and_logits_stay_close"
LANDMARKS_8BIT = "tests/test_quantized_store.py::test_8bit_landmarks_select_nearly_what_16bit_ones_do"
PIECE_MERGE = "tests/test_prefill_pieces.py::test_merge_of_two_key_sets_is_attention_over_both"
PREFIX = "tests/test_prefix_store.py::test_full_budget_and_rank_every_answer_is_dense_generate_of_document_and_question"
KEY_CODES = "tests/test_key_codes.py::test_a_small_budget_with_codes_picks_the_chunks_of_most_coded_mass_end_to_end"
SUBSPACE = "tests/test_reference_kernels.py::test_subspace_solver_fits_the_keys_about_as_well_as_the_full_eigh[3]"
SUBSET = [EQUIVALENCE, SELECTION, REUSE, FOLD, FOLD_SPECULATION, RIGHT_PADDED, SLOTS, QUANTIZED, LANDMARKS_8BIT, PREFIX,
          KEY_CODES, SUBSPACE]

# the tests each mutant is expected to fail, run first so that a killed mutant costs one test;
# the rest of the subset runs after them, so a mutant that escapes its own tests can still die
FIRST = {
    "topk_inverted": [SELECTION],
    "score_first_head_only": [SELECTION],
    "landmarks_first_token": [SELECTION],
    "svd_drops_a_component": [SELECTION],
    "reuse_stale_values": [REUSE],
    "fold_drops_a_chunk": [FOLD],
    "fold_never_refreshes": [FOLD],
    "rope_columns_off_by_one": [FOLD],
    "folded_tail_attended_twice": [FOLD],
    "fold_undo_ignored": [FOLD_SPECULATION],
    "crop_keeps_a_rejected_draft": [FOLD_SPECULATION],
    "next_positions_off_by_one": [RIGHT_PADDED],
    "slot_reads_older_rows": [SLOTS],
    "slot_positions_ignore_join": [SLOTS],
    "slot_question_not_generated": [PREFIX],
    "earlier_tokens_see_the_next": [FOLD_SPECULATION],
    "piece_merge_ignores_lse": [PIECE_MERGE],
    "dequant_scale_ignored": [QUANTIZED],
    "landmark_scale_ignored": [LANDMARKS_8BIT],
    "code_steps_ignored": [KEY_CODES],
    "code_high_nibble_dropped": [KEY_CODES],
    "subspace_skips_its_rounds": [SUBSPACE],
}


def run_subset(tests: list[str], mutant: str | None, threads: int) -> tuple[int, str, float]:
    env = {**os.environ, "HYPOTHESIS_PROFILE": "mutants", "OMP_NUM_THREADS": str(threads)}
    env.pop("SHADOWKV_MUTANT", None)
    if mutant:
        env["SHADOWKV_MUTANT"] = mutant
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-rf", *tests]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def killer(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return match.group(1) if match else "?"


def main(names: list[str]) -> int:
    from tests.mutants import MUTANTS

    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        print(f"unknown mutant(s) {unknown}; known: {', '.join(MUTANTS)}")
        return 2
    names = names or list(MUTANTS)
    workers = int(os.environ.get("MUTANT_WORKERS", "2"))
    threads = max(1, (os.cpu_count() or 1) // workers)
    start = time.monotonic()

    code, output, seconds = run_subset(SUBSET, None, os.cpu_count() or 1)
    if code != 0:
        print(output[-6000:])
        print(f"the unmutated subset fails ({seconds:.0f} s): fix it before judging mutants")
        return 1
    print(f"unmutated subset passes ({len(SUBSET)} tests, {seconds:.0f} s)")

    def judge(name: str) -> tuple[str, int, str, float]:
        first = FIRST.get(name, [])
        order = first + [t for t in SUBSET if t not in first]
        return (name, *run_subset(order, name, threads))

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(judge, names))
    survivors = []
    width = max(map(len, names))
    print(f"{'mutant':<{width}}  {'seconds':>7}  killed by")
    for name, code, output, seconds in results:
        if code == 1:
            verdict = killer(output)
        else:
            verdict = "SURVIVED" if code == 0 else f"pytest exit {code} (not a test failure)"
            survivors.append(name)
        print(f"{name:<{width}}  {seconds:7.0f}  {verdict}")
        if code not in (0, 1):
            print(output[-3000:])
    print(f"{len(names) - len(survivors)}/{len(names)} mutants killed in {time.monotonic() - start:.0f} s")
    if survivors:
        print("surviving mutants are missing tests: " + ", ".join(survivors))
        for name in survivors:
            print(f"  {name}: {MUTANTS[name][0]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
