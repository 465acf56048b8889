"""Every kernel specialisation the presets launch compiles for Hopper (sm_90) with no register spills and no 64-bit
integer division.

No GPU needed: Triton's compiler and bundled ptxas run here. The compile runs in a child process because the
test session uses Triton's interpreter (TRITON_INTERPRET=1), which replaces the JIT this needs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

CHILD = r"""
import json, sys
from dataclasses import replace
from benchmarks.aot_launches import aot_rows, preset_launches
from ddmim_kernels.aot import compile_launch

rows = aot_rows(["seed", "simmim", "mae_vit_s16"], 128, 90)
# the control: the same fp32 loss kernel held to 24 registers must spill, or the spill reading is blind
loss = [x for x in preset_launches(["seed"], 128, dtypes=("fp32",), layouts=(False,))
        if x.kernel.__name__ == "_masked_loss_kernel"][0]
squeezed = compile_launch(replace(loss, kwargs={**loss.kwargs, "maxnreg": 24}), 90)
# and the same kernel with 64-bit offsets must show 64-bit divisions, or the division count is blind
wide = compile_launch(replace(loss, kwargs={**loss.kwargs, "INDEX_64": True}), 90)
json.dump({"rows": rows, "squeezed": squeezed, "wide": wide}, sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_specialisation_compiles_for_sm90_without_spills(compiled):
    rows = compiled["rows"]
    assert {r["arch"] for r in rows} == {"sm_90a"}
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["stack_bytes"]]
    assert not spilling, spilling
    assert all(0 < r["registers"] <= 255 for r in rows)


def test_the_presets_launches_cover_each_kernel_dtype_and_layout(compiled):
    rows = compiled["rows"]
    assert {r["kernel"] for r in rows} == {"_masked_loss_kernel", "_independent_mask_kernel",
                                           "_exact_count_mask_kernel"}
    masked = [r for r in rows if r["kernel"] == "_masked_loss_kernel" and r["constants"]["HAS_MASK"]]
    combos = {(r["pointers"]["pred_ptr"], r["constants"]["CHANNELS_LAST"], r["constants"]["WRITE_GRAD"])
              for r in masked}
    assert combos == {(p, cl, g) for p in ("*bf16", "*fp32") for cl in (False, True) for g in (False, True)}
    assert {r["pointers"]["target_ptr"] for r in masked} == {"*fp32"}  # the images stay fp32 under bf16
    assert any(not r["constants"]["HAS_MASK"] for r in rows if r["kernel"] == "_masked_loss_kernel")


def test_no_specialisation_divides_in_64_bits(compiled):
    """The index arithmetic of every kernel the presets launch divides in 32 bits (the loss kernel had 10 64-bit
    divisions and remainders per element, the mask kernel 24)."""
    assert [(r["kernel"], r["div64"]) for r in compiled["rows"] if r["div64"]] == []
    assert compiled["wide"]["div64"] >= 8


def test_the_spill_reading_sees_spills(compiled):
    squeezed = compiled["squeezed"]
    assert squeezed["registers"] <= 24
    assert squeezed["spill_stores"] > 0 and squeezed["spill_loads"] > 0
