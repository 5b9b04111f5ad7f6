"""A distilled draft stored as a small delta on its oracle.

`specd distill` makes two kinds of draft (DraftManifest.kind):
- "layers": the oracle's own embedding and output head over its first L decoder layers, with
  those layers and the final norm retrained to imitate the full oracle. It reads tokens alone.
- "features": one decoder layer over the oracle's hidden states (specd.models.feature_draft), which
  the oracle returns with each verdict: its final state, or several layers' (`feature_layers`).
Only the retrained tensors are stored; everything else is rebuilt from the oracle at load
time, so the artifact stays small and its vocabulary is the oracle's by construction.

The artifact is a directory:

    specd_draft.json        the manifest (DraftManifest): base oracle, layers, head, training record
    draft.safetensors       the retrained tensors, named as in the truncated oracle's state dict

`specd.models.loader.load_model` hands a directory holding the manifest to `load_draft_artifact`, so
the draft service loads an artifact by its path like any other model.

A draft may score only part of the vocabulary (`head_token_ids`): its output head is then the
oracle's tied embedding rows for those ids, and LoadedModel.head_token_ids maps head rows back
to shared token ids. Verification stays lossless; the draft simply never proposes other tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from specd.core.errors import IncompatiblePair, InvalidArgument
from specd.models.feature_draft import FeatureDraftModel
from specd.models.pretrained import LoadedModel, check_device, load_pretrained
from specd.models.sources import DRAFT_ARTIFACT_MANIFEST

FORMAT_VERSION = 1
WEIGHTS_FILE = "draft.safetensors"
KINDS = ("layers", "features")
# What a draft's held-out measurement is held to (`DraftManifest.goals`): its first guess is the oracle's token this
# often, and a block of GOAL_DEPTH keeps this share of its tokens (EAGLE-class drafts keep 0.7-0.8 per position).
AGREEMENT_GOAL = 0.75
BLOCK_ACCEPTANCE_GOAL = 0.55
GOAL_DEPTH = 4


@dataclass
class DraftManifest:
    """Contents of specd_draft.json."""

    base: str  # the oracle's model source, as load_model accepts it
    layers: int  # decoder layers kept from the oracle (and retrained); 1 for a feature draft
    vocab_fingerprint: str  # the oracle's; a rebuilt draft must match it
    head_token_ids: list[int] | None = None  # None: the head scores the whole vocabulary
    weights: str = WEIGHTS_FILE
    format: int = FORMAT_VERSION
    training: dict[str, Any] = field(default_factory=dict)  # seed, steps, tokens, held-out acceptance, ...
    kind: str = "layers"  # see the module docstring
    # A feature draft: the oracle hidden states it reads (empty: the final one) and whether it norms before its head.
    feature_layers: list[int] = field(default_factory=list)
    head_norm: bool = False

    @classmethod
    def read(cls, directory: Path) -> DraftManifest:
        path = directory / DRAFT_ARTIFACT_MANIFEST
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot read draft manifest {path}: {exc}") from exc
        if raw.get("format") != FORMAT_VERSION:
            raise InvalidArgument(f"{path}: unsupported draft format {raw.get('format')!r} (expected {FORMAT_VERSION})")
        known = set(cls.__dataclass_fields__)
        missing = {"base", "layers", "vocab_fingerprint"} - set(raw)
        if missing:
            raise InvalidArgument(f"{path}: missing fields {sorted(missing)}")
        if raw.get("kind", "layers") not in KINDS:
            raise InvalidArgument(f"{path}: unknown draft kind {raw.get('kind')!r} (known: {', '.join(KINDS)})")
        return cls(**{key: value for key, value in raw.items() if key in known})

    def goals(self) -> list[tuple[str, str, float | None, bool | None]]:
        """(goal, measured, value, passed) for the held-out figures in `training`; None where not measured."""
        figures = self.training
        agreement = figures.get("held_out_token_agreement")
        acceptance = figures.get("held_out_acceptance") if figures.get("k") == GOAL_DEPTH else None
        length = figures.get("held_out_mean_acceptance_length")
        return [
            (
                f"the draft's first guess is the oracle's token >= {AGREEMENT_GOAL:.2f} of the time (held out)",
                "not measured" if agreement is None else f"{agreement:.3f}",
                agreement,
                None if agreement is None else agreement >= AGREEMENT_GOAL,
            ),
            (
                f"a block of {GOAL_DEPTH} keeps >= {BLOCK_ACCEPTANCE_GOAL:.2f} of its tokens (held out, greedy)",
                "not measured" if acceptance is None else f"{acceptance:.3f} (mean acceptance length {length})",
                acceptance,
                None if acceptance is None else acceptance >= BLOCK_ACCEPTANCE_GOAL,
            ),
        ]

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(directory / DRAFT_ARTIFACT_MANIFEST, json.dumps(asdict(self), indent=2) + "\n")


def trained_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The tensors a distilled draft retrains: every kept decoder layer and the final norm
    (a feature draft: its fuse projection and layer).

    The embedding (and the output head tied to it) stays frozen and is not stored.
    """
    if isinstance(model, FeatureDraftModel):
        return model.trained_parameters()
    decoder = model.get_decoder()
    prefix = _decoder_prefix(model)
    params: dict[str, torch.nn.Parameter] = {}
    for name, param in decoder.named_parameters():
        if name.startswith("layers.") or name.startswith("norm."):
            params[f"{prefix}{name}"] = param
    if not any(name.startswith(f"{prefix}norm.") for name in params):
        raise InvalidArgument("the decoder has no final norm named 'norm'; distillation supports llama-style models")
    return params


