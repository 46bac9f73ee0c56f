"""The bf16 autocast path of the training step against fp32, on the CPU.

GPU runs train under bf16 autocast (precision: bf16); a CPU run is fp32. The same autocast regions run
under torch.autocast("cpu", torch.bfloat16), so the trainer's own `train_step` is checked here with it:
same weights, same slot noise, dropout off. Stated tolerance: the loss within 1 % of fp32, and each
trained parameter tensor's gradient within cosine similarity 0.99 of fp32's (bf16 keeps 8 bits of
mantissa, about 0.4 % per rounding; measured on the tiny configuration: 0.1 % and 0.999).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from sgmodel.model import ShatterAndGather
from sgmodel.train import make_optimizer, precision_context, train_step
from tests.helpers.tiny_model import tiny_batch, tiny_yaml_config

LOSS_RTOL = 0.01
GRAD_COSINE = 0.99


def _step(model, batch, autocast) -> tuple[float, dict[str, torch.Tensor], float]:
    optimizer = make_optimizer(model, model.cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(5)  # the same slot noise on both sides
    outputs, grad_norm, bad = train_step(model, optimizer, batch, trainable, 0.0, autocast)
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(outputs["loss"].detach()), grads, float(bad)


def test_bf16_autocast_step_matches_fp32_within_the_stated_tolerance():
    cfg = tiny_yaml_config(dropout=0.0)
    torch.manual_seed(0)
    reference = ShatterAndGather(cfg).train()
    mixed = copy.deepcopy(reference)
    batch = tiny_batch(reference)
    loss32, grads32, bad32 = _step(reference, batch, contextlib.nullcontext())
    loss16, grads16, bad16 = _step(mixed, batch, torch.autocast("cpu", dtype=torch.bfloat16))
    assert bad32 == bad16 == 0.0
    assert abs(loss16 - loss32) <= LOSS_RTOL * abs(loss32), (loss16, loss32)
    assert grads16.keys() == grads32.keys() and len(grads32) > 20
    cosines = {n: torch.nn.functional.cosine_similarity(grads16[n].flatten(), grads32[n].flatten(), dim=0).item()
               for n in grads32 if grads32[n].norm() > 1e-8}
    worst = min(cosines, key=cosines.get)
    assert cosines[worst] >= GRAD_COSINE, (worst, cosines[worst])
    # and bf16 really ran: the step's results are not bit-identical to fp32
    assert loss16 != loss32 or any(not torch.equal(grads16[n], grads32[n]) for n in grads32)


def test_a_non_finite_step_changes_no_weight_and_is_flagged():
    torch.manual_seed(0)
    model = ShatterAndGather(tiny_yaml_config(dropout=0.0)).train()
    batch = tiny_batch(model)
    optimizer = make_optimizer(model, model.cfg)
    assert optimizer.defaults["fused"]  # the flag skips the update inside the fused kernel
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.text_proj.weight[0, 0] = float("nan")
    before["text_proj.weight"] = model.text_proj.weight.detach().clone()
    _, _, bad = train_step(model, optimizer, batch, trainable, 1.0, contextlib.nullcontext())
    assert float(bad) == 1.0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert all(float(state["step"]) == 0 for state in optimizer.state.values())  # the skipped step is not counted
    with torch.no_grad():
        model.text_proj.weight[0, 0] = 0.0
    _, _, bad = train_step(model, optimizer, batch, trainable, 1.0, contextlib.nullcontext())
    assert float(bad) == 0.0 and not torch.equal(model.shatter.slot_mu.detach(), before["shatter.slot_mu"])


def test_precision_setting_picks_the_autocast_and_cpu_runs_fp32():
    # the choice itself (bf16 | fp32) is checked when the config is built: tests/sgmodel/test_train_config.py
    assert isinstance(precision_context(torch.device("cpu"), "bf16"), contextlib.nullcontext)
    assert isinstance(precision_context(torch.device("cuda"), "bf16"), torch.autocast)
    assert isinstance(precision_context(torch.device("cuda"), "fp32"), contextlib.nullcontext)
