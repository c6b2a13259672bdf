"""Backbone specs that name a Hugging Face hub model (`org/name`, optionally `@revision`),
resolved with `huggingface_hub` into its cache and loaded from there like a local
checkpoint directory.

Only what loading needs is fetched: configs, safetensors weights, tokenizer and processor
files. A repository whose weights are only pickled (`.bin`) is refused: nothing is
unpickled, and no repository's own code runs (`trust_remote_code` is never set). With
`HF_HUB_OFFLINE=1` the id resolves from the cache alone, or says in one line that it is not
cached.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
FETCHED = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "spiece*", "vocab*",
           "merges*"]
"""Configs, weights, and the tokenizer and image-processor files: never `*.bin` or code."""


def is_hub_id(part: str) -> bool:
    """Whether one part of a backbone spec names a hub model rather than a local folder."""
    return not Path(part).exists() and HUB_ID.match(part) is not None


def resolve(part: str) -> tuple[Path, str]:
    """The local snapshot folder of hub id `part` and the commit it resolved to."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = part.partition("@")
    offline = constants.HF_HUB_OFFLINE
    try:
        folder = Path(snapshot_download(repo_id, revision=revision or None,
                                        allow_patterns=FETCHED, local_files_only=offline))
    except RevisionNotFoundError:
        raise ConfigError(f"{part}: the hub has no revision {revision!r} of {repo_id}") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{part}: no such model on the hub (or it is private)") from None
    except LocalEntryNotFoundError:
        where = f"revision {revision!r} of {repo_id}" if revision else repo_id
        raise ConfigError(f"{part}: {where} is not in the Hugging Face cache "
                          f"({constants.HF_HUB_CACHE})"
                          + (" and HF_HUB_OFFLINE=1 forbids fetching it" if offline else "")
                          ) from None
    except (HfHubHTTPError, OSError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{part}: cannot fetch it ({first_line})") from None
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{part}: no safetensors weights (a repository with only .bin "
                          "weights is refused: pickled weights are never loaded)")
    return folder, folder.name
