"""Files from pinned URLs: download with a time limit and a checksum, cache, open protected archives.

The transport half of :mod:`emlab.fetch` (which re-exports every name here and holds the catalogue of
public question sets and datasets). Nothing here reaches the network without a time limit; offline,
the error names the URL and where to put the file. ``$EMLAB_UPSTREAM_URL`` replaces
``https://raw.githubusercontent.com`` (a mirror, or the tests' loopback server).

>>> download("https://example.org/a.jsonl", "/tmp/a.jsonl", timeout=10)     # doctest: +SKIP
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_TIMEOUT",
    "RAW_HOST",
    "FetchError",
    "UpstreamFile",
    "cache_dir",
    "decrypt_protected_zip",
    "download",
    "upstream_file",
    "zip_member",
]

#: raw file host of GitHub; ``$EMLAB_UPSTREAM_URL`` replaces it (mirror, tests).
RAW_HOST = "https://raw.githubusercontent.com"

DEFAULT_TIMEOUT = 60.0


class FetchError(RuntimeError):
    """A download or conversion that failed; the message names the URL and what to do."""


@dataclass(frozen=True)
class UpstreamFile:
    """One file of a public repository at a pinned commit."""

    repo: str
    ref: str
    path: str
    sha256: str | None = None  # known digest of the file at ``ref``, checked after download

    def url(self, base_url: str | None = None) -> str:
        """The raw URL of the file (``base_url`` or ``$EMLAB_UPSTREAM_URL`` replaces GitHub's raw host).

        >>> UpstreamFile("a/b", "0123", "x/y.yaml").url("http://127.0.0.1:8000")
        'http://127.0.0.1:8000/a/b/0123/x/y.yaml'
        """
        base = (base_url or os.environ.get("EMLAB_UPSTREAM_URL") or RAW_HOST).rstrip("/")
        return f"{base}/{self.repo}/{self.ref}/{self.path}"

    @property
    def pinned(self) -> bool:
        """True when ``ref`` is a full commit hash (the bytes cannot change)."""
        return re.fullmatch(r"[0-9a-f]{40}", self.ref) is not None



def cache_dir() -> Path:
    """``$EMLAB_CACHE/upstream``, else ``~/.cache/emlab/upstream``.

    >>> cache_dir().name
    'upstream'
    """
    base = os.environ.get("EMLAB_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "emlab") / "upstream"


# ---------------------------------------------------------------------------------------------
# Download


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, timeout: float = DEFAULT_TIMEOUT,
             where_to_put: str | os.PathLike | None = None) -> str:
    """Download ``url`` to ``dest`` atomically and return its sha256; raise :class:`FetchError` otherwise.

    ``timeout`` bounds the whole transfer (connection, every read and the total), so a server that
    stalls cannot hang a study. A wrong ``sha256``, an HTTP error, a Git LFS pointer instead of the
    file, or no network give an error naming the URL and where the file can be put by hand
    (``where_to_put``, default ``dest``).

    >>> download("https://example.org/a.jsonl", "/tmp/a.jsonl", timeout=10)     # doctest: +SKIP
    '3f2a...'
    """
    dest = Path(dest)
    manual = f"download it by hand and put it at {Path(where_to_put or dest)}"
    deadline = time.monotonic() + timeout
    digest = hashlib.sha256()
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "emlab"})
        with urllib.request.urlopen(request, timeout=timeout) as resp, open(tmp, "wb") as out:  # noqa: S310
            head = b""
            while chunk := resp.read(1 << 16):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"still downloading after {timeout:g} s")
                if len(head) < 200:
                    head += chunk[:200]
                digest.update(chunk)
                out.write(chunk)
        if head.startswith(b"version https://git-lfs.github.com/spec/"):
            raise FetchError(f"{url} is a Git LFS pointer, not the file; fetch it through Git LFS and {manual}")
        got = digest.hexdigest()
        if sha256 and got != sha256:
            raise FetchError(f"{url}: sha256 {got} does not match the pinned {sha256}; the file changed or the "
                             f"download is corrupt. Check the source, or {manual}")
        os.replace(tmp, dest)
        return got
    except FetchError:
        raise
    except urllib.error.HTTPError as e:
        raise FetchError(f"cannot download {url}: HTTP {e.code} {e.reason}; {manual}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise FetchError(f"cannot download {url} (offline, or the server did not answer within {timeout:g} s: "
                         f"{reason}); {manual}") from None
    finally:
        tmp.unlink(missing_ok=True)


def upstream_file(file: UpstreamFile, *, path: str | os.PathLike | None = None, base_url: str | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> Path:
    """A local copy of ``file``: ``path`` if given, else the cached copy, fetched on first use.

    The cache is keyed by repository and commit (``cache_dir()/<repo>/<ref>/<path>``), so a pinned file
    is downloaded once. Offline, :class:`FetchError` names the URL and the cache path to put it at.

    >>> upstream_file(BETLEY_QUESTIONS["first_plot"]).name       # doctest: +SKIP
    'first_plot_questions.yaml'
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file (expected a copy of {file.url(base_url)})")
        return p
    cached = cache_dir() / file.repo / file.ref / file.path
    if cached.is_file() and file.pinned:
        return cached
    download(file.url(base_url), cached, sha256=file.sha256, timeout=timeout)
    return cached


# ---------------------------------------------------------------------------------------------
# Unpacking the protected formats


def decrypt_protected_zip(data: bytes, password: str) -> zipfile.ZipFile:
    """Open an ``easy-dataset-share`` archive (``*.zip.enc``): 16-byte salt + Fernet token of a zip.

    The key is PBKDF2-HMAC-SHA256 of ``password`` (100,000 iterations, 32 bytes), as the model-organisms
    repository's ``easy-dataset-share unprotect-dir ... -p PASSWORD`` does; this avoids that tool's
    dependencies. A wrong password or a damaged file raises :class:`FetchError`.

    >>> decrypt_protected_zip(open("training_datasets.zip.enc", "rb").read(), MO_PASSWORD).namelist()  # doctest: +SKIP
    """
    from cryptography.fernet import Fernet, InvalidToken

    if len(data) < 17:
        raise FetchError("protected archive is too short to hold a salt and a token")
    salt, token = data[:16], data[16:]
    key = base64.urlsafe_b64encode(hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 100_000, dklen=32))
    try:
        plain = Fernet(key).decrypt(token)
    except InvalidToken:
        raise FetchError("cannot decrypt the archive: wrong password or damaged file") from None
    try:
        return zipfile.ZipFile(io.BytesIO(plain))
    except zipfile.BadZipFile as e:
        raise FetchError(f"the decrypted archive is not a zip file ({e})") from None


def zip_member(archive: zipfile.ZipFile, name: str, pwd: bytes | None, source: str) -> bytes:
    """The bytes of member ``name`` of ``archive`` (matched by full name or by its last path part; folders and
    ``__MACOSX`` left out), read with password ``pwd``; :class:`FetchError` names ``source`` when it cannot."""
    names = [n for n in archive.namelist() if not n.endswith("/") and not n.startswith("__MACOSX")]
    found = [n for n in names if n == name or n.endswith("/" + name)]
    if not found:
        raise FetchError(f"{source}: no member {name!r} in the archive (members: {', '.join(names[:20])})")
    try:
        return archive.read(found[0], pwd=pwd)
    except RuntimeError as e:  # zipfile: "Bad password for file"
        raise FetchError(f"{source}: cannot open {found[0]!r} in the archive: {e}") from None
    except NotImplementedError as e:  # AES-encrypted zip: stdlib reads ZipCrypto only
        raise FetchError(f"{source}: {found[0]!r} uses an encryption the zip module cannot read ({e})") from None
