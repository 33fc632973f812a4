"""The measured auto order (dtop_kernels/auto_order.py): the shipped table is valid, a table
entry for the device's architecture decides "auto" per op, one stage mixes backends per op,
malformed tables are refused. A fake table on a fake architecture stands in for a GPU run;
the Triton kernels run under the CPU interpreter."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from blocks import Block, randomize_
from helpers import assert_err_rule, backend_marks, random_keep
from naive import naive_block

from dtop_kernels import TokenSet, auto_order, pruned_stage
from dtop_kernels.ops import attention as attention_op
from dtop_kernels.ops import block as block_op
from dtop_kernels.ops import linear as linear_op

TRITON = pytest.mark.skipif(bool(backend_marks("triton")), reason="Triton cannot run here")


def _entry(order: dict) -> dict:
    return {"device": "test GPU", "torch": torch.__version__, "triton": "x", "cuda": "13.0",
            "date": "2026-11-28", "commit": "abc", "order": order}


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Write a table for architecture sm_99 and make every device report sm_99."""
    def install(order: dict | None) -> Path:
        gpus = {} if order is None else {"sm_99": _entry(order)}
        path = tmp_path / "order.json"
        path.write_text(json.dumps({"format": 1, "gpus": gpus}))
        monkeypatch.setenv("DTOP_AUTO_ORDER", str(path))
        monkeypatch.setattr(auto_order, "arch", lambda device: "sm_99")
        return path

    return install


def test_shipped_table_is_valid():
    table = auto_order.load(auto_order.TABLE)
    for a, entry in table["gpus"].items():  # every measured order names its source
        assert a.startswith("sm_") and entry["device"] and entry["date"]


def test_no_entry_means_the_built_in_order(fake_gpu):
    fake_gpu(None)
    q = torch.zeros(4, 2, 8)
    assert attention_op._dispatch.select("auto", q, q, q) == "torch"
    assert auto_order.measured_order("varlen_attention", q.device) is None


def test_cpu_devices_never_read_the_table(monkeypatch):
    monkeypatch.setenv("DTOP_AUTO_ORDER", "/nonexistent/order.json")
    assert auto_order.arch(torch.device("cpu")) is None
    q = torch.zeros(4, 2, 8)
    assert attention_op._dispatch.select("auto", q, q, q) == "torch"


@TRITON
def test_measured_entry_orders_auto(fake_gpu):
    fake_gpu({"varlen_attention": ["triton", "torch"], "packed_linear": ["torch"]})
    q = torch.zeros(4, 2, 8)
    assert attention_op._dispatch.select("auto", q, q, q) == "triton"
    # a measured backend that cannot run the call is passed over
    assert attention_op._dispatch.select("auto", q.double(), q.double(), q.double()) == "torch"
    ts = TokenSet.all_active(1, 4)
    assert linear_op._dispatch.select("auto", q[:, 0], torch.zeros(3, 8), ts) == "torch"


@TRITON
def test_stage_mixes_backends_per_op(fake_gpu, gen):
    fake_gpu({"layer_norm": ["torch"], "packed_linear": ["triton", "torch"],
              "varlen_attention": ["torch"], "gather_tokens": ["torch"],
              "scatter_tokens": ["triton", "torch"]})
    b, n, c, h = 2, 13, 32, 2
    blocks = [randomize_(Block(c, h, 2.0), gen).eval() for _ in range(2)]
    keep = random_keep(b, n, [13, 5], gen)
    ts = TokenSet.from_mask(keep, capacity=b * n)
    x = torch.randn(b, n, c, generator=gen)
    plan = block_op._stage_plan(x, ts, [block_op.check_block(blk, c) for blk in blocks])
    assert plan == {"gather_tokens": "torch", "layer_norm": "torch", "packed_linear": "triton",
                    "varlen_attention": "torch", "scatter_tokens": "triton"}
    with torch.no_grad():
        y = pruned_stage(x, ts, blocks)
        same = naive_block(x, keep, blocks)
        exact = naive_block(x.double(), keep, [copy.deepcopy(blk).double() for blk in blocks])
    assert torch.equal(y[~keep], x[~keep])
    assert_err_rule(y[keep], same[keep], exact[keep], 1e-5)


@pytest.mark.parametrize("table,match", [
    pytest.param({"gpus": {}}, "format", id="no-format"),
    pytest.param({"format": 1, "gpus": {"h200": {}}}, "architectures", id="bad-arch"),
    pytest.param({"format": 1, "gpus": {"sm_90": {"order": {}}}}, "device", id="no-device"),
    pytest.param({"format": 1, "gpus": {"sm_90": _entry({"attention": ["torch"]})}},
                 "unknown op", id="bad-op"),
    pytest.param({"format": 1, "gpus": {"sm_90": _entry({"packed_linear": ["cublas"]})}},
                 "distinct backends", id="bad-backend"),
])
def test_malformed_tables_are_refused(table, match, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=match):
        auto_order.load(path)
