"""Data sources on the real MovieLens-100K files: parsing, source order, download, PyPI, BYO tables."""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import re
import shutil
import socket
import threading
import zipfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metarec.data import movielens
from audit.config import check_command
from metarec.data.load import load_dataset
from metarec.data.schema import MOVIELENS_SPEC, AttrSpec
from metarec.errors import ConfigError, DataError

FILES = ("u.data", "u.user", "u.item")


def quiet(_msg: str) -> None:
    pass


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METAREC_ML100K", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def ml(ml100k_dir: Path):
    return load_dataset({"source": "movielens-100k", "path": str(ml100k_dir)}, log=quiet)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/ml-100k.zip"


class Server:
    """Serves one payload at any path on 127.0.0.1 from a background thread."""

    def __init__(self, payload: bytes) -> None:
        body = payload

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/ml-100k.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def make_zip(folder: Path, extra: dict[str, bytes] | None = None, replace: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in FILES + ("u.genre", "u.occupation"):
            data = (replace or {}).get(f, (folder / f).read_bytes())
            zf.writestr(f"ml-100k/{f}", data)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def independent_ratings_digest(folder: Path) -> str:
    rows = [tuple(int(x) for x in line.split("\t")) for line in (folder / "u.data").read_text().splitlines()]
    rows.sort(key=lambda r: (r[0], r[1]))
    return hashlib.sha256("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows).encode()).hexdigest()


# ----------------------------------------------------------------------------- GroupLens files


def test_shared_files_parse_to_the_documented_tables(ml, ml100k_dir: Path) -> None:
    assert (len(ml.ratings), len(ml.users), len(ml.items)) == (100_000, 943, 1_682)
    assert ml.spec == replace(MOVIELENS_SPEC, derived=(AttrSpec("zip_region", "categorical"),))
    assert ml.source == "movielens-100k"
    assert dict(ml.ratings.dtypes.astype(str)) == {"user_id": "int64", "item_id": "int64", "rating": "float64",
                                                   "timestamp": "int64"}
    assert list(ml.users.columns) == ["user_id", "age", "gender", "occupation", "zip", "zip_region"]
    assert ml.users["age"].dtype == np.int64
    assert list(ml.items.columns) == ["item_id", "title", "release_date", "release_year", "genres"]
    assert str(ml.items["release_date"].dtype).startswith("datetime64")
    assert ml.items["release_year"].dtype == np.float64
    assert ml.users["gender"].value_counts().to_dict() == {"M": 670, "F": 273}
    assert set(ml.users["zip"]) >= {"85711", "T8H1N"}  # zips stay strings
    unknown = ml.items.set_index("item_id").loc[267]
    assert pd.isna(unknown["release_date"]) and np.isnan(unknown["release_year"]) and unknown["genres"] == "unknown"
    toy = ml.items.set_index("item_id").loc[1]
    assert toy["release_date"] == pd.Timestamp("1995-01-01") and toy["genres"] == "Animation|Children's|Comedy"
    assert ml.items.set_index("item_id").loc[1373, "release_date"] == pd.Timestamp("1971-02-04")  # "4-Feb-1971"


def test_genre_counts_match_an_independent_parse_of_the_flags(ml, ml100k_dir: Path) -> None:
    names = [line.split("|")[0] for line in (ml100k_dir / "u.genre").read_text().splitlines() if line.strip()]
    expected: Counter[str] = Counter()
    with open(ml100k_dir / "u.item", encoding="latin-1", newline="") as fh:
        for row in csv.reader(fh, delimiter="|"):
            expected.update(n for n, flag in zip(names, row[-19:]) if flag == "1")
    got = Counter(g for value in ml.items["genres"] for g in value.split("|") if g)
    assert got == expected
    assert got["Drama"] == 725 and got["Comedy"] == 505 and got["unknown"] == 2


def test_release_year_is_the_title_year(ml) -> None:
    items = ml.items.set_index("item_id")
    assert items.loc[10, "release_year"] == 1995.0  # "Richard III (1995)", released 22-Jan-1996
    assert items.loc[1412, "release_year"] == 1995.0  # "... (1995) (V)"
    assert items["release_year"].isna().sum() == 1


def test_checksums_and_provenance(ml, ml100k_dir: Path) -> None:
    prov = ml.provenance
    assert prov["source"] == "data.path" and prov["location"] == str(ml100k_dir)
    sums = dict(reversed(line.split()) for line in (ml100k_dir / "SHA256SUMS").read_text().splitlines())
    assert prov["files"] == {f: sums[f] for f in FILES} == movielens.FILE_SHA256
    assert prov["canonical_sha256"] == movielens.CANONICAL_SHA256 == independent_ratings_digest(ml100k_dir)


def test_env_variable_serves_when_no_path(ml100k_dir: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("METAREC_ML100K", str(ml100k_dir))
    logs: list[str] = []
    data = load_dataset({"source": "movielens-100k"}, workdir=tmp_path, log=logs.append)
    assert data.provenance["source"] == "METAREC_ML100K"
    assert any("served by METAREC_ML100K" in m for m in logs)


def test_zip_path_and_cache(ml100k_dir: Path, no_env, tmp_path: Path) -> None:
    archive = tmp_path / "ml-100k.zip"
    archive.write_bytes(make_zip(ml100k_dir))
    data = load_dataset({"source": "movielens-100k", "path": str(archive)}, workdir=tmp_path, log=quiet)
    assert data.provenance["source"] == "data.path" and len(data.ratings) == 100_000
    cache = tmp_path / "cache" / "ml-100k"
    cache.mkdir(parents=True)
    for f in FILES:
        shutil.copy(ml100k_dir / f, cache / f)
    data = load_dataset({"source": "movielens-100k", "cache_dir": "cache", "url": closed_port_url()},
                        workdir=tmp_path, log=quiet)
    assert data.provenance["source"] == "cache"


def test_checksum_mismatch_in_a_folder_is_rejected(ml100k_dir: Path, no_env, tmp_path: Path) -> None:
    for f in FILES:
        shutil.copy(ml100k_dir / f, tmp_path / f)
    text = (tmp_path / "u.user").read_text()
    (tmp_path / "u.user").write_text(text.replace("1|24|M|technician|85711", "1|25|M|technician|85711"))
    actual = hashlib.sha256((tmp_path / "u.user").read_bytes()).hexdigest()
    with pytest.raises(DataError, match=rf"{tmp_path}/u\.user: SHA-256 mismatch, expected "
                                        rf"{movielens.FILE_SHA256['u.user']}, got {actual}"):
        load_dataset({"source": "movielens-100k", "path": str(tmp_path)}, log=quiet)


def test_canonical_checksum_mismatch_is_rejected(ml100k_dir: Path, monkeypatch) -> None:
    real = movielens.CANONICAL_SHA256
    monkeypatch.setattr(movielens, "CANONICAL_SHA256", "0" * 64)
    with pytest.raises(DataError, match=rf"u\.data: canonical ratings SHA-256 mismatch, expected 0{{64}}, "
                                        rf"got {real}"):
        load_dataset({"source": "movielens-100k", "path": str(ml100k_dir)}, log=quiet)


# ----------------------------------------------------------------------------- download


def test_download_from_loopback_server_fills_the_cache(ml100k_dir: Path, no_env, tmp_path: Path) -> None:
    logs: list[str] = []
    with Server(make_zip(ml100k_dir)) as server:
        data = load_dataset({"source": "movielens-100k", "url": server.url}, workdir=tmp_path, log=logs.append)
    assert data.provenance["source"] == "download" and data.provenance["location"] == server.url
    assert data.provenance["canonical_sha256"] == movielens.CANONICAL_SHA256
    cache = tmp_path / "data" / "raw" / "ml-100k"
    assert all((cache / f).is_file() for f in FILES + ("u.genre",))
    again = load_dataset({"source": "movielens-100k", "url": closed_port_url()}, workdir=tmp_path, log=quiet)
    assert again.provenance["source"] == "cache"
    assert any(f"served by download ({server.url})" in m for m in logs)


def test_download_with_wrong_checksum_is_rejected_and_not_cached(ml100k_dir: Path, no_env, tmp_path: Path) -> None:
    bad = (ml100k_dir / "u.data").read_bytes().replace(b"196\t242\t3\t", b"196\t242\t4\t", 1)
    with Server(make_zip(ml100k_dir, replace={"u.data": bad})) as server:
        with pytest.raises(DataError, match=rf"u\.data: SHA-256 mismatch, expected {movielens.FILE_SHA256['u.data']}, "
                                            rf"got {hashlib.sha256(bad).hexdigest()}"):
            load_dataset({"source": "movielens-100k", "url": server.url}, workdir=tmp_path, log=quiet)
    assert not (tmp_path / "data" / "raw" / "ml-100k" / "u.data").exists()


def test_zip_slip_archive_is_rejected(ml100k_dir: Path, no_env, tmp_path: Path) -> None:
    payload = make_zip(ml100k_dir, extra={"ml-100k/../../escaped.txt": b"owned"})
    with Server(payload) as server:
        with pytest.raises(DataError, match=r"archive entry 'ml-100k/\.\./\.\./escaped\.txt' would extract to .*"
                                            r"outside .*zip-slip"):
            load_dataset({"source": "movielens-100k", "url": server.url}, workdir=tmp_path, log=quiet)
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "data" / "escaped.txt").exists()
    archive = tmp_path / "ml-100k.zip"
    archive.write_bytes(make_zip(ml100k_dir, extra={"/etc/escaped.txt": b"owned"}))
    with pytest.raises(DataError, match=r"archive entry '/etc/escaped\.txt'.*zip-slip"):
        load_dataset({"source": "movielens-100k", "path": str(archive)}, log=quiet)


def test_every_source_failing_lists_each_reason(no_env, tmp_path: Path) -> None:
    url = closed_port_url()
    cfg = {"source": "movielens-100k", "path": str(tmp_path / "nowhere"), "url": url, "timeout": 5,
           "pypi_fallback": False}
    with pytest.raises(DataError) as info:
        load_dataset(cfg, workdir=tmp_path, log=quiet)
    msg = str(info.value)
    assert msg.startswith("MovieLens-100K could not be loaded from any source (")
    for part in (f"data.path: {tmp_path / 'nowhere'} does not exist", "METAREC_ML100K: not set",
                 f"cache: {tmp_path / 'data/raw/ml-100k'} has no u.data, u.user, u.item",
                 f"download: download of {url} failed", "pypi: disabled by data.pypi_fallback",
                 "set data.path or METAREC_ML100K", f"place those files in {tmp_path / 'data/raw/ml-100k'}"):
        assert part in msg


@pytest.mark.network
def test_pypi_wheel_serves_the_same_ratings(ml, no_env, tmp_path: Path) -> None:
    logs: list[str] = []
    data = load_dataset({"source": "movielens-100k", "url": closed_port_url(), "timeout": 5},
                        workdir=tmp_path, log=logs.append)
    assert data.provenance["source"] == "pypi"
    assert data.provenance["wheel_sha256"] == movielens.RECBOLE_WHEEL_SHA256
    assert data.provenance["canonical_sha256"] == movielens.CANONICAL_SHA256
    assert any("served by pypi" in m for m in logs)
    pd.testing.assert_frame_equal(
        data.ratings.sort_values(["user_id", "item_id"]).reset_index(drop=True),
        ml.ratings.sort_values(["user_id", "item_id"]).reset_index(drop=True))
    pd.testing.assert_frame_equal(data.users, ml.users)
    pd.testing.assert_frame_equal(data.items[["item_id", "release_year", "genres"]],
                                  ml.items[["item_id", "release_year", "genres"]])
    assert data.items["release_date"].isna().all()


# ----------------------------------------------------------------------------- dispatch and CLI check


def test_unknown_source_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.source is 'movielens'; expected one of movielens-100k, csv, "
                                          r"parquet, synthetic"):
        load_dataset({"source": "movielens"})


def _params_file(tmp_path: Path, data: dict) -> Path:
    """The repository's params.yaml with another data block."""
    import yaml

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["data"] = data
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_check_command_prints_a_summary(ml100k_dir: Path, tmp_path: Path, capsys) -> None:
    params = _params_file(tmp_path, {"source": "movielens-100k", "path": str(ml100k_dir)})
    assert check_command(str(params)) == 0
    out = capsys.readouterr().out
    assert "ratings: 100000  users: 943 (of 943)  items: 1682 (of 1682)" in out
    assert f"canonical sha256: {movielens.CANONICAL_SHA256}" in out
    assert "gender: F=273, M=670" in out and "served by data.path" in out


def test_check_command_reports_errors_with_exit_2(tmp_path: Path, capsys) -> None:
    params = _params_file(tmp_path, {"source": "nope"})
    assert check_command(str(params)) == 2
    assert capsys.readouterr().err == ("params.yaml: data.source is 'nope'; expected 'movielens-100k', 'csv', "
                                       "'parquet' or 'synthetic'\n")
    assert check_command(str(tmp_path / "missing.yaml")) == 2


# ----------------------------------------------------------------------------- bring your own tables

SCHEMA = {
    "user_attributes": [{"name": "gender", "kind": "categorical", "values": ["F", "M"]},
                        {"name": "age", "kind": "numeric", "edges": [30], "labels": ["<30", "30+"]}],
    "item_features": [{"name": "genres", "kind": "multilabel", "separator": ";"}],
    "sensitive": ["gender", "age"], "rating_min": 1, "rating_max": 5,
}


def byo_frames() -> dict[str, pd.DataFrame]:
    return {
        "interactions": pd.DataFrame({"user_id": [1, 1, 2, 3], "item_id": [10, 11, 10, 11],
                                      "rating": [5, 3.5, 1, 4]}),
        "users": pd.DataFrame({"user_id": [1, 2, 3], "gender": ["F", "M", "M"], "age": [22, 41, 35],
                               "extra": ["x", "y", "z"]}),
        "items": pd.DataFrame({"item_id": [10, 11], "genres": ["Drama;Comedy", "Action"],
                               "release_year": [1999, 2004], "title": ["A", "B"]}),
    }


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_bring_your_own_tables(fmt: str, tmp_path: Path) -> None:
    cfg = {"source": fmt, "schema": SCHEMA}
    for key, frame in byo_frames().items():
        name = f"{key}.{fmt}"
        frame.to_csv(tmp_path / name, index=False) if fmt == "csv" else frame.to_parquet(tmp_path / name)
        cfg[key] = name
    data = load_dataset(cfg, workdir=tmp_path, log=quiet)
    assert data.source == fmt and len(data.ratings) == 4
    assert data.ratings["timestamp"].tolist() == [0, 0, 0, 0]
    assert data.ratings["rating"].tolist() == [5.0, 3.5, 1.0, 4.0]
    assert list(data.users.columns) == ["user_id", "gender", "age"]
    assert data.items["release_year"].tolist() == [1999.0, 2004.0]
    assert data.spec.user_attr("age").edges == (30.0,) and data.spec.sensitive == ("gender", "age")
    assert data.spec.item_features[0].separator == ";"
    assert set(data.provenance["files"]) == {"interactions", "users", "items"}
    assert len(data.provenance["canonical_sha256"]) == 64


def _bomb(size: int, declare: int | None = None) -> bytes:
    """A zip whose ml-100k/u.data inflates to `size` zero bytes; `declare` forges the recorded size."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("ml-100k/u.data", "w", force_zip64=False) as fh:
            block = bytes(1 << 20)
            for _ in range(size >> 20):
                fh.write(block)
        zf.writestr("ml-100k/u.user", b"1|24|M|technician|85711\n")
        zf.writestr("ml-100k/u.item", b"")
    payload = bytearray(buf.getvalue())
    if declare is not None:
        local, central = payload.index(b"PK\x03\x04"), payload.index(b"PK\x01\x02")
        payload[local + 22: local + 26] = declare.to_bytes(4, "little")
        payload[central + 24: central + 28] = declare.to_bytes(4, "little")
    return bytes(payload)


def _peak_while(fn) -> tuple[BaseException, int]:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 (returned to the test)
        caught = exc
    else:
        caught = AssertionError("no error raised")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return caught, peak


@pytest.mark.parametrize("declare,problem", [
    (None, f"declares {48 << 20} bytes uncompressed; expected at most {32 << 20} per entry (the largest "
           f"MovieLens-100K file is about 2 MB), refusing the archive"),
    (1000, "is corrupt (Bad CRC-32 for file 'ml-100k/u.data'); expected the GroupLens ml-100k.zip"),
], ids=["declared-too-large", "inflates-past-declared"])
def test_zip_bomb_is_refused_without_inflating_it(no_env, tmp_path: Path, declare: int | None, problem: str) -> None:
    archive = tmp_path / "ml-100k.zip"
    archive.write_bytes(_bomb(48 << 20, declare=declare))
    assert archive.stat().st_size < 200_000
    exc, peak = _peak_while(lambda: load_dataset({"source": "movielens-100k", "path": str(archive)}, log=quiet))
    assert isinstance(exc, DataError) and str(exc) == f"{archive}: archive entry 'ml-100k/u.data' {problem}"
    assert peak < 4 << 20  # the 48 MiB entry was never held in memory


def test_downloaded_bomb_is_refused_before_extraction(no_env, tmp_path: Path) -> None:
    with Server(_bomb(48 << 20)) as server:
        with pytest.raises(DataError, match=re.escape(f"{server.url}: archive entry 'ml-100k/u.data' declares "
                                                      f"{48 << 20} bytes uncompressed")):
            load_dataset({"source": "movielens-100k", "url": server.url, "pypi_fallback": False},
                         workdir=tmp_path, log=quiet)
    assert not list(tmp_path.rglob("u.data"))


@pytest.mark.parametrize("block", [3, 1 << 19])
def test_canonical_checksum_is_the_digest_of_the_sorted_lines_whatever_the_block(monkeypatch, block: int) -> None:
    """Known answer from plain Python (one f-string per sorted row); hashing in blocks must not change it."""
    from metarec.data import validate

    ratings = pd.DataFrame({"user_id": [3, 1, 2, 1, 3, 2, 1], "item_id": [5, 9, 1, 2, 4, 7, 11],
                            "rating": [4.5, 3.0, 5.0, 1.0, 2.9, 4.0, 3.0],
                            "timestamp": [10, 20, 30, 40, 50, 60, 70]})
    rows = sorted(ratings.itertuples(index=False), key=lambda t: (t.user_id, t.item_id))
    text = "".join(f"{u}\t{i}\t{int(r)}\t{ts}\n" for u, i, r, ts in rows)
    monkeypatch.setattr(validate, "CHECKSUM_BLOCK", block)
    assert validate.canonical_checksum(ratings.sample(frac=1.0, random_state=0)) == \
        hashlib.sha256(text.encode("ascii")).hexdigest()
