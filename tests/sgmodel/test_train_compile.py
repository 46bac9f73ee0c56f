"""`compile: true`: the compiled training step computes what the eager one does, for any batch.

Slow by nature (Inductor compiles C++ kernels: about a minute on 2 cores, less once its on-disk
cache is warm), so one test covers it: losses and gradients against eager on three batches of one
size whose images, phrase strings (which decide the negatives) and loss weight (the warm-up
schedule) all change, and no recompile after the first batch. (A batch of a new size compiles once
more, as dynamic: torch's own behaviour, described in docs/training.md, not tested here.)
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from sgmodel.model import ShatterAndGather
from tests.helpers.tiny_model import tiny_batch, tiny_config

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "cc")), reason="torch.compile on CPU needs a C++ compiler"
)


def test_compiled_stages_match_eager_losses_and_gradients_across_batches(monkeypatch):
    import torch._dynamo.utils as dynamo_utils
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)  # the slot noise from eager's generator
    torch.manual_seed(0)
    cfg = tiny_config(drop_duplicate_negatives=True, contrastive_warmup_steps=1, contrastive_ramp_steps=3)
    eager = ShatterAndGather(cfg).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_stages()
    compiles = dynamo_utils.counters["frames"]
    phrase_sets = [None, ["sky"] * 6, ["tree", "tree", "the red ball", "sky", "the red ball", "green thing"]]

    for seed, phrases in enumerate(phrase_sets):
        batch = tiny_batch(eager, seed=seed)  # 3 images, 6 phrases: the same sizes every time
        if phrases is not None:
            batch["texts"] = phrases  # other duplicates, so other negatives are dropped
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            out = model(batch)
            out["loss"].backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            results.append((out, grads))
        (eager_out, eager_grads), (compiled_out, compiled_grads) = results
        for key in ("loss", "contrastive", "reconstruction", "accuracy", "contrastive_weight"):
            assert torch.allclose(compiled_out[key], eager_out[key], rtol=1e-4, atol=1e-5), (seed, key)
        assert compiled_grads.keys() == eager_grads.keys()
        for name, grad in eager_grads.items():
            assert torch.allclose(compiled_grads[name], grad, rtol=1e-3, atol=1e-6), (seed, name)
        if seed == 0:
            compiled_frames = compiles["ok"]
            assert compiled_frames >= 2  # both stages went through the compiler
    assert eager_out["contrastive_weight"] > 0  # the schedule moved on from its zero weight meanwhile
    assert compiles["ok"] == compiled_frames  # new strings and weights reused the compiled stages
