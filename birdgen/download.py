"""`birdgen data download`: fetch, verify and unpack the official CUB-200-2011 archive."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from .utils import writing

ARCHIVE_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
ARCHIVE_MD5 = "97eceeb196236b17998738112f37df78"
ARCHIVE_NAME = "CUB_200_2011.tgz"
CONNECT_TIMEOUT_S = 15


class DownloadError(RuntimeError):
    """The download or extraction failed; the message says what to do, in one line."""


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, destination: Path, expected_md5: str, timeout: float = CONNECT_TIMEOUT_S) -> Path:
    """Downloads url to destination, resuming a partial `.part` file; verifies the MD5.
    A partial file that turns out corrupt is deleted, so the next try starts clean."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the partial file is already complete
            response = None
        else:
            raise DownloadError(f"{url}: HTTP {error.code} {error.reason}; {manual_hint(destination)}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(f"cannot reach {url} ({reason}); {manual_hint(destination)}") from None
    if response is not None:
        with response:
            resumed = response.status == 206
            total = response.length + (offset if resumed else 0) if response.length else None
            mode = "ab" if resumed else "wb"
            # a full disk keeps what arrived: the partial file is where the next run resumes from
            with writing(partial, "the download (what arrived is kept; free some space and run it again)"), \
                    open(partial, mode) as handle, tqdm(total=total, initial=offset if resumed else 0, unit="B",
                                                        unit_scale=True, desc=f"Downloading {destination.name}") as bar:
                while block := response.read(1 << 20):
                    handle.write(block)
                    bar.update(len(block))
    actual = md5sum(partial)
    if actual != expected_md5:
        partial.unlink()
        raise DownloadError(f"{destination}: MD5 {actual} does not match the published {expected_md5}; the broken"
                            " download was deleted, run the command again")
    os.replace(partial, destination)
    return destination


def manual_hint(destination: Path) -> str:
    return (f"download {ARCHIVE_URL} by hand (MD5 {ARCHIVE_MD5}) and put it at {destination}, then run"
            f" `birdgen data download --dest {destination.parent}` again")


def extract(archive: Path, dest: Path) -> Path:
    """Unpacks the archive into dest (CUB_200_2011/ appears inside); refuses unsafe paths."""
    root = dest / "CUB_200_2011"
    staging = dest / ".CUB_200_2011.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, OSError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"{archive}: cannot extract ({error}); delete it and download again") from None
    found = next(staging.rglob("images.txt"), None)
    if found is None:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"{archive}: holds no CUB_200_2011/images.txt; is it the right archive?")
    if root.exists():
        shutil.rmtree(root)
    os.replace(found.parent, root)
    shutil.rmtree(staging, ignore_errors=True)
    return root


def download(dest: str | os.PathLike, url: str | None = None, expected_md5: str = ARCHIVE_MD5) -> Path:
    """Gets CUB_200_2011 into dest: uses dest/CUB_200_2011.tgz if present and intact, else downloads it."""
    dest = Path(dest)
    url = url or ARCHIVE_URL
    archive = dest / ARCHIVE_NAME
    if archive.is_file() and md5sum(archive) != expected_md5:
        raise DownloadError(f"{archive}: MD5 does not match the published {expected_md5}; delete it and try again")
    if not archive.is_file():
        fetch(url, archive, expected_md5)
    return extract(archive, dest)
