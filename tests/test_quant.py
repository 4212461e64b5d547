"""int4 weight-only projections: packing round trip, error bounds, the model swap, the trial's figures."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from txlab.config import load_config
from txlab.model.quant import QMAX, Int4Linear, pack_int4, projection_names, quantize_model, unpack_int4, weight_bytes
from txlab.trial import run_trial
from txlab.trial.infer import build_model
from txlab.trial.resolve import resolve

pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)


def test_pack_round_trips_representable_weights_exactly():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-7, 8, (6, 32), generator=g).float()  # symmetric: scale = max|w| / 7
    q[:, 0] = 7  # every group's max |q| is 7, so the scale is exactly s
    s = torch.tensor([0.5, 0.25, 2.0, 1.0, 0.125, 4.0]).view(6, 1)
    packed, scale = pack_int4(q * s, group=32)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 16)  # two values per byte
    assert scale.shape == (6, 1) and scale.dtype == torch.float16
    torch.testing.assert_close(unpack_int4(packed, scale, 32), q * s, rtol=0, atol=0)


@pytest.mark.parametrize("group", [2, 16, 64])
def test_dequantization_error_is_at_most_half_a_step(group):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 128, generator=g) * 0.02
    packed, scale = pack_int4(w, group)
    back = unpack_int4(packed, scale, group)
    step = (w.reshape(24, -1, group).abs().amax(-1, keepdim=True) / QMAX).expand(-1, -1, group).reshape(24, 128)
    err = (back - w).abs()
    # half a quantization step, plus the fp16 rounding of the scale (a relative 2^-11, or fp16's subnormal
    # spacing 2^-24 for tiny groups, over at most 7 steps)
    assert bool((err <= step * (0.5 + 7 * 2**-11) + 7 * 2**-24).all())
    assert float(err.max()) > 0  # and it is quantized, not a copy


def test_bad_group_is_refused():
    with pytest.raises(ValueError, match="even group dividing"):
        pack_int4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="even group dividing"):
        pack_int4(torch.randn(4, 96), 3)


def test_int4_linear_matches_its_dequantized_weight():
    torch.manual_seed(2)
    lin = nn.Linear(64, 48).requires_grad_(False)
    q = Int4Linear(lin, 32)
    x = torch.randn(5, 64)
    torch.testing.assert_close(q(x), F.linear(x, q.weight(torch.float32), lin.bias))
    rel = float((q(x) - lin(x)).norm() / lin(x).norm())
    assert 0 < rel < 0.2


def test_quantize_model_swaps_every_projection_and_shrinks_them_8x():
    cfg = load_config(
        None, {"workload.kind": "prefill", "workload.seq_len": 32, "model.quant": "int4", "model.quant_group": 64}
    )
    model = build_model(resolve(cfg), quant=False)
    proj = {n: model.get_submodule(n) for n in projection_names(model)}
    assert len(proj) == 4 * cfg.model.n_layers
    full = weight_bytes(model)
    proj_w = sum(m.weight.numel() for m in proj.values())
    quantize_model(model, 64)
    assert all(isinstance(model.get_submodule(n), Int4Linear) for n in proj)
    # each projection weight: 4 bytes -> half a byte + a 2-byte scale per 64 values
    assert full - weight_bytes(model) == proj_w * 4 - (proj_w // 2 + proj_w // 64 * 2)


def test_int4_trial_reports_weight_saving_and_logit_error_on_the_corpus():
    cfg = load_config(
        None,
        {
            "workload.kind": "decode",
            "workload.seq_len": 64,
            "workload.decode_tokens": 2,
            "workload.steps": 1,
            "workload.warmup_steps": 0,
            "model.quant": "int4",
            "model.quant_group": 64,
            "data.source": "corpus",
            "measure.device": "cpu",
        },
    )
    row = run_trial(cfg)
    assert row["status"] == "ok", row["error"]
    assert row["weight_bytes"] < 0.5 * row["weight_bytes_fp"]
    assert row["params_bytes"] == row["weight_bytes"]  # the packed bytes are counted as the model's weights
    assert 0 < row["logit_rel_error"] < 0.5
    assert 0.5 < row["next_token_agreement"] <= 1.0
