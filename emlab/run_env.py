"""A run's environment record (``env.json``: versions, git commit, seeds) and credential redaction.

Public names are re-exported by :mod:`emlab.runs`.

>>> redact({"api_key": "abc", "max_new_tokens": 600})
{'api_key': '<redacted>', 'max_new_tokens': 600}
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import random
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from emlab.run_files import RUN_FORMAT, to_jsonable

__all__ = [
    "PACKAGES",
    "REDACTED",
    "environment_record",
    "git_state",
    "package_versions",
    "redact",
    "scrub",
    "secret_parameter_warnings",
    "secret_values",
    "seed_everything",
]

REDACTED = "<redacted>"
#: The packages whose versions a run's env.json records (:func:`package_versions`).
PACKAGES = ("torch", "transformers", "peft", "trl", "nnsight", "openai", "emlab")


# ---------------------------------------------------------------------------------------------
# Redaction

_SECRET_WORDS = frozenset(
    {"key", "apikey", "token", "secret", "password", "passwd", "passphrase", "credential", "credentials"}
)
_SECRET_VALUE = re.compile(r"^\s*sk-[A-Za-z0-9_\-]+\s*$|sk-[A-Za-z0-9_\-]{20,}|hf_[A-Za-z0-9]{30,}")


def _key_words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)  # apiKey -> api Key
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def _is_secret_key(key: str) -> bool:
    words = _key_words(key)
    return any(w in _SECRET_WORDS for w in words) or "".join(words).endswith(("apikey", "password"))


def redact(obj: Any, *, _secret: bool = False) -> Any:
    """Return a copy of ``obj`` with credentials replaced by ``"<redacted>"``.

    Strings are redacted when their key names a credential (a word of the key is ``key``,
    ``token``, ``secret``, ``password``..., as in ``openai_api_key``, ``hf_token``, ``apiKey``; all
    strings nested under such a key too), and wherever they look like an API key (``sk-...``,
    ``hf_...``). Numbers are kept, so counts such as ``max_new_tokens`` or ``key_layer`` survive.

    >>> redact({"api_key": "abc", "max_new_tokens": 600, "judge": {"url": "sk-123"}})
    {'api_key': '<redacted>', 'max_new_tokens': 600, 'judge': {'url': '<redacted>'}}
    """
    if isinstance(obj, Mapping):
        return {k: redact(v, _secret=_secret or _is_secret_key(str(k))) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, _secret=_secret) for v in obj]
    if isinstance(obj, str) and (_secret or _SECRET_VALUE.search(obj)):
        return REDACTED
    return obj


def secret_values(obj: Any, *, _secret: bool = False) -> list[str]:
    """The strings of ``obj`` that :func:`redact` would hide (to scrub them from text emlab writes).

    >>> secret_values({"openai_api_key": "sk-test-123", "seed": 0, "judge": "gpt-4o"})
    ['sk-test-123']
    """
    found: list[str] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            found += secret_values(v, _secret=_secret or _is_secret_key(str(k)))
    elif isinstance(obj, list | tuple):
        for v in obj:
            found += secret_values(v, _secret=_secret)
    elif isinstance(obj, str) and obj.strip() and (_secret or _SECRET_VALUE.search(obj)):
        found.append(obj)
    return found


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each secret in ``text`` (raw or JSON-escaped) by ``<redacted>``.

    >>> scrub('key = "sk-test-123"', ["sk-test-123"])
    'key = "<redacted>"'
    """
    for value in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
        escaped = json.dumps(value)[1:-1]
        if escaped != value:
            text = text.replace(escaped, REDACTED)
    return text


def secret_parameter_warnings(parameters: Mapping[str, Any]) -> list[str]:
    """One warning per parameter that carries a credential, pointing to the environment variable.

    A parameter is a credential when its name says so (``openai_api_key``, ``hf_token``) or its value
    looks like a key (``sk-...``, ``hf_...``). Values are never repeated in the message.

    >>> secret_parameter_warnings({"openai_api_key": "sk-test-abc"})[0].split(":")[0]
    'parameter openai_api_key holds a credential'
    """
    out = []
    for name, value in parameters.items():
        if not secret_values({name: value}):
            continue
        if _is_secret_key(name):
            env = re.sub(r"[^A-Za-z0-9]+", "_", name).upper()
        else:
            env = "HF_TOKEN" if "hf_" in json.dumps(to_jsonable(value)) else "OPENAI_API_KEY"
        out.append(
            f"parameter {name} holds a credential: set it in the environment instead "
            f"(export {env}=...; emlab's judge reads OPENAI_API_KEY). It is redacted ({REDACTED}) "
            "in everything emlab writes and prints."
        )
    return out



# ---------------------------------------------------------------------------------------------
# Environment


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None where not installed; emlab from its source when not installed).

    >>> package_versions(["emlab"])["emlab"] is not None
    True
    """
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if "emlab" in versions and versions["emlab"] is None:
        from emlab.version import __version__

        versions["emlab"] = __version__
    return versions


def git_state(folder: Path) -> dict[str, Any]:
    """The git commit and dirty flag of the repository holding ``folder`` (None values outside one)."""
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _find_seeds(obj: Any, prefix: str = "") -> dict[str, Any]:
    seeds: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            where = f"{prefix}.{k}" if prefix else str(k)
            if "seed" in str(k).lower() and (v is None or isinstance(v, int | list | tuple)):
                seeds[where] = v
            else:
                seeds.update(_find_seeds(v, where))
    return seeds


def seed_everything(seed: int) -> None:
    """Seed Python's ``random`` and, when already imported, numpy and torch."""
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def environment_record(name: str, seed: int | None, config: dict) -> dict[str, Any]:
    """The ``env.json`` of a new run ``name``: format, start time, seeds (``seed`` and those found in
    ``config``), Python, platform, :func:`package_versions`, :func:`git_state` of emlab's repository, argv."""
    repo = Path(__file__).resolve().parent.parent
    return {
        "format": RUN_FORMAT,
        "name": name,
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seed": seed,
        "config_seeds": _find_seeds(config),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": package_versions(),
        "git": git_state(repo),
        "argv": list(sys.argv),
        "notes": [],
    }