def save_draft_artifact(
    directory: Path, model: torch.nn.Module, manifest: DraftManifest, *, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write the retrained tensors of `model` (a truncated oracle or a feature draft) and the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: param.detach().to("cpu", dtype).contiguous() for name, param in trained_parameters(model).items()}
    tmp = directory / f".{manifest.weights}.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": str(FORMAT_VERSION), "base": manifest.base})
    _make_readable(tmp)
    tmp.replace(directory / manifest.weights)
    manifest.write(directory)
    return directory


def load_draft_artifact(
    path: Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    max_context: int = 0,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Rebuild a distilled draft from its oracle, overlaid with the retrained tensors."""
    path = Path(path)
    torch_device = check_device(device)
    manifest = DraftManifest.read(path)
    features = manifest.kind == "features"
    layers = 0 if features else manifest.layers
    loaded = load_pretrained(manifest.base, dtype=dtype, device="cpu", layers=layers, cache_dir=cache_dir)
    if loaded.vocab_fingerprint != manifest.vocab_fingerprint:
        raise IncompatiblePair(
            f"draft {path} was distilled from an oracle with vocabulary {manifest.vocab_fingerprint[:12]}, "
            f"but {manifest.base!r} now has {loaded.vocab_fingerprint[:12]}"
        )
    head_ids = manifest.head_token_ids
    if head_ids is not None:
        _check_head_ids(head_ids, loaded.vocab_size)
    model = (
        FeatureDraftModel(loaded.model, head_ids, tuple(manifest.feature_layers), manifest.head_norm)
        if features else loaded.model
    )
    expected = trained_parameters(model)
    stored = load_file(str(path / manifest.weights))
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise InvalidArgument(
            f"{path / manifest.weights} does not fit {manifest.base} with {manifest.layers} layers "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, param in expected.items():
            if stored[name].shape != param.shape:
                raise InvalidArgument(f"{name}: stored shape {tuple(stored[name].shape)} != {tuple(param.shape)}")
            param.copy_(stored[name].to(param.dtype))
    if head_ids is not None and not features:
        slice_output_head(model, head_ids)
    model.to(device=torch_device, dtype=loaded.dtype).eval()
    context = loaded.max_context if not max_context else min(loaded.max_context, max_context)
    loaded.model = model
    shape = f"{manifest.layers} layers"
    if features:
        read = model.feature_layers
        shape = f"reads the oracle's hidden states {', '.join(map(str, read))}" if read else "reads the oracle's features"
    loaded.model_id = f"{path.name} (distilled from {manifest.base}, {shape})"
    loaded.feature_dim = model.hidden_size if features else 0
    loaded.feature_layers = model.feature_layers if features else ()
    loaded.head_token_ids = list(head_ids) if head_ids is not None else None
    loaded.max_context = context
    loaded.device = torch_device
    return loaded


def slice_output_head(model: torch.nn.Module, head_token_ids: list[int]) -> None:
    """Replace the output head by one that scores only `head_token_ids` (row i -> id head_token_ids[i]).

    The rows are copied from the current head, which for tied models is the input embedding,
    so the embedding itself is left whole (the draft must still read every token id).
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise InvalidArgument("a reduced draft head needs a bias-free linear output head")
    index = torch.tensor(head_token_ids, dtype=torch.long, device=head.weight.device)
    sliced = torch.nn.Linear(head.in_features, len(head_token_ids), bias=False)
    sliced.to(device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        sliced.weight.copy_(head.weight.index_select(0, index))
    sliced.weight.requires_grad_(False)
    model.set_output_embeddings(sliced)
    # The embedding and the head are no longer the same tensor; keep a later tie_weights() from undoing this.
    model.config.tie_word_embeddings = False


def _check_head_ids(head_ids: list[int], vocab_size: int) -> None:
    if not head_ids:
        raise InvalidArgument("head_token_ids is empty")
    if len(set(head_ids)) != len(head_ids) or any(not 0 <= t < vocab_size for t in head_ids):
        raise InvalidArgument(f"head_token_ids must be distinct token ids in [0, {vocab_size})")


def _decoder_prefix(model: torch.nn.Module) -> str:
    decoder = model.get_decoder()
    for name, module in model.named_modules():
        if module is decoder:
            return f"{name}." if name else ""
    raise InvalidArgument("cannot locate the decoder inside the model")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    _make_readable(tmp)
    tmp.replace(path)


def _make_readable(path: Path) -> None:
    """Give a written file the usual permissions (safetensors creates files readable by the owner only)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
