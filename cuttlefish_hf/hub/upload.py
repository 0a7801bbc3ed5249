"""Upload a factorized model to the Hugging Face Hub: save it into a temporary folder, then push the folder."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping

from huggingface_hub import HfApi
from torch import nn

from .._version import __version__
from .save import save_pretrained

__all__ = ["push_to_hub"]


def push_to_hub(model: nn.Module, repo_id: str, *, training_notes: str | Mapping | None = None,
                commit_message: str = "Upload Cuttlefish low-rank model", private: bool | None = None,
                token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                remote_code: bool = True):
    """Save with :func:`save_pretrained` (weights, record, model card, custom code) and upload the folder.

    Works for transformers and timm models. Returns huggingface_hub's ``CommitInfo``.

    Example:
        >>> push_to_hub(model, "me/bert-sst2-cuttlefish", training_notes="SST-2, 3 epochs")  # doctest: +SKIP
    """
    api = HfApi(token=token, library_name="cuttlefish_hf", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, training_notes=training_notes, repo_id=repo_id, remote_code=remote_code)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr)
