"""MovieLens-100K from whichever copy is reachable, always verified against pinned digests.

Sources are tried in a fixed order and the one that served is logged and recorded:
1. `data.path` (a folder with u.data/u.user/u.item, or an ml-100k.zip);
2. the `METAREC_ML100K` environment variable (same forms);
3. the local cache `<workdir>/<data.cache_dir or data/raw>/ml-100k/`;
4. a download of the GroupLens zip (`data.url` overrides the address), extracted into the cache;
5. the copy shipped inside the PyPI wheel recbole==1.2.1 (fetched with pip, never installed).
A source that is absent or unreachable passes to the next one; a source that is present but wrong
(digest mismatch, unsafe archive, bad encoding) stops the run, because silently serving another
copy would hide a corrupted input.

`release_year` is the film's year as written in its title ("Toy Story (1995)"), falling back to the
year of the release date when the title has none. The RecBole copy carries only that title year, so
deriving it the same way from the GroupLens files makes every source yield the same item split
(the release date's year differs from the title's for 190 of the 1,682 films).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from metarec.data.schema import MOVIELENS_SPEC, AttrSpec, RatingData
from metarec.data.validate import canonical_checksum, coerce_float, coerce_int, decode_text, split_lines, validate
from metarec.errors import DataError

URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
FILES = ("u.data", "u.user", "u.item")
FILE_SHA256 = {
    "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
}
# sha256 over the sorted ratings, see validate.canonical_checksum; equal for every source.
CANONICAL_SHA256 = "6cfffb52c89b05fbc3afb75f6912eeda04c81c2add0dc58e773a0ef6c8adb160"
RECBOLE_REQ = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/ml-100k."
# Bounds checked before decompressing: the GroupLens zip is about 5 MB, its largest file about 2 MB.
MAX_MEMBER_BYTES = 32 << 20
MAX_ARCHIVE_BYTES = 128 << 20

GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western")
OCCUPATIONS: tuple[str, ...] = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
    "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer",
    "retired", "salesman", "scientist", "student", "technician", "writer")
ALLOWED = {"gender": ("M", "F"), "occupation": OCCUPATIONS}
_MONTHS = {m: i + 1 for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep",
                                           "Oct", "Nov", "Dec"))}
_TITLE_YEAR = re.compile(r"\((\d{4})\)")
# What this source declares beyond the raw columns: the zip region (first digit of a US zip code), a
# stratum for the audit only; models keep seeing the raw zip.
SOURCE_SPEC = replace(MOVIELENS_SPEC, derived=(AttrSpec("zip_region", "categorical"),))

Log = Callable[[str], None]


class Unavailable(Exception):
    """This source is absent or unreachable; try the next one."""


# ----------------------------------------------------------------------------- parsing


def _title_year(title: str) -> float:
    years = _TITLE_YEAR.findall(title)
    return float(years[-1]) if years else float("nan")


def parse_grouplens(raw: dict[str, bytes], where: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """u.data / u.user / u.item bytes to the three RatingData tables (unvalidated ids)."""
    data = split_lines(decode_text(raw["u.data"], f"{where}/u.data", "utf-8"), "\t", 4, f"{where}/u.data",
                       ["user_id", "item_id", "rating", "timestamp"])
    users = split_lines(decode_text(raw["u.user"], f"{where}/u.user", "utf-8"), "|", 5, f"{where}/u.user",
                        ["user_id", "age", "gender", "occupation", "zip"])
    users["age"] = coerce_int(users["age"], f"{where}/u.user", "age", "an integer age")
    item_cols = ["item_id", "title", "release date", "video release date", "IMDb URL"] + list(GENRES)
    raw_items = split_lines(decode_text(raw["u.item"], f"{where}/u.item", "latin-1"), "|", len(item_cols),
                            f"{where}/u.item", item_cols)
    flags = raw_items[list(GENRES)].to_numpy()
    bad = ~np.isin(flags, ["0", "1"])
    if bad.any():
        row, col = (int(x) for x in np.argwhere(bad)[0])
        raise DataError(f"{where}/u.item: genre column {GENRES[col]!r}, data row {row + 1} has "
                        f"{flags[row, col]!r}; expected 0 or 1")
    names = np.array(GENRES, dtype=object)
    genres = ["|".join(names[f == "1"]) for f in flags]
    dates = [_parse_date(s, f"{where}/u.item", i + 1) for i, s in enumerate(raw_items["release date"])]
    release_date = pd.to_datetime(pd.Series(dates, dtype=object), format="%Y-%m-%d")
    title_year = raw_items["title"].map(_title_year).to_numpy(dtype=float)
    date_year = release_date.dt.year.to_numpy(dtype=float)
    items = pd.DataFrame({
        "item_id": raw_items["item_id"],
        "title": raw_items["title"].str.strip().astype(object),
        "release_date": release_date.astype("datetime64[ns]"),
        "release_year": np.where(np.isnan(title_year), date_year, title_year),
        "genres": pd.Series(genres, dtype=object),
    })
    return data, _clean_users(users), items


def _parse_date(text: str, file: str, row: int) -> str | None:
    text = text.strip()
    if not text:
        return None
    parts = text.split("-")
    if len(parts) == 3 and parts[0].isdigit() and parts[1] in _MONTHS and parts[2].isdigit() and len(parts[2]) == 4:
        return f"{int(parts[2]):04d}-{_MONTHS[parts[1]]:02d}-{int(parts[0]):02d}"
    raise DataError(f"{file}: column 'release date', data row {row} has {text!r}; expected dd-Mon-yyyy "
                    f"(e.g. 01-Jan-1995) or empty")


def zip_region(zips: pd.Series) -> pd.Series:
    """First digit of a US zip code (the postal region); non-numeric -> "other", missing -> "unknown".

    ML-100K holds a few Canadian postal codes (letters first), which map to "other".
    """
    def one(z: object) -> str:
        text = "" if z is None or (isinstance(z, float) and np.isnan(z)) else str(z).strip()
        if not text:
            return "unknown"
        return text[0] if text[0].isdigit() else "other"

    return pd.Series([one(z) for z in zips], index=zips.index, dtype=object)


def _clean_users(users: pd.DataFrame) -> pd.DataFrame:
    for col in ("gender", "occupation", "zip"):
        users[col] = users[col].astype(object).map(lambda v: v.strip() if isinstance(v, str) else v)
    return users


def _atomic_table(text: str, file: str) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated, header fields `name:type`."""
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{file}: empty file; expected a RecBole atomic file with a typed header")
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    return split_lines("\n".join(lines[1:]), "\t", len(header), file, header)


