"""Upload a staged folder: repo-id and token checks up front, then ``create_repo`` + one ``upload_folder``.

The token is whatever huggingface_hub finds itself (``HF_TOKEN``, the file ``hf auth login`` writes,
...), read through ``huggingface_hub.get_token()`` and handed only to ``HfApi``: it is never printed,
logged, written, or left in an error message.
"""
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hub import PublishError, __version__

__all__ = ['check_repo_id', 'resolve_token', 'upload_folder']


def check_repo_id(repo_id: str) -> str:
    """``ORG/NAME`` as the Hub accepts it: an owner is required, so nothing lands in a default namespace."""
    if not isinstance(repo_id, str) or repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise PublishError(f'repo id {repo_id!r}: expected ORG/NAME, e.g. advprop-zoo/efficientnet_b0_advprop.ap_in1k_zoo')
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PublishError(f'repo id {repo_id!r}: {str(e).splitlines()[0]}') from None
    return repo_id


def resolve_token() -> str:
    """The token a real upload needs; fails before any staging work if there is none or if offline."""
    if constants.HF_HUB_OFFLINE:
        raise PublishError('HF_HUB_OFFLINE is set: an upload needs the network; unset it, or stage only with --dry-run')
    try:
        token = get_token()
    except Exception as e:  # e.g. an OIDC exchange (HF_OIDC_RESOURCE) that failed: its reason, not a traceback
        raise PublishError(f'no Hugging Face token: {type(e).__name__}: {(str(e).splitlines() or [""])[0]}') from None
    if not token:
        raise PublishError('no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token), '
                           'or stage only with --dry-run')
    return token


def _scrub(text: str, token: str) -> str:
    return text.replace(token, '***') if token else text


def upload_folder(
        folder: Path,
        repo_id: str,
        token: str,
        commit_message: str,
        commit_description: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
) -> str:
    """Create the repo if needed (``private`` applies only then), the branch ``revision`` if needed, and
    commit every file of ``folder`` in one commit. Returns the commit URL."""
    api = HfApi(token=token, library_name='advprop-zoo', library_version=__version__)
    try:
        url = api.create_repo(repo_id, private=private, repo_type='model', exist_ok=True)
        repo_id = getattr(url, 'repo_id', None) or repo_id
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type='model', exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type='model',
            revision=revision,
            commit_message=commit_message,
            commit_description=commit_description,
        )
    except Exception as e:  # HTTP, auth, network: one line, and never the token
        first = (str(e).strip().splitlines() or [''])[0]
        raise PublishError(_scrub(f'upload to {repo_id} failed: {type(e).__name__}: {first}', token)) from None
    return str(getattr(info, 'commit_url', None) or getattr(info, 'oid', '') or f'https://huggingface.co/{repo_id}')
