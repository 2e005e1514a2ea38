"""Pushing a bundle to the Hugging Face Hub and fetching it back, over `huggingface_hub`.

    push_bundle("runs/gift-cards/bundle", "me/ulmrec-gift-cards")   -> commit URL
    download_bundle("me/ulmrec-gift-cards")                          -> local folder

The endpoint is huggingface_hub's own (HF_ENDPOINT, default https://huggingface.co) and the
token is resolved by huggingface_hub too: the `token` argument, else HF_TOKEN, else the
`hf auth login` cache. This module never reads, prints or stores a token itself. Every
failure the user can act on (offline, not authorised, no such repo, no network) comes out as
one `HubError` with a short message that says what to do.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                    OfflineModeIsEnabled, RepositoryNotFoundError,
                                    RevisionNotFoundError)

from .bundle_format import BundleError, Manifest, verify_bundle
from .hubcard import machine_paths
from .paths import is_offline

log = logging.getLogger(__name__)

LOGIN_HINT = "set HF_TOKEN or run `hf auth login`"


class HubError(Exception):
    """A Hub upload or download that failed for a reason the user can act on."""


def hub_endpoint() -> str:
    """HF_ENDPOINT as set now, else huggingface_hub's configured endpoint.

    huggingface_hub reads HF_ENDPOINT once, at import; reading it again here means an endpoint
    exported after import (a mirror, a test server) is still the one used."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The network error classes of whichever HTTP client this huggingface_hub uses: httpx2
    (huggingface_hub 2.x), httpx (1.x) or requests (0.x)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()


def push_bundle(folder: str | Path, repo_id: str, private: bool = False,
                commit_message: str | None = None, token: str | None = None) -> str:
    """Upload a verified bundle folder to the model repo `repo_id` as one commit; its URL.

    The repo is created if needed (`private` only applies then: the Hub keeps an existing
    repo's visibility). Raises BundleError for an incomplete or corrupt folder, or one whose
    files name a path of this machine, before any request; HubError for offline /
    unauthorised / unreachable / refused (e.g. invalid card metadata)."""
    folder = Path(folder)
    manifest = verify_bundle(folder)
    found = machine_paths(folder)
    if found:  # a path of this machine means nothing on the Hub (and says where you work)
        raise BundleError(f"{folder}: {', '.join(found)} name(s) a path of this machine "
                          f"({next(iter(found.values()))}/…); re-export the bundle with this version "
                          "of `python -m train.export`, which writes Hub ids and relative paths")
    endpoint = hub_endpoint()
    if is_offline():
        raise HubError(f"HF_HUB_OFFLINE is set: cannot push to {repo_id} while offline "
                       "(unset it or set HF_HUB_OFFLINE=0)")
    message = commit_message or default_commit_message(folder, manifest)
    api = HfApi(endpoint=endpoint, token=token, library_name="ulmrec")
    log.info("pushing %s to %s/%s", folder, endpoint, repo_id)
    with _hub_errors(repo_id, endpoint, write=True), warnings.catch_warnings():
        # A bundle carries parquet tables on purpose; the client's "data file in a model repo?"
        # warning would only confuse.
        warnings.filterwarnings("ignore", message=".*commit a data file", category=UserWarning)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                 commit_message=message)
    log.info("pushed %s: %s", repo_id, info.commit_url)
    return info.commit_url