def parse_recbole(raw: dict[str, bytes], where: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """RecBole's ml-100k.{inter,user,item} to the same tables as the GroupLens files.

    RecBole keeps the ratings and users verbatim but strips the year from titles into
    `release_year`, joins genres with spaces and has no release dates (release_date is NaT). Two
    of its rows are malformed and are repaired from the title: item 267 reads 'unkonwn' and item
    1412 (title "... (1995) (V)") has release_year 'V'.
    """
    name = lambda ext: f"{where}!{RECBOLE_PREFIX}{ext}"
    inter = _atomic_table(decode_text(raw["inter"], name("inter"), "utf-8"), name("inter"))
    users = _atomic_table(decode_text(raw["user"], name("user"), "utf-8"), name("user"))
    items = _atomic_table(decode_text(raw["item"], name("item"), "utf-8"), name("item"))
    inter["timestamp"] = coerce_float(inter["timestamp"], name("inter"), "timestamp", "a timestamp")
    inter["timestamp"] = coerce_int(inter["timestamp"], name("inter"), "timestamp", "an integer timestamp")
    users = users.rename(columns={"zip_code": "zip"})
    users["age"] = coerce_int(users["age"], name("user"), "age", "an integer age")
    order = {g: i for i, g in enumerate(GENRES)}
    genres = []
    for pos, value in enumerate(items["class"]):
        found = value.split()
        unknown = [g for g in found if g not in order]
        if unknown:
            raise DataError(f"{name('item')}: column 'class', data row {pos + 1} has genre {unknown[0]!r}; "
                            f"expected names from u.genre")
        genres.append("|".join(sorted(found, key=order.__getitem__)))
    year = pd.to_numeric(items["release_year"], errors="coerce").to_numpy(dtype=float)
    title_year = items["movie_title"].map(_title_year).to_numpy(dtype=float)
    items = pd.DataFrame({
        "item_id": items["item_id"],
        "title": items["movie_title"].astype(object),
        "release_date": pd.Series(pd.NaT, index=items.index, dtype="datetime64[ns]"),
        "release_year": np.where(np.isnan(year), title_year, year),
        "genres": pd.Series(genres, dtype=object),
    })
    return inter, _clean_users(users), items


# ----------------------------------------------------------------------------- sources


def _check_zip_members(zf: zipfile.ZipFile, target: Path, label: str) -> None:
    """Refuse archives with entries that would land outside `target` (zip-slip) or that declare more
    bytes than MovieLens-100K could hold (a zip bomb), before anything is decompressed."""
    root = target.resolve()
    total = 0
    for info in zf.infolist():
        dest = (root / info.filename).resolve()
        if not dest.is_relative_to(root):
            raise DataError(f"{label}: archive entry {info.filename!r} would extract to {dest}, outside {root}; "
                            f"expected every entry inside the target folder (zip-slip), refusing the archive")
        if info.file_size > MAX_MEMBER_BYTES:
            raise DataError(f"{label}: archive entry {info.filename!r} declares {info.file_size} bytes "
                            f"uncompressed; expected at most {MAX_MEMBER_BYTES} per entry (the largest "
                            f"MovieLens-100K file is about 2 MB), refusing the archive")
        total += info.file_size
    if total > MAX_ARCHIVE_BYTES:
        raise DataError(f"{label}: archive declares {total} bytes uncompressed in all; expected at most "
                        f"{MAX_ARCHIVE_BYTES}, refusing the archive")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, label: str) -> bytes:
    """One entry read in bounded chunks; zipfile stops at the declared size and checks the CRC, so a
    stream that inflates beyond what the entry declares fails here instead of filling memory."""
    out = bytearray()
    try:
        with zf.open(info) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                out += block
                if len(out) > info.file_size:
                    raise zipfile.BadZipFile("entry inflates beyond its declared size")
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{label}: archive entry {info.filename!r} is corrupt ({exc}); expected the GroupLens "
                        f"ml-100k.zip") from None
    return bytes(out)


