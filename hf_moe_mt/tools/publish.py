"""Publishing a finished export folder to the Hugging Face Hub with huggingface_hub (`create_repo` +
`upload_folder`). The folder is complete before anything is sent, so a failed push loses nothing: the error
says how to upload the same folder later."""

from __future__ import annotations

import os
from pathlib import Path


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload hf_moe_mt model") -> str:
    """Create `repo_id` (if needed) and upload `folder` to it; returns the repository URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} is not an exported model folder; run `hf-moe-mt export` first")
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"repository id {repo_id!r} is not NAME or OWNER/NAME")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=url.repo_id, folder_path=folder, repo_type="model", commit_message=commit_message)
    except Exception as error:  # offline mode, no network, no token, HTTP errors: all end the same way
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise ValueError(f"push to {repo_id} failed ({type(error).__name__}: {reason}); the model folder {folder} "
                         f"is complete: upload it later with `hf upload {repo_id} {folder}`") from None
    return str(url)
