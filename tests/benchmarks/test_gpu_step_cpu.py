"""The GPU step benchmark's plumbing on a CPU: both sides built, stepped, counted and written as rows.

The public implementation is stood in for by a minimal fake checkout written here, with the same module
layout and names the benchmark uses (option.parser, model.encoders with BertModel.from_pretrained and
timm's load_custom_pretrained / default_cfgs, model.cross_modal_attention.CrossModalAttentionRecon,
loss.cma_loss.CMA_Loss). Its hub calls raise: the run only passes if the benchmark's shims replaced them.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_step

FAKE = {
    "option.py": '''
        import argparse

        class _Parser:
            """Reads any --flag [value] list (the real parser declares ~150 flags)."""
            def parse_args(self, argv):
                ns, i = argparse.Namespace(), 0
                while i < len(argv):
                    name = argv[i][2:]
                    if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                        value, i = argv[i + 1], i + 2
                        try:
                            value = float(value) if "." in value or "e" in value else int(value)
                        except ValueError:
                            pass
                    else:
                        value, i = True, i + 1
                    setattr(ns, name, value)
                for name, default in dict(margin=0.1, cma_mining="hard", cma_detach_img_target=False, i_t_weight=0.0,
                                          info_temperature=1.0, cm_i_weight=1.0, size_p_weight=0.0).items():
                    if not hasattr(ns, name):
                        setattr(ns, name, default)
                return ns

        parser = _Parser()

        def verify_input_args(args):
            return args
    ''',
    "model/__init__.py": "",
    "loss/__init__.py": "",
    "model/encoders.py": '''
        import torch
        from torch import nn

        class BertModel:
            @staticmethod
            def from_pretrained(name):
                raise RuntimeError("the fake hub was called: the benchmark's BertModel shim is missing")

        def load_custom_pretrained(model, cfg):
            raise RuntimeError("the fake hub was called: the benchmark's load_custom_pretrained shim is missing")

        default_cfgs = None

        class EncoderImage(nn.Module):
            def __init__(self, args):
                super().__init__()
                if default_cfgs != {}:
                    raise RuntimeError("default_cfgs was not replaced")
                self.img_backbone = nn.Conv2d(3, 16, 8, stride=8)
                load_custom_pretrained(self.img_backbone, {})
                self.spm = nn.Linear(16, args.embed_dim)
                self.slots = nn.Parameter(torch.randn(4, args.embed_dim))

            def forward(self, images):
                feat = self.img_backbone(images).flatten(2).transpose(1, 2)  # (B, N, 16)
                attn = torch.einsum("sd,bnd->bsn", self.slots, self.spm(feat)).softmax(dim=1)
                return attn @ self.spm(feat), feat  # (B, S, D), (B, N, 16)

        class EncoderText(nn.Module):
            def __init__(self, args):
                super().__init__()
                self.bert = BertModel.from_pretrained("bert-base-uncased")
                self.linear = nn.Linear(self.bert.config.hidden_size, args.embed_dim)

            def forward(self, ids, lengths):
                hidden = self.bert(ids, (ids != 0).float())[0]
                return self.linear(hidden[:, :1]), hidden[:, 0]  # (B, 1, D), (B, H)

        class ImageTextEncodersRecon(nn.Module):
            def __init__(self, args):
                super().__init__()
                self.img_enc = EncoderImage(args)
                self.txt_enc = EncoderText(args)
    ''',
    "model/cross_modal_attention.py": '''
        import torch
        from torch import nn

        class CrossModalAttentionRecon(nn.Module):
            def __init__(self, encoders, in_dim, args):
                super().__init__()
                self.encoders = encoders
                self.cma = nn.Linear(in_dim, in_dim)
                self.decoder = nn.Linear(in_dim, 16)

            def forward(self, images, sentences, txt_len):
                slots, feat = self.encoders.img_enc(images)
                txt, bert = self.encoders.txt_enc(sentences, txt_len)
                cm = self.cma(slots.mean(1)[:, None] + txt[None, :, 0])  # (B_img, B_txt, D)
                recon = self.decoder(slots.mean(1))[:, None].expand_as(feat)
                return torch.nn.functional.normalize(cm, dim=-1), slots, txt, recon, feat, bert
    ''',
    "loss/cma_loss.py": '''
        import torch
        from torch import nn

        class CMA_Loss(nn.Module):
            def __init__(self, **kwargs):
                super().__init__()

            def forward(self, cm_emb, txt_emb, img_emb, txt_bert=None):
                sim = torch.einsum("bd,ibd->bi", txt_emb[:, 0].detach(), cm_emb)
                loss = nn.functional.cross_entropy(sim, torch.arange(sim.shape[0]))
                return loss, {"cm_loss": loss}
    ''',
}


@pytest.fixture()
def fake_checkout(tmp_path) -> Path:
    root = tmp_path / "SaG"
    for name, text in FAKE.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_cpu_smoke_builds_both_sides_and_writes_gpu_step_rows(fake_checkout, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"loader": {"value": 1.0}}))  # rows already there are kept
    code = gpu_step.main(["--cpu-smoke", "--public-sag", str(fake_checkout), "--results", str(results), "--batches", "2,3",
                          "--warmup", "1", "--steps", "2", "--compile-mode", "none", "--loader-workers", "0"])
    assert code == 0
    rows = json.loads(results.read_text())
    assert rows["loader"] == {"value": 1.0}
    assert set(rows) == {"loader", "gpu_step_b2", "gpu_step_b3"}
    for b in (2, 3):
        row = rows[f"gpu_step_b{b}"]
        assert row["batch"] == b and row["mode"] == "cpu-smoke" and row["device"] == "cpu"
        assert row["value"] > 0 and row["limit_or_baseline"] > 0
        assert row["ratio"] == pytest.approx(row["value"] / row["limit_or_baseline"], rel=1e-3, abs=5e-5)  # the row rounds it to 4 decimals
        # sgmodel's tiny configuration does far more work per step than the fake's few layers
        assert row["flop_per_step"]["sgmodel"] > row["flop_per_step"]["public"] > 0
        assert row["fraction_of_peak"] == {"sgmodel": None, "public": None}  # a CPU has no entry in the peak table
    assert rows["gpu_step_b3"]["flop_per_step"]["sgmodel"] > rows["gpu_step_b2"]["flop_per_step"]["sgmodel"]
    table = capsys.readouterr().out
    assert "| 2 |" in table and "| 3 |" in table and "Device: cpu" in table


def test_shims_are_what_lets_the_public_code_build(fake_checkout):
    from benchmarks.public_sag import PublicSide, import_checkout

    with pytest.raises(RuntimeError, match="fake hub"):
        modules = import_checkout(fake_checkout)
        option = modules["option"]
        modules["model.encoders"].default_cfgs = {}
        modules["model.encoders"].ImageTextEncodersRecon(option.parser.parse_args(["--embed_dim", "8"]))
    side = PublicSide(fake_checkout, torch.device("cpu"), gpu_step.SMOKE_PUBLIC_FLAGS, gpu_step.SMOKE_BERT)
    assert side.model.encoders.txt_enc.bert.config.hidden_size == gpu_step.SMOKE_BERT["hidden_size"]
    assert len(side.optimizer.param_groups) == 5
    assert side.optimizer.param_groups[3]["lr"] == pytest.approx(1e-6)  # the backbone at 0.1x the published 1e-5


def test_peak_table_prefers_the_specific_device_name():
    assert gpu_step.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_step.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_step.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_step.peak_tflops("NVIDIA L40S") == 362.0 and gpu_step.peak_tflops("NVIDIA L4") == 121.0
    assert gpu_step.peak_tflops("Some Future Accelerator") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_a_gpu_it_says_so_in_one_sentence(capsys):
    assert gpu_step.main(["--public-sag", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has none" in err
