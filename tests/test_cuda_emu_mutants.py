"""The mutation table of tests/cuda_emu/mutants.py: each bug, injected into a patched copy of csrc/cuda
and built for the CPU emulator, is caught by the emulated tests -- by a check of the emulator (race,
cp.async completion, divergence, alignment, bounds) or by wrong numbers against float64 -- under the
forward and the reverse schedule. The mutants marked default run in every test run; all of them with
QACONV_EMU_MUTANTS=all (CI runs that as its own step). docs/CUDA.md lists the same table.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch

import cuda_emu
from cuda_emu import EmuError, Emulator
from cuda_emu.mutants import MUTANTS, WRONG, Mutant
from cuda_emu.reference import assert_same, backward_reference, int_maps, match_reference, score_reference

pytestmark = pytest.mark.skipif(cuda_emu.compiler() is None, reason="no C++ compiler (g++ or $CXX) to build the "
                                                                  "CUDA emulator")
ALL = os.environ.get("QACONV_EMU_MUTANTS", "") == "all"
DOC = Path(__file__).resolve().parent.parent / "docs" / "CUDA.md"


def battery(emu: Emulator, gen: torch.Generator, schedule: str) -> None:
    """The emulated checks a mutant must fail: both score kernels, match with indices, the backward, at
    sizes crossing the tiles (2 x 3 pairs, Lq = 50, Lg = 70, d = 24, bias); and the tensor-core score on a
    one-multiprocessor device, where each CTA streams 3 gallery images through the cp.async pipeline."""
    emu.configure(schedule=schedule)
    P, N, Lq, Lg, d = 2, 3, 50, 70, 24
    q, g = int_maps(P, Lq, d, gen, 2), int_maps(N, Lg, d, gen, 2)
    w = torch.randint(-3, 4, (Lq + Lg,), generator=gen).float()
    ref = score_reference(q, g, w, -2.5)
    for tc in (True, False):
        assert_same(emu.score(q.half(), g.half(), w, torch.tensor([-2.5]), tensor_cores=tc), ref, f"score tc={tc}")
    values, indices = emu.match(q, g)
    ref_v, ref_i = match_reference(q, g)
    assert_same(values, ref_v, "match values")
    assert torch.equal(indices, ref_i), "match indices"
    gv = torch.randint(-2, 3, (P, N, Lq + Lg), generator=gen).float()
    ref_q, ref_g = backward_reference(gv, ref_i, q, g)
    gq, gg = emu.backward(gv, ref_i, q, g)
    assert_same(gq, ref_q, "grad_q")
    assert_same(gg, ref_g, "grad_g")
    emu.configure(dataclasses.replace(cuda_emu.DEVICES["sm_80"], sms=1), schedule=schedule)
    q, g = int_maps(2, 20, 16, gen, 2), int_maps(5, 30, 16, gen, 2)
    w = torch.randint(-3, 4, (50,), generator=gen).float()
    assert_same(emu.score(q.bfloat16(), g.bfloat16(), w, None, tensor_cores=True), score_reference(q, g, w, None),
                "score, gallery chunks")


def mutated_source(m: Mutant) -> str:
    text = (cuda_emu.CUDA_DIR / m.file).read_text()
    assert text.count(m.find) == 1, f"{m.id}: the text to mutate occurs {text.count(m.find)} times in {m.file}"
    return text.replace(m.find, m.replace)


def test_table_follows_sources_and_docs():
    """Every mutation applies to the current sources, and docs/CUDA.md's table lists every mutant."""
    doc = DOC.read_text()
    for m in MUTANTS:
        mutated_source(m)
        assert f"`{m.id}`" in doc, f"{m.id} missing from docs/CUDA.md"


@pytest.mark.parametrize("mutant", [pytest.param(m, id=m.id, marks=() if (m.default or ALL) else pytest.mark.skip(
    reason="set QACONV_EMU_MUTANTS=all")) for m in MUTANTS])
def test_mutant_caught(mutant: Mutant, gen):
    emu = Emulator(cuda_emu.build({mutant.file: mutated_source(mutant)}))
    for schedule in ("forward", "reverse"):
        g = torch.Generator().manual_seed(gen.initial_seed())
        try:
            battery(emu, g, schedule)
            outcome = None
        except EmuError as e:
            outcome = str(e)
        except AssertionError as e:
            outcome = f"{WRONG}: {e}"
        if mutant.caught_by is None:
            assert outcome is None, f"equivalent mutant {mutant.id} failed under {schedule}: {outcome}"
        elif mutant.caught_by == WRONG:
            assert outcome is not None and outcome.startswith(WRONG), (schedule, outcome)
        else:
            assert outcome is not None and re.search(mutant.caught_by, outcome), (schedule, outcome)
