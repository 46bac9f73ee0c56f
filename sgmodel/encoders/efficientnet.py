"""EfficientNet-Lite image encoder (architecture from `efficientnet-lite-pytorch`), cut after one block,
with a fast inference path that folds BatchNorm into the convolutions."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from sgdata.format.errors import UserError
from sgmodel.config import ImageEncoderConfig
from sgmodel.encoders.base import ImageEncoder, kaiming_init, seeded
from sgmodel.encoders.weights import describe_weights, missing_extra, resolve_weights_path

class EfficientNetLiteImageEncoder(ImageEncoder):
    """EfficientNet-Lite (architecture from `efficientnet-lite-pytorch`) cut after one MBConv block.

    Only the stem and blocks 0..`efficientnet_block` are kept (later blocks, head and classifier are
    dropped), so nothing is computed or stored that the token grid does not use. Inputs in [-1, 1]
    (mean = std = 0.5) match the preprocessing of the TF-Lite originals these weights come from.
    Convolutions use TF "same" padding computed per input, so any image size works.
    """

    def __init__(self, cfg: ImageEncoderConfig, seed: int = 0):
        super().__init__(cfg.freeze_image_encoder)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise missing_extra("the efficientnet_lite image encoder") from None
        spec = cfg.image_encoder_path
        found = re.search(r"lite(\d)", spec.lower())
        self.variant = f"lite{found.group(1)}" if found else "lite0"
        with seeded(seed):
            net = EfficientNet.from_name(f"efficientnet-{self.variant}", image_size=None)
            if not spec:
                kaiming_init(net)
        total = len(net._blocks)
        if not 0 <= cfg.efficientnet_block < total:
            raise UserError(f"efficientnet_block must be in 0..{total - 1}, got {cfg.efficientnet_block}")
        self.block = cfg.efficientnet_block
        self.stem = net._conv_stem
        self.stem_norm = net._bn0
        self.activation = net._swish
        self.blocks = nn.ModuleList(net._blocks[: self.block + 1])
        self.drop_connect_rate = net._global_params.drop_connect_rate
        self.total_blocks = total
        self.out_dim = int(self.blocks[-1]._block_args.output_filters)
        self.image_size = tuple(cfg.image_size)
        if spec:
            path = resolve_weights_path(spec, "image encoder")
            self._load_state_dict_file(path)
            self.weights = describe_weights(path, spec)
        else:
            self.weights = f"random(seed={seed})"
        self.freeze_if_configured()

    def _own_names(self) -> dict[str, str]:
        """Our parameter names -> the names in the package's full-network state dict."""
        names = {}
        for name in self.state_dict():
            if name.startswith("stem."):
                names[name] = "_conv_stem." + name[len("stem.") :]
            elif name.startswith("stem_norm."):
                names[name] = "_bn0." + name[len("stem_norm.") :]
            elif name.startswith("blocks."):
                names[name] = "_blocks." + name[len("blocks.") :]
        return names

    def _load_state_dict_file(self, path: Path) -> None:
        if not path.is_file():
            raise UserError(f"the efficientnet_lite weights {str(path)!r} must be a .pth state-dict file")
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing here
            raise UserError(f"the efficientnet_lite weights {str(path)!r} could not be read: {err}") from None
        if isinstance(stored, dict) and "state_dict" in stored:
            stored = stored["state_dict"]
        names = self._own_names()
        missing = [theirs for theirs in names.values() if theirs not in stored]
        if missing:
            raise UserError(
                f"{str(path)!r} is not an EfficientNet-{self.variant} state dict ({len(missing)} tensors missing, "
                f"e.g. {missing[0]})"
            )
        mine = {ours: stored[theirs] for ours, theirs in names.items()}
        try:
            self.load_state_dict(mine, strict=True)
        except RuntimeError as err:
            reason = str(err).splitlines()[-1].strip()
            raise UserError(f"{str(path)!r} does not fit EfficientNet-{self.variant}: {reason}") from None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if not self.training and not torch.is_grad_enabled() and self._foldable():
            return self._encode_folded(images)
        x = self.activation(self.stem_norm(self.stem(images)))
        for idx, block in enumerate(self.blocks):
            # stochastic depth grows with depth in the full network; keep that schedule when fine-tuning
            x = block(x, drop_connect_rate=self.drop_connect_rate * idx / self.total_blocks)
        return x.flatten(2).transpose(1, 2)  # (B, h*w, C)

    # ---- the inference path: BatchNorm folded into the convolutions ------------------------------
    # A frozen encoder (and any encoder at evaluation) only ever runs BatchNorm with its stored
    # statistics, i.e. as a per-channel affine map that can be folded into the preceding convolution.
    # Together with channels-last activations, in-place ReLU6 and padding worked out once per call
    # instead of per layer, this makes feature extraction several times faster on a CPU (the package's
    # layers pad dynamically and run BatchNorm as separate memory-bound passes). Same numbers up to
    # float rounding; tests/sgmodel/test_model_encoders.py checks the two paths agree.

    def _foldable(self) -> bool:
        relu6 = isinstance(self.activation, nn.ReLU6) and all(isinstance(b._swish, nn.ReLU6) for b in self.blocks)
        return relu6 and not any(b.has_se for b in self.blocks)

    def _folded_plan(self, device: torch.device, dtype: torch.dtype) -> list:
        """[(kind, weight, bias, stride, kernel, skip)] with BatchNorm folded in; rebuilt whenever a weight
        or statistic changes (every in-place update bumps a tensor's version counter)."""
        tensors = list(self.parameters()) + list(self.buffers())
        key = (device, dtype, tuple(t._version for t in tensors), tuple(t.data_ptr() for t in tensors))
        cached = getattr(self, "_plan_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = [("stem", *_fold_batchnorm(self.stem, self.stem_norm), self.stem.stride[0], self.stem.kernel_size[0], False)]
        for block in self.blocks:
            args = block._block_args
            if args.expand_ratio != 1:
                plan.append(("pointwise_act", *_fold_batchnorm(block._expand_conv, block._bn0), 1, 1, False))
            conv = block._depthwise_conv
            plan.append(("depthwise", *_fold_batchnorm(conv, block._bn1), conv.stride[0], conv.kernel_size[0], False))
            skip = block.id_skip and args.stride == 1 and args.input_filters == args.output_filters
            plan.append(("project", *_fold_batchnorm(block._project_conv, block._bn2), 1, 1, skip))
        plan = [(kind, w.to(device, dtype).contiguous(memory_format=torch.channels_last), b.to(device, dtype), s, k, skip)
                for kind, w, b, s, k, skip in plan]
        object.__setattr__(self, "_plan_cache", (key, plan))  # a plain attribute: not a parameter or buffer
        return plan

    def _encode_folded(self, images: torch.Tensor) -> torch.Tensor:
        x = images.contiguous(memory_format=torch.channels_last)  # (B, 3, H, W), NHWC in memory
        block_input = x
        for kind, weight, bias, stride, kernel, skip in self._folded_plan(x.device, x.dtype):
            if kind in ("stem", "depthwise"):
                x = _conv_same(x, weight, bias, stride, kernel, groups=1 if kind == "stem" else x.shape[1])
                x = torch.nn.functional.hardtanh_(x, 0.0, 6.0)  # ReLU6
                if kind == "stem":
                    block_input = x
            elif kind == "pointwise_act":
                x = torch.nn.functional.hardtanh_(torch.nn.functional.conv2d(x, weight, bias), 0.0, 6.0)
            else:  # project: linear bottleneck, then the residual
                x = torch.nn.functional.conv2d(x, weight, bias)
                if skip:
                    x = x.add_(block_input)
                block_input = x
        b, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, h*w, C): free for channels-last memory

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        h, w = image_size
        strides = [self.stem.stride[0]] + [block._depthwise_conv.stride[0] for block in self.blocks]
        for s in strides:  # TF "same" padding: out = ceil(in / stride)
            h, w = -(-h // s), -(-w // s)
        return h, w

    def identity(self) -> str:
        return (
            f"efficientnet_{self.variant}|{self.weights}|block={self.block}|"
            f"size={self.image_size[0]}x{self.image_size[1]}"
        )


def _fold_batchnorm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """conv followed by BatchNorm in eval mode -> one (weight, bias) (torch's own fusion arithmetic)."""
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)
    return weight.detach(), bias.detach()


def _conv_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, kernel: int, groups: int) -> torch.Tensor:
    """Convolution with TF "same" padding (out = ceil(in / stride)), as the weights were trained with.

    Where TF pads one pixel more at the bottom/right (stride 2 on an even size), padding the input
    explicitly would copy the whole activation; instead the kernel gets a leading row/column of zeros
    and the convolution pads symmetrically by one more: the same windows, the same output.
    """
    pads, taps = [], [0, 0, 0, 0]  # symmetric padding per dim; zero taps to prepend as F.pad's (w, w, h, h)
    for dim, size in enumerate(x.shape[-2:]):
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        pads.append(total // 2 + total % 2)
        if total % 2:
            taps[2 - 2 * dim] = 1  # one zero tap before the kernel in this dim (index 2 for H, 0 for W)
    if any(taps):
        weight = torch.nn.functional.pad(weight, taps).contiguous(memory_format=torch.channels_last)
    return torch.nn.functional.conv2d(x, weight, bias, stride, tuple(pads), 1, groups)
