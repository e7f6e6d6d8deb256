"""Saved fits: a directory of settings (JSON) with the factors or M-FAC's gradients (safetensors), checked on load
against the model's layers and :func:`weights_digest`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed.fsdp import whole
from .. import __version__
from ..kronecker.store import FactorFileError, FactorStore
from .arguments import InfluenceArguments
from .fitting import Fit

__all__ = ["FACTORS_FILE", "MFAC_FILE", "SETTINGS_FILE", "check_saved", "load_factors", "load_mfac_gradients",
           "read_settings", "save_fit", "saved_arguments", "saved_fit", "weights_digest"]

logger = logging.getLogger("kfac")

SETTINGS_FILE = "influence.json"
FACTORS_FILE = "factors.safetensors"
MFAC_FILE = "mfac_gradients.safetensors"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (hex) over every parameter of ``model`` in ``named_parameters()`` order: its name, shape and values
    as float64 bytes on the CPU (one parameter at a time). Deterministic across runs, devices and parameter dtypes
    that hold the same values, and across shardings (an FSDP2 parameter is gathered whole, one at a time: a
    collective); buffers are not included."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)};".encode())
        digest.update(whole(p.detach()).to("cpu", torch.float64).contiguous().numpy())  # type: ignore[arg-type]
    return digest.hexdigest()


def save_fit(path: str | Path, *, args: InfluenceArguments, fit: Fit, shapes: Mapping[str, Iterable[int]],
             store: FactorStore | None, mfac_grads: Mapping[str, Tensor] | None) -> None:
    """Write ``store`` (if given), ``mfac_grads`` (if given) and the settings (last, atomically) into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if store is not None:
        store.save(path / FACTORS_FILE)
    if mfac_grads is not None:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in mfac_grads.items()}, str(path / MFAC_FILE))
    settings = {"format": "kfac.influence", "version": 1, "kfac_version": __version__,
                "arguments": dataclasses.asdict(args), "layers": {n: list(s) for n, s in shapes.items()},
                "damping": fit.damping, "rows_per_example": fit.rows_per_example, "examples": fit.examples,
                "weights_sha256": fit.weights_sha256}
    tmp = path / (SETTINGS_FILE + ".tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    tmp.replace(path / SETTINGS_FILE)


def read_settings(path: Path) -> dict[str, Any]:
    """The settings saved in directory ``path``; :class:`FactorFileError` if missing, unreadable or foreign."""
    try:
        settings = json.loads((path / SETTINGS_FILE).read_text())
    except FileNotFoundError:
        raise FactorFileError(f"{path}: no {SETTINGS_FILE} (not a saved InfluenceAnalyzer)") from None
    except (OSError, ValueError) as exc:
        raise FactorFileError(f"{path / SETTINGS_FILE}: unreadable ({exc})") from exc
    if settings.get("format") != "kfac.influence":
        raise FactorFileError(f"{path / SETTINGS_FILE}: not a kfac.influence settings file")
    return settings


def saved_arguments(settings: Mapping[str, Any]) -> InfluenceArguments:
    """The :class:`InfluenceArguments` of saved settings (other keys are ignored; a field added after the file was
    written takes its default, which reproduces what the older version did)."""
    saved = settings["arguments"]
    return InfluenceArguments(**{f.name: saved[f.name] for f in dataclasses.fields(InfluenceArguments)
                                 if f.name in saved})


def check_saved(settings: Mapping[str, Any], path: Path, shapes: Mapping[str, Iterable[int]], model: nn.Module, *,
                check_weights: bool) -> None:
    """``ValueError`` unless the saved fit is for these layer shapes and (``check_weights``) ``model``'s weights;
    a fit saved without a weights digest is accepted with a logged warning."""
    expected = {n: list(s) for n, s in shapes.items()}
    if settings["layers"] != expected:
        raise ValueError(f"influence state in {path} was fitted for other layers/shapes: saved "
                         f"{settings['layers']}, this model has {expected}")
    saved = settings.get("weights_sha256")
    if saved is None:
        logger.warning("influence: %s has no weights checksum (saved by an older kfac): cannot check that the "
                       "model has the weights the fit was made on", path)
    elif check_weights and saved != weights_digest(model):
        raise ValueError(f"influence state in {path} was fitted on other weights than this model's (parameter "
                         "checksum mismatch): load the weights the fit was made on, or refit with fit() on "
                         "these weights; pass check_weights=False to load it anyway")


def saved_fit(settings: Mapping[str, Any]) -> Fit:
    """The :class:`~kfac.influence.fitting.Fit` recorded in saved settings."""
    return Fit(damping={n: float(v) for n, v in settings["damping"].items()},
               rows_per_example=settings.get("rows_per_example", {}), examples=settings["examples"],
               weights_sha256=settings.get("weights_sha256"))


def load_factors(path: Path, store: FactorStore) -> None:
    """Load the saved factors into ``store`` (validated by :meth:`FactorStore.load`)."""
    loaded = FactorStore.load(path / FACTORS_FILE)
    store.load_state_dict(loaded.state_dict())


def load_mfac_gradients(path: Path, layers: Iterable[str]) -> dict[str, Tensor]:
    """The saved M-FAC gradients of ``layers``; :class:`FactorFileError` if unreadable."""
    from safetensors.torch import load_file

    try:
        grads = load_file(str(path / MFAC_FILE))
    except Exception as exc:
        raise FactorFileError(f"{path / MFAC_FILE}: unreadable ({exc})") from exc
    return {n: grads[n] for n in layers}