def _read_dir(folder: Path) -> dict[str, bytes]:
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise Unavailable(f"{folder} has no {', '.join(missing)}")
    return {f: (folder / f).read_bytes() for f in FILES}


def _read_zip(path: Path) -> dict[str, bytes]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable zip archive ({exc}); expected the GroupLens ml-100k.zip") from None
    with zf:
        _check_zip_members(zf, path.parent / path.stem, str(path))
        found: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if base in FILES and info.filename.count("/") <= 1:
                found.setdefault(base, info)
        missing = [f for f in FILES if f not in found]
        if missing:
            raise DataError(f"{path}: archive has no {', '.join(missing)}; expected u.data, u.user and u.item "
                            f"(optionally under ml-100k/)")
        return {f: _read_member(zf, found[f], str(path)) for f in FILES}


def _read_location(location: str | os.PathLike) -> dict[str, bytes]:
    path = Path(location).expanduser()
    if path.is_dir():
        if (path / "u.data").exists() or not (path / "ml-100k.zip").is_file():
            return _read_dir(path)
        return _read_zip(path / "ml-100k.zip")
    if path.is_file() and path.suffix == ".zip":
        return _read_zip(path)
    raise Unavailable(f"{path} does not exist" if not path.exists() else f"{path} is neither a folder nor a .zip")


def _verify_files(raw: dict[str, bytes], where: str, verify: bool) -> dict[str, str]:
    digests = {f: hashlib.sha256(raw[f]).hexdigest() for f in FILES}
    if verify:
        for f in FILES:
            if digests[f] != FILE_SHA256[f]:
                raise DataError(f"{where}/{f}: SHA-256 mismatch, expected {FILE_SHA256[f]}, got {digests[f]}; "
                                f"the file is not the GroupLens MovieLens-100K release")
    return digests


