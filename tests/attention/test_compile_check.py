"""The sparse-attention kernels compile for NVIDIA GPUs on this machine without one (Triton's compiler and ptxas,
target named by a compile-only driver): each fits its shared memory on an H100/H200 with its key loop pipelined,
the shared-memory check turns away what a smaller GPU cannot hold, and after `precompile` (what the engine runs at
start on CUDA) chunks of other sizes need no further compilation. Compiling needs TRITON_INTERPRET unset, which
the suite sets: those run in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from optimist.engine.attention.sparse.compile_check import key_loops
from optimist.engine.cli import main

gpu = pytest.mark.gpu


def compile_here(script: str) -> dict:
    """Runs `script` (which prints one JSON line last) in a fresh interpreter with the compiler, not the
    interpreter, behind Triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernels_compile_for_hopper_and_a_smaller_gpu_turns_away_what_it_cannot_hold() -> None:
    # the largest candidates: the nested loop over 128-key tiles in 3 stages, block-sparse in 4 (208 / 144 KiB)
    got = compile_here("""
        import json, torch
        from dataclasses import asdict
        from optimist.engine.attention.sparse.compile_check import check_kernels, summary
        hopper = check_kernels(90, torch.bfloat16, 128, which=slice(5, 6))
        ada = check_kernels(89, torch.bfloat16, 128, which=slice(5, 6))
        wide = check_kernels(90, torch.bfloat16, 128, kernels=["vertical_slash"], which=slice(3, 4), block=128)
        print(json.dumps({"hopper": [asdict(r) for r in hopper], "ada": [asdict(r) for r in ada],
                          "hopper_problems": summary(hopper), "ada_problems": summary(ada),
                          "wide": [asdict(r) for r in wide]}))
    """)
    hopper = {r["kernel"]: r for r in got["hopper"]}
    assert set(hopper) == {"vertical_slash nested", "block_sparse"}
    for row in hopper.values():
        assert row["error"] == "" and row["fits"] and row["pipelined"], row
        assert 100 * 1024 < row["shared"] <= 232448, row  # several stages of 128-wide K/V tiles in shared memory
        assert 64 < row["registers"] <= 255 and row["stack"] >= 0, row  # read back from the cubin
        # counted in the machine code: an interior key tile skips the mask that tiles at the edges apply
        assert 200 < row["range_tile"] < row["range_tile_masked"] < 2000, row
        assert row["column_tile"] > 200, row  # the gathered-column loop found too
    assert got["hopper_problems"] == []
    # 128-row programs (`bench sparse-attention --blocks 128`) compile and fit too, interior tiles unmasked
    (wide,) = got["wide"]
    assert wide["fits"] and wide["pipelined"] and 200 < wide["range_tile"] < wide["range_tile_masked"], wide
    for row in got["ada"]:  # an L4/L40 has 99 KiB a program: these two configurations cannot run there
        assert row["error"] == "" and not row["fits"], row
    assert got["ada_problems"] == [
        "vertical_slash nested: no configuration compiles within the shared-memory limit",
        "block_sparse: no configuration compiles within the shared-memory limit",
    ]


def test_key_loops_counts_each_way_through_an_iteration() -> None:
    # a pipelined tile loop with a branch around its mask, then a loop without tensor-core work (not a key loop)
    sass = """
        /*0100*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;  /* 0x0 */
        /*0110*/                   HGMMA.64x64x16.F32.BF16 R88, R136, gdesc[UR8], RZ, !UPT ;  /* 0x0 */
        /*0120*/              @P0 BRA P1, 0x160 ;  /* 0x0 */
        /*0130*/                   ISETP.GE.U32.AND P2, PT, R3, R4, PT ;  /* 0x0 */
        /*0140*/                   FSEL R5, R5, -INF , P2 ;  /* 0x0 */
        /*0150*/                   FSEL R6, R6, -INF , P2 ;  /* 0x0 */
        /*0160*/                   MUFU.EX2 R5, R5 ;  /* 0x0 */
        /*0170*/              @P3 BRA 0x100 ;  /* 0x0 */
        /*0180*/                   IADD3 R7, R7, 0x1, RZ ;  /* 0x0 */
        /*0190*/              @P4 BRA 0x180 ;  /* 0x0 */
        /*01a0*/                   EXIT ;  /* 0x0 */
    """
    loops = key_loops(sass)
    assert len(loops) == 1
    assert loops[0].start == 0x100 and loops[0].paths == [5, 8] and loops[0].async_copies


def test_after_precompile_other_chunk_sizes_compile_nothing_more() -> None:
    got = compile_here("""
        import json, torch
        from optimist.engine.attention.sparse import compile_check as cc
        heads = (9, 3)  # the default model's
        with cc.compile_only(90):
            done = cc.precompile(torch.float16, 64, heads, "cpu", which=slice(0, 2))
            after = {k: cc.programs(k) for k in cc.KERNELS}
            for kernel in cc.KERNELS:
                for config in cc.candidates(kernel)[:2]:
                    for n, q_start in ((2048, 0), (777, 5000), (1, 33), (1000, 24)):
                        cc.compile_one(kernel, config, torch.float16, 64, n, q_start, heads)
            later = {k: cc.programs(k) for k in cc.KERNELS}
            try:
                cc.precompile(torch.float16, 48, heads, "cpu")
                refused = ""
            except ValueError as exc:
                refused = str(exc)
        print(json.dumps({"done": done, "after": after, "later": later, "refused": refused}))
    """)
    assert got["done"] == 4
    assert got["after"] == {"vertical_slash": 2, "block_sparse": 2}
    assert got["later"] == got["after"]  # a chunk of any size launches a program compiled at start
    assert "head size 48" in got["refused"]


def test_check_kernels_refuses_what_it_cannot_compile_for(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-kernels", "--arch", "70"]) == 1  # conftest's TRITON_INTERPRET=1 or the arch: both named
    err = capsys.readouterr().err
    assert "TRITON_INTERPRET" in err or "compute capability 70" in err
    assert main(["check-kernels", "--block", "48"]) == 2
    assert "--block 48 must be a power of two" in capsys.readouterr().err


@gpu
def test_on_a_gpu_the_autotuner_launches_the_precompiled_programs() -> None:
    from optimist.engine.attention.sparse import compile_check as cc
    from optimist.engine.attention.sparse.index import build_vertical_slash_index
    from optimist.engine.attention.sparse.triton_kernels import vertical_slash_attention

    device = torch.device("cuda")
    heads = (8, 2)
    cc.precompile(torch.bfloat16, 64, heads, device, kernels=["vertical_slash"])
    before = cc.programs("vertical_slash")  # the 18 candidates' programs (some perhaps from earlier tests)
    assert before >= 18
    n = 3000
    q = torch.randn(n, 8, 64, device=device, dtype=torch.bfloat16)
    k = torch.randn(n, 2, 64, device=device, dtype=torch.bfloat16)
    cols = torch.stack([torch.randperm(n)[:200] for _ in range(8)]).to(device)
    offs = torch.stack([torch.cat([torch.arange(64), 64 + torch.randperm(n - 64)[:100]]) for _ in range(8)])
    index = build_vertical_slash_index(cols, offs.to(device), 0, n)
    vertical_slash_attention(q, k, k.clone(), index, loop="auto")
    torch.cuda.synchronize()
    assert cc.programs("vertical_slash") == before  # timed and launched, none compiled