def download_bundle(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """The verified local folder of a bundle repo, from the HF cache or downloaded into it.

    With HF_HUB_OFFLINE set only the local cache is used (HubError when it is not there).
    """
    endpoint = hub_endpoint()
    offline = is_offline()
    with _hub_errors(repo_id, endpoint, write=False, revision=revision):
        path = snapshot_download(repo_id, repo_type="model", revision=revision, token=token,
                                 endpoint=endpoint, local_files_only=offline)
    folder = Path(path)
    try:
        verify_bundle(folder)
    except BundleError as e:
        raise BundleError(f"{repo_id} (revision {revision or 'main'}): {e}") from None
    return folder


def default_commit_message(folder: Path, manifest: Manifest) -> str:
    """'ULMRec bundle for <dataset>: Rank NDCG@10 x, Overall NDCG@10 y' (metrics when readable)."""
    head = f"ULMRec bundle for {manifest.name}"
    scores = headline_metrics(folder / "metrics.json", manifest.run)
    return f"{head}: {scores}" if scores else head


def headline_metrics(path: Path, run: object = None) -> str | None:
    """'Rank NDCG@10 x, Overall NDCG@10 y' of the bundle's system, None when not available.

    The system is the manifest's `run` when metrics.json has it, else the first one that is
    not a baseline (the retriever's own order, the untuned backbone)."""
    try:
        results = json.loads(path.read_text()).get("results") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(results, dict):
        return None
    name = run if isinstance(run, str) and run in results else next(
        (n for n in results if not n.startswith(("retriever", "backbone"))), None)
    res = results.get(name) if name is not None else None
    try:
        return (f"Rank NDCG@10 {float(res['rank']['NDCG@10']):.4f}, "
                f"Overall NDCG@10 {float(res['overall']['NDCG@10']):.4f}")
    except (KeyError, TypeError, ValueError):
        return None


@contextmanager
def _hub_errors(repo_id: str, endpoint: str, write: bool, revision: str | None = None) -> Iterator[None]:
    """huggingface_hub / HTTP client exceptions → one HubError with a message the user can act on.

    Messages name the repo and endpoint, never the request headers (the token lives there)."""
    try:
        yield
    except HFValidationError:
        raise HubError(f"{repo_id!r} is not a Hub repo id: expected 'user/name'") from None
    except OfflineModeIsEnabled:
        raise HubError(f"HF_HUB_OFFLINE is set: cannot reach {endpoint} for {repo_id} "
                       "(unset it or set HF_HUB_OFFLINE=0)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id}: no revision {revision or 'main'!r} on {endpoint}") from None
    except LocalEntryNotFoundError as e:
        # snapshot_download falls back to the cache on any failure and, when that misses too,
        # raises this with the real reason (if any) as its cause.
        cause = e.__cause__
        if isinstance(cause, HfHubHTTPError):
            raise _http_error(cause, repo_id, endpoint, write) from None
        if _is_connection_error(cause) and not isinstance(cause, OfflineModeIsEnabled):
            raise HubError(f"cannot reach {endpoint} ({_reason(cause)}) and {repo_id} is not "
                           "in the local HF cache: check the network or HF_ENDPOINT") from None
        raise HubError(f"{repo_id} is not in the local HF cache ({constants.HF_HUB_CACHE}) and "
                       "HF_HUB_OFFLINE is set (offline): download it once online") from None
    except HfHubHTTPError as e:
        raise _http_error(e, repo_id, endpoint, write) from None
    except ValueError as e:
        # upload_folder has the Hub validate README.md's YAML first and raises ValueError
        if "metadata" not in str(e):
            raise
        cause = e.__cause__
        detail = (getattr(cause, "server_message", None) or str(cause or e)).strip().splitlines()
        raise HubError(f"{endpoint} refused the model card (README.md) of {repo_id}: "
                       f"{detail[-1] if detail else e}") from None
    except TRANSPORT_ERRORS as e:
        raise HubError(f"cannot reach {endpoint} ({_reason(e)}): check the network or HF_ENDPOINT") from None


def _http_error(e: HfHubHTTPError, repo_id: str, endpoint: str, write: bool) -> HubError:
    status = e.response.status_code if e.response is not None else None
    if write and status in (401, 403):
        return HubError(f"not authorised to write {repo_id} on {endpoint}: {LOGIN_HINT} "
                        "with a token that has write access")
    if isinstance(e, RepositoryNotFoundError) or status == 404:
        return HubError(f"{repo_id}: repository not found on {endpoint} (if it is private, {LOGIN_HINT})")
    if status in (401, 403):
        return HubError(f"not authorised to read {repo_id} on {endpoint}: {LOGIN_HINT}")
    detail = f": {e.server_message.strip().splitlines()[0]}" if e.server_message else ""
    return HubError(f"{endpoint} answered HTTP {status} for {repo_id}{detail}")


def _is_connection_error(e: BaseException | None) -> bool:
    return isinstance(e, TRANSPORT_ERRORS)


def _reason(e: BaseException | None) -> str:
    """First line of a network error, or its class name when it has no text."""
    text = str(e).strip().splitlines()[0] if e is not None and str(e).strip() else ""
    return text or type(e).__name__