def _download(url: str, cache: Path, timeout: float, log: Log) -> Path:
    """Fetch the zip and extract it into the cache, only after every entry is checked."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            payload = resp.read(MAX_ARCHIVE_BYTES + 1)
    except Exception as exc:  # network errors come in many types; all mean "unavailable"
        raise Unavailable(f"download of {url} failed: {exc}") from None
    if len(payload) > MAX_ARCHIVE_BYTES:
        raise DataError(f"{url}: the download exceeds {MAX_ARCHIVE_BYTES} bytes; expected the GroupLens "
                        f"ml-100k.zip (about 5 MB)")
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".ml-100k-") as tmp:
        try:
            zf = zipfile.ZipFile(io.BytesIO(payload))
        except zipfile.BadZipFile:
            raise DataError(f"{url}: the download is not a zip archive ({len(payload)} bytes); "
                            f"expected the GroupLens ml-100k.zip") from None
        with zf:
            _check_zip_members(zf, Path(tmp), url)
            for info in zf.infolist():
                dest = Path(tmp) / info.filename
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(_read_member(zf, info, url))
        found = [p.parent for p in Path(tmp).rglob("u.data")]
        if not found:
            raise DataError(f"{url}: archive has no u.data; expected the GroupLens ml-100k.zip")
        _verify_files(_read_dir(found[0]), url, True)
        shutil.copytree(found[0], cache, dirs_exist_ok=True)
    log(f"data: downloaded {url} into {cache}")
    return cache


def _fetch_recbole(timeout: float, log: Log) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="metarec-recbole-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", RECBOLE_REQ,
               "-d", tmp, "--quiet", "--disable-pip-version-check"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"pip download {RECBOLE_REQ} failed: {exc}") from None
        wheel = Path(tmp) / RECBOLE_WHEEL
        if proc.returncode != 0 or not wheel.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"pip download {RECBOLE_REQ} failed (exit {proc.returncode}): {tail[0]}")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != RECBOLE_WHEEL_SHA256:
            raise DataError(f"{RECBOLE_WHEEL}: SHA-256 mismatch, expected {RECBOLE_WHEEL_SHA256}, got {digest}")
        with zipfile.ZipFile(wheel) as zf:
            raw = {ext: zf.read(RECBOLE_PREFIX + ext) for ext in ("inter", "user", "item")}
    log(f"data: fetched {RECBOLE_WHEEL} from the package index (sha256 verified)")
    return raw


def load_movielens(cfg: dict, *, workdir: str | Path = ".", log: Log = print) -> RatingData:
    """Load, verify and validate MovieLens-100K from the first source that has it."""
    verify = bool(cfg.get("verify_checksums", True))
    cache = Path(workdir) / cfg.get("cache_dir", "data/raw") / "ml-100k"
    tried: list[str] = []
    candidates: list[tuple[str, Callable[[], tuple[dict[str, bytes], str]]]] = []
    if cfg.get("path"):
        given = Path(cfg["path"]).expanduser()
        given = given if given.is_absolute() else Path(workdir) / given  # relative to params.yaml's folder
        candidates.append(("data.path", lambda: (_read_location(given), str(given))))
    else:
        tried.append("data.path: not set")
    env = os.environ.get("METAREC_ML100K")
    if env:
        candidates.append(("METAREC_ML100K", lambda: (_read_location(env), env)))
    else:
        tried.append("METAREC_ML100K: not set")
    candidates.append(("cache", lambda: (_read_dir(cache), str(cache))))
    url = str(cfg.get("url", URL))
    timeout = float(cfg.get("timeout", 30))
    candidates.append(("download", lambda: (_read_dir(_download(url, cache, timeout, log)), url)))

    for source, fetch in candidates:
        try:
            raw, where = fetch()
        except Unavailable as exc:
            tried.append(f"{source}: {exc}")
            continue
        ratings, users, items = parse_grouplens(raw, where)  # decoding first names a bad byte precisely
        digests = _verify_files(raw, where, verify)
        names = {"ratings": f"{where}/u.data", "users": f"{where}/u.user", "items": f"{where}/u.item"}
        prov = {"source": source, "location": where, "files": {f: digests[f] for f in FILES},
                "checksums_verified": verify}
        return _finish(ratings, users, items, prov, names, where + "/u.data", verify, cfg, log)

    if cfg.get("pypi_fallback", True):
        try:
            raw = _fetch_recbole(float(cfg.get("pip_timeout", 300)), log)
        except Unavailable as exc:
            tried.append(f"pypi {RECBOLE_REQ}: {exc}")
        else:
            ratings, users, items = parse_recbole(raw, RECBOLE_WHEEL)
            names = {k: f"{RECBOLE_WHEEL}!{RECBOLE_PREFIX}{e}" for k, e in
                     (("ratings", "inter"), ("users", "user"), ("items", "item"))}
            prov = {"source": "pypi", "location": f"{RECBOLE_REQ} ({RECBOLE_WHEEL})",
                    "wheel_sha256": RECBOLE_WHEEL_SHA256,
                    "files": {f"ml-100k.{e}": hashlib.sha256(raw[e]).hexdigest() for e in raw},
                    "checksums_verified": True}
            return _finish(ratings, users, items, prov, names, names["ratings"], True, cfg, log)
    else:
        tried.append("pypi: disabled by data.pypi_fallback")
    raise DataError("MovieLens-100K could not be loaded from any source (" + "; ".join(tried) + "); "
                    "set data.path or METAREC_ML100K to a folder with u.data, u.user and u.item "
                    f"(or the ml-100k.zip), or place those files in {cache}")


def _finish(ratings: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame, prov: dict, names: dict,
            ratings_file: str, verify: bool, cfg: dict, log: Log) -> RatingData:
    data = RatingData(ratings=ratings, users=users, items=items, spec=MOVIELENS_SPEC,
                      source="movielens-100k", provenance=prov)
    data = validate(data, duplicates=cfg.get("duplicates", "error"), names=names, allowed=ALLOWED, log=log)
    data.users["zip_region"] = zip_region(data.users["zip"])
    data.spec = SOURCE_SPEC
    canonical = canonical_checksum(data.ratings)
    if verify and canonical != CANONICAL_SHA256:
        raise DataError(f"{ratings_file}: canonical ratings SHA-256 mismatch, expected {CANONICAL_SHA256}, "
                        f"got {canonical}; the ratings differ from MovieLens-100K")
    data.provenance["canonical_sha256"] = canonical
    log(f"data: MovieLens-100K served by {prov['source']} ({prov['location']}), "
        f"{len(data.ratings)} ratings, canonical sha256 {canonical[:12]}")
    return data
