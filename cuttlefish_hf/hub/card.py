"""The model card: README.md with the factorization table, totals, training notes and how to load the model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .._version import __version__
from ..surgery import FactorizationReport, factorization_report
from ..tables import render_table
from .record import is_timm_model, is_transformers_model
from .remote_code import REMOTE_CODE_FILE, auto_class_names

__all__ = ["model_card", "write_model_card"]

_CARD_START, _CARD_END = "<!-- cuttlefish:start -->", "<!-- cuttlefish:end -->"
NO_REPO_ID = "path/to/folder-or-repo-id"


def _notes_markdown(training_notes: str | Mapping | None) -> str:
    if training_notes is None:
        return "Not recorded."
    if isinstance(training_notes, Mapping):
        return "\n".join(f"- **{key}**: {value}" for key, value in training_notes.items())
    return str(training_notes).strip()


def _table(report: FactorizationReport) -> str:
    show_srank = any(layer.stable_rank is not None for layer in report.layers)
    srank_column = ["stable rank"] if show_srank else []
    header = ["layer", "shape", *srank_column, "rank", "params (dense)", "params (factorized)"]
    rows = [[f"`{layer.name}`", "x".join(map(str, layer.shape)),
             *(["" if layer.stable_rank is None else f"{layer.stable_rank:.1f}"] if show_srank else []),
             layer.rank, f"{layer.params_before:,}", f"{layer.params_after:,}"] for layer in report.layers]
    rows.append(["**total**", "", *([""] if show_srank else []), "", f"**{report.target_params_before:,}**",
                 f"**{report.target_params_after:,}**"])
    return render_table(header, rows, align="ll" + "r" * (len(header) - 2), markdown=True)


def _load_snippet(source: Any, repo_id: str, library_name: str) -> str:
    if library_name == "timm":
        return ("```python\nfrom cuttlefish_hf.hub import load_timm\n\n"
                f'model = load_timm("hf-hub:{repo_id}")\n```\n\n'
                f'`timm.create_model("hf-hub:{repo_id}", pretrained=True)` fails: timm cannot rebuild the '
                "factorized layers by itself.")
    autos = auto_class_names(source) if is_transformers_model(source) else []
    auto = autos[0] if autos else "AutoModel"
    return ("```python\nimport cuttlefish_hf  # registers the loader of factorized checkpoints\n"
            f"from transformers import {auto}\n\n"
            f'model = {auto}.from_pretrained("{repo_id}")\n```\n\n'
            f'Without cuttlefish_hf: `{auto}.from_pretrained("{repo_id}", trust_remote_code=True)` runs the '
            f"`{REMOTE_CODE_FILE}` of this repository. With neither, transformers only warns that quantization "
            'method "cuttlefish" is unknown and initializes the factorized layers randomly.')


def _card_section(source: Any, training_notes: str | Mapping | None, repo_id: str, library_name: str) -> str:
    report = source if isinstance(source, FactorizationReport) else factorization_report(source)
    ratio = report.model_params_before / max(report.model_params_after, 1)
    return "\n".join([
        _CARD_START,
        "## Cuttlefish low-rank factorization",
        "",
        (f"Made with `cuttlefish_hf` {__version__} ([Cuttlefish](https://arxiv.org/abs/2305.02538) low-rank "
         f"training): {len(report.layers)} layers are stored as two low-rank factors, `first` (rank x in) and "
         "`second` (out x rank)."),
        "",
        _table(report),
        "",
        (f"Factorized layers: {report.target_params_before:,} -> {report.target_params_after:,} parameters. "
         f"Whole model: {report.model_params_before:,} -> {report.model_params_after:,} parameters "
         f"({ratio:.2f}x smaller)."),
        "",
        "### How it was trained",
        "",
        _notes_markdown(training_notes),
        "",
        "### How to load",
        "",
        _load_snippet(source, repo_id, library_name),
        _CARD_END,
    ])


def model_card(source: nn.Module | FactorizationReport, training_notes: str | Mapping | None = None, *,
               repo_id: str | None = None, library_name: str | None = None) -> str:
    """A model card (README.md text) with the factorization table, totals, training notes and loading code.

    ``source`` is the factorized model, or a :class:`FactorizationReport` (e.g. ``controller.report``, which also
    has the stable ranks). ``training_notes`` is markdown or a ``{name: value}`` mapping.

    Example:
        >>> print(model_card(model, {"task": "SST-2", "epochs": 3}, repo_id="me/bert-cuttlefish"))  # doctest: +SKIP
    """
    from huggingface_hub import ModelCardData

    library_name = library_name or ("timm" if is_timm_model(source) else "transformers")
    tags = ["cuttlefish", "low-rank"] + (["image-classification", "timm"] if library_name == "timm" else [])
    data = ModelCardData(library_name=library_name, tags=tags)
    title = repo_id.rsplit("/", 1)[-1] if repo_id else "Cuttlefish low-rank model"
    body = _card_section(source, training_notes, repo_id or NO_REPO_ID, library_name)
    return f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{body}\n"


def write_model_card(source: nn.Module | FactorizationReport, folder: str | Path,
                     training_notes: str | Mapping | None = None, *, repo_id: str | None = None,
                     library_name: str | None = None) -> Path:
    """Write README.md into ``folder``; an existing card (e.g. ``Trainer.create_model_card``'s) keeps its text and
    gets the Cuttlefish section added, or replaced if it has one."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        path.write_text(model_card(source, training_notes, repo_id=repo_id, library_name=library_name),
                        encoding="utf-8")
        return path
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    library_name = library_name or card.data.library_name or ("timm" if is_timm_model(source) else "transformers")
    section = _card_section(source, training_notes, repo_id or NO_REPO_ID, library_name)
    text = card.text
    if _CARD_START in text and _CARD_END in text:
        start, end = text.index(_CARD_START), text.index(_CARD_END) + len(_CARD_END)
        text = text[:start] + section + text[end:]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    card.text = text
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), "cuttlefish", "low-rank"]))
    card.save(path)
    return path
