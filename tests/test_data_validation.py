"""Each bad input is rejected with a sentence naming file, column, row (or id) and what was expected."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from metarec.data.load import load_dataset
from metarec.errors import ConfigError, DataError

SCHEMA = {
    "user_attributes": [{"name": "gender", "kind": "categorical", "values": ["F", "M"]},
                        {"name": "age", "kind": "numeric", "edges": [30], "labels": ["<30", "30+"]}],
    "item_features": [{"name": "genres", "kind": "multilabel"}],
    "sensitive": ["gender", "age"], "rating_min": 1, "rating_max": 5,
}
INTERACTIONS = "user_id,item_id,rating,timestamp\n1,10,5,100\n1,11,3,101\n2,10,1,102\n3,11,4,103\n"
USERS = "user_id,gender,age\n1,F,22\n2,M,41\n3,M,35\n"
ITEMS = "item_id,genres\n10,Drama|Comedy\n11,Action\n"
ID = "an id (an integer within the signed 64-bit range, or text that is not a number)"


def quiet(_msg: str) -> None:
    pass


def load_csv(tmp_path: Path, interactions: str | bytes = INTERACTIONS, users: str | bytes = USERS,
             items: str | bytes = ITEMS, **cfg):
    for name, content in (("ratings.csv", interactions), ("users.csv", users), ("items.csv", items)):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    base = {"source": "csv", "interactions": "ratings.csv", "users": "users.csv", "items": "items.csv",
            "schema": SCHEMA}
    return load_dataset({**base, **cfg}, workdir=tmp_path, log=quiet)


def load_parquet(tmp_path: Path, ratings, users: pd.DataFrame | None = None, items: pd.DataFrame | None = None):
    """The three tables as parquet files (ratings may be a pyarrow Table, for types pandas cannot hold)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    users = users if users is not None else pd.DataFrame({"user_id": [1, 2, 3], "gender": ["F", "M", "M"],
                                                          "age": [22, 41, 35]})
    items = items if items is not None else pd.DataFrame({"item_id": [10, 11], "genres": ["Drama", "Action"]})
    for name, frame in (("r", ratings), ("u", users), ("i", items)):
        pq.write_table(frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame), tmp_path / f"{name}.parquet")
    cfg = {"source": "parquet", "interactions": "r.parquet", "users": "u.parquet", "items": "i.parquet",
           "schema": SCHEMA}
    return load_dataset(cfg, workdir=tmp_path, log=quiet)


def test_clean_tables_load(tmp_path: Path) -> None:
    data = load_csv(tmp_path)
    assert len(data.ratings) == 4 and data.users["age"].tolist() == [22, 41, 35]


def test_missing_file(tmp_path: Path) -> None:
    load_csv(tmp_path)
    (tmp_path / "users.csv").unlink()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/users.csv: file not found; expected a csv table")):
        load_dataset({"source": "csv", "interactions": "ratings.csv", "users": "users.csv", "items": "items.csv",
                      "schema": SCHEMA}, workdir=tmp_path, log=quiet)


def test_missing_column(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/ratings.csv: missing column 'rating'; expected "
                                                  f"columns 'user_id', 'item_id', 'rating'")):
        load_csv(tmp_path, interactions="user_id,item_id,score\n1,10,5\n")


def test_missing_attribute_column(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/users.csv: missing column 'age'")):
        load_csv(tmp_path, users="user_id,gender\n1,F\n2,M\n3,M\n")


def test_non_numeric_rating(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/ratings.csv: column 'rating', data row 2 has "
                                                  f"'good'; expected a number between 1 and 5")):
        load_csv(tmp_path, interactions="user_id,item_id,rating\n1,10,5\n1,11,good\n")


def test_out_of_scale_rating(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/ratings.csv: column 'rating', data row 3 has 6; "
                                                  f"expected a number between 1 and 5")):
        load_csv(tmp_path, interactions="user_id,item_id,rating\n1,10,5\n1,11,3\n2,10,6\n")


def test_empty_id(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/ratings.csv: column 'item_id', data row 2 is empty; "
                                                  f"expected {ID}")):
        load_csv(tmp_path, interactions="user_id,item_id,rating\n1,10,5\n1,,3\n")


def test_nan_id_in_parquet(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/r.parquet: column 'user_id', data row 2 is empty; "
                                                  f"expected {ID}")):
        load_parquet(tmp_path, pd.DataFrame({"user_id": [1.0, None], "item_id": [10, 11], "rating": [5, 3]}))


def test_string_ids_are_kept_as_text(tmp_path: Path) -> None:
    data = load_csv(tmp_path, interactions="user_id,item_id,rating\nu0,sku-b,5\nu0,sku-a,3\n42,sku-b,1\nu3,sku-a,4\n",
                    users="user_id,gender,age\nu0,F,22\n42,M,41\nu3,M,35\n", items="item_id,genres\nsku-a,Drama\nsku-b,Action\n")
    umap, imap = data.ids["user_id"], data.ids["item_id"]
    assert (umap.kind, imap.kind) == ("string", "string")
    assert umap.originals == ("42", "u0", "u3") and imap.originals == ("sku-a", "sku-b")
    assert data.ratings["user_id"].dtype == "int64" and data.users["user_id"].tolist() == [1, 0, 2]
    back = umap.original(data.ratings["user_id"]).tolist()
    assert back == ["u0", "u0", "42", "u3"]
    assert imap.original(data.ratings["item_id"]).tolist() == ["sku-b", "sku-a", "sku-b", "sku-a"]


def test_wide_integer_id_survives_exactly(tmp_path: Path) -> None:
    big = 12345678901234567  # float64 would store ...568
    data = load_csv(tmp_path, interactions=f"user_id,item_id,rating\n{big},10,5\n{big},11,3\n2,10,1\n3,11,4\n",
                    users=f"user_id,gender,age\n{big},F,22\n2,M,41\n3,M,35\n")
    assert data.ids["user_id"].kind == "integer"
    assert int(data.ratings["user_id"].iloc[0]) == big and big in data.users["user_id"].tolist()
    assert data.ids["user_id"].original([big]).tolist() == [big]


def test_csv_id_beyond_int64_is_refused_with_its_row(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/users.csv: column 'user_id', data row 3 has "
                                                  f"'1e20'; expected {ID}")):
        load_csv(tmp_path, users="user_id,gender,age\n1,F,22\n2,M,41\n1e20,M,35\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/users.csv: column 'user_id', data row 3 has "
                                                  f"'100000000000000000000', outside the signed 64-bit range; "
                                                  f"expected {ID}")):
        load_csv(tmp_path, users="user_id,gender,age\n1,F,22\n2,M,41\n100000000000000000000,M,35\n")


def test_parquet_uint64_id_beyond_int64_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa

    ratings = pa.table({"user_id": pa.array([1, 2, 2 ** 63 + 5], pa.uint64()), "item_id": [10, 11, 10],
                        "rating": [5.0, 3.0, 4.0]})
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/r.parquet: column 'user_id', data row 3 has "
                                                  f"{2 ** 63 + 5}, outside the signed 64-bit range; expected {ID}")):
        load_parquet(tmp_path, ratings)


def test_float_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/users.csv: column 'user_id', data row 3 has "
                                                  f"'3.0'; expected {ID}")):
        load_csv(tmp_path, users="user_id,gender,age\n1,F,22\n2,M,41\n3.0,M,35\n")


def test_duplicate_pair_is_an_error_by_default(tmp_path: Path) -> None:
    dup = INTERACTIONS + "1,10,2,50\n"
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/ratings.csv: data row 5 repeats the (user_id, item_id) "
                                                  f"pair (1, 10) of data row 1; expected one rating per pair")):
        load_csv(tmp_path, interactions=dup)


def test_duplicates_keep_latest(tmp_path: Path) -> None:
    dup = "user_id,item_id,rating,timestamp\n1,10,5,300\n1,11,3,101\n1,10,2,200\n2,10,1,102\n3,11,4,103\n1,10,4,250\n"
    data = load_csv(tmp_path, interactions=dup, duplicates="keep_latest")
    assert len(data.ratings) == 4
    kept = data.ratings[(data.ratings.user_id == 1) & (data.ratings.item_id == 10)]
    assert kept[["rating", "timestamp"]].values.tolist() == [[5.0, 300]]


def test_unknown_duplicates_policy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("data.duplicates is 'first'; expected one of error, keep_latest")):
        load_csv(tmp_path, duplicates="first")


def test_rated_user_without_attribute_row(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/ratings.csv: user 4 (data row 5) has no row in "
                                                  f"{tmp_path}/users.csv; expected every rated user to have attributes")):
        load_csv(tmp_path, interactions=INTERACTIONS + "4,10,3,104\n")


def test_rated_item_without_row(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/ratings.csv: item 12 (data row 5) has no row in "
                                                  f"{tmp_path}/items.csv")):
        load_csv(tmp_path, interactions=INTERACTIONS + "3,12,3,104\n")


def test_unknown_category_value(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/users.csv: column 'gender', user 3 (data row 3) has "
                                                  f"unknown value 'X'; expected one of F, M")):
        load_csv(tmp_path, users="user_id,gender,age\n1,F,22\n2,M,41\n3,X,35\n")


def test_sensitive_attribute_with_a_single_group(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/users.csv: sensitive attribute 'age' has a single "
                                                  f"group ('30+') across 3 users; expected at least two groups")):
        load_csv(tmp_path, users="user_id,gender,age\n1,F,52\n2,M,41\n3,M,35\n")


def test_empty_sensitive_value(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/users.csv: column 'gender', user 2 (data row 2) is "
                                                  f"empty; expected a value for the sensitive attribute")):
        load_csv(tmp_path, users="user_id,gender,age\n1,F,22\n2,,41\n3,M,35\n")


def test_csv_not_utf8_names_the_byte_offset(tmp_path: Path) -> None:
    latin = "user_id,gender,age\n1,F,22\n2,M,41\n3,M,35\n".encode() + "4,F,2\xe9\n".encode("latin-1")
    offset = latin.index(b"\xe9")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/users.csv: not valid UTF-8 text at byte offset "
                                                  f"{offset} (byte 0xe9); expected a UTF-8-encoded file")):
        load_csv(tmp_path, users=latin)


def test_sensitive_not_declared_is_a_config_error(tmp_path: Path) -> None:
    schema = {**SCHEMA, "sensitive": ["gender", "race"]}
    with pytest.raises(ConfigError, match=re.escape("params.yaml: data.schema names 'race' in sensitive, which is not "
                                                    "in user_attributes (age, gender); expected declared user "
                                                    "attributes")):
        load_csv(tmp_path, schema=schema)


# ----------------------------------------------------------------------------- MovieLens files


def ml_copy(src: Path, dst: Path, **edits: bytes) -> Path:
    for f in ("u.data", "u.user", "u.item"):
        (dst / f).write_bytes(edits.get(f.replace(".", "_"), (src / f).read_bytes()))
    return dst


def load_ml(folder: Path, **cfg):
    return load_dataset({"source": "movielens-100k", "path": str(folder), **cfg}, log=quiet)


def test_ml_user_file_in_wrong_encoding(ml100k_dir: Path, tmp_path: Path) -> None:
    utf16 = (ml100k_dir / "u.user").read_text().encode("utf-16")
    ml_copy(ml100k_dir, tmp_path, u_user=utf16)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/u.user: not valid UTF-8 text at byte offset 0 "
                                                  f"(byte 0xff); expected a UTF-8-encoded file")):
        load_ml(tmp_path)


def test_ml_item_file_is_latin1(ml100k_dir: Path) -> None:
    data = load_ml(ml100k_dir)
    assert data.items.set_index("item_id").loc[1623, "title"] == "Cérémonie, La (1995)"


def test_ml_unknown_gender(ml100k_dir: Path, tmp_path: Path) -> None:
    text = (ml100k_dir / "u.user").read_bytes().replace(b"2|53|F|other|94043", b"2|53|X|other|94043")
    ml_copy(ml100k_dir, tmp_path, u_user=text)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/u.user: column 'gender', user 2 (data row 2) has "
                                                  f"unknown value 'X'; expected one of F, M")):
        load_ml(tmp_path, verify_checksums=False)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/u.user: SHA-256 mismatch")):
        load_ml(tmp_path)


def test_ml_unknown_occupation(ml100k_dir: Path, tmp_path: Path) -> None:
    text = (ml100k_dir / "u.user").read_bytes().replace(b"3|23|M|writer|32067", b"3|23|M|astronaut|32067")
    ml_copy(ml100k_dir, tmp_path, u_user=text)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/u.user: column 'occupation', user 3 (data row 3) has "
                                                  f"unknown value 'astronaut'; expected one of administrator, artist")):
        load_ml(tmp_path, verify_checksums=False)


def test_ml_wrong_field_count(ml100k_dir: Path, tmp_path: Path) -> None:
    text = (ml100k_dir / "u.data").read_bytes().replace(b"186\t302\t3\t891717742\n", b"186\t302\t3\n", 1)
    ml_copy(ml100k_dir, tmp_path, u_data=text)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/u.data: data row 2 has 3 fields separated by '\\t'; "
                                                  f"expected 4 (user_id, item_id, rating, timestamp)")):
        load_ml(tmp_path)


def test_ml_out_of_scale_rating(ml100k_dir: Path, tmp_path: Path) -> None:
    text = (ml100k_dir / "u.data").read_bytes().replace(b"22\t377\t1\t", b"22\t377\t0\t", 1)
    ml_copy(ml100k_dir, tmp_path, u_data=text)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/u.data: column 'rating', data row 3 has 0; expected "
                                                  f"a number between 1 and 5")):
        load_ml(tmp_path, verify_checksums=False)


def test_ml_bad_release_date(ml100k_dir: Path, tmp_path: Path) -> None:
    text = (ml100k_dir / "u.item").read_bytes().replace(b"2|GoldenEye (1995)|01-Jan-1995|", b"2|GoldenEye (1995)|1995-01-01|")
    ml_copy(ml100k_dir, tmp_path, u_item=text)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/u.item: column 'release date', data row 2 has "
                                                  f"'1995-01-01'; expected dd-Mon-yyyy")):
        load_ml(tmp_path)


def test_ml_genre_flag_not_binary(ml100k_dir: Path, tmp_path: Path) -> None:
    lines = (ml100k_dir / "u.item").read_bytes().split(b"\n")
    lines[4] = lines[4][:-1] + b"2"
    ml_copy(ml100k_dir, tmp_path, u_item=b"\n".join(lines))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/u.item: genre column 'Western', data row 5 has '2'; "
                                                  f"expected 0 or 1")):
        load_ml(tmp_path)


# ----------------------------------------------------------------------------- parquet dtypes, empty tables


def test_header_only_ratings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/ratings.csv: no ratings (the table has a header but no "
                                                  f"data rows); expected at least one rating")):
        load_csv(tmp_path, interactions="user_id,item_id,rating,timestamp\n")


def test_boolean_ratings_are_refused(tmp_path: Path) -> None:
    ratings = pd.DataFrame({"user_id": [1, 2], "item_id": [10, 11], "rating": [True, False]})
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/r.parquet: column 'rating', data row 1 has True (a "
                                                  f"boolean); expected a number between 1 and 5")):
        load_parquet(tmp_path, ratings)


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_datetime_timestamps_are_converted_by_their_unit(tmp_path: Path, unit: str) -> None:
    when = pd.to_datetime(["2021-03-04 05:06:07", "2001-09-09 01:46:40"]).as_unit(unit)
    ratings = pd.DataFrame({"user_id": [1, 2], "item_id": [10, 11], "rating": [5.0, 3.0], "timestamp": when})
    data = load_parquet(tmp_path, ratings)
    assert data.ratings["timestamp"].tolist() == [1614834367, 1_000_000_000]


def test_timezone_aware_timestamps_are_taken_in_utc(tmp_path: Path) -> None:
    when = pd.to_datetime(["2001-09-09 03:46:40"]).tz_localize("Europe/Berlin")
    ratings = pd.DataFrame({"user_id": [1], "item_id": [10], "rating": [5.0], "timestamp": when})
    assert load_parquet(tmp_path, ratings).ratings["timestamp"].tolist() == [1_000_000_000]


def test_missing_datetime_is_refused(tmp_path: Path) -> None:
    when = pd.to_datetime(["2021-03-04", None])
    ratings = pd.DataFrame({"user_id": [1, 2], "item_id": [10, 11], "rating": [5.0, 3.0], "timestamp": when})
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/r.parquet: column 'timestamp', data row 2 is empty; "
                                                  f"expected an integer timestamp (seconds since 1970-01-01) or a "
                                                  f"datetime")):
        load_parquet(tmp_path, ratings)


def test_list_typed_multilabel_column_is_read_as_labels(tmp_path: Path) -> None:
    ratings = pd.DataFrame({"user_id": [1, 2], "item_id": [10, 11], "rating": [5.0, 3.0]})
    items = pd.DataFrame({"item_id": [10, 11], "genres": [["Drama", "Comedy"], []]})
    data = load_parquet(tmp_path, ratings, items=items)
    assert data.items.set_index("item_id")["genres"].to_dict() == {10: "Drama|Comedy", 11: ""}


def test_list_label_containing_the_separator_is_refused(tmp_path: Path) -> None:
    ratings = pd.DataFrame({"user_id": [1, 2], "item_id": [10, 11], "rating": [5.0, 3.0]})
    items = pd.DataFrame({"item_id": [10, 11], "genres": [["Drama"], ["Sci|Fi"]]})
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/i.parquet: column 'genres', data row 2 has label "
                                                  f"'Sci|Fi', which contains the separator '|'; expected labels "
                                                  f"without it")):
        load_parquet(tmp_path, ratings, items=items)


def test_list_in_a_single_valued_attribute_is_refused(tmp_path: Path) -> None:
    ratings = pd.DataFrame({"user_id": [1, 2], "item_id": [10, 11], "rating": [5.0, 3.0]})
    users = pd.DataFrame({"user_id": [1, 2, 3], "gender": [["F"], ["M"], ["M"]], "age": [22, 41, 35]})
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/u.parquet: column 'gender', user 1 (data row 1) "
                                                  f"holds a list; expected one categorical value")):
        load_parquet(tmp_path, ratings, users=users)


# ----------------------------------------------------------------------------- data against params


def _params(data: dict, min_group_size: int = 10, **tasks) -> dict:
    import yaml

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["data"] = data
    params["tasks"].update(tasks)
    params["strata"]["min_group_size"] = min_group_size
    params["robustness"]["attribute_noise"]["attribute"] = "plan"
    params["robustness"]["demographic_shift"] = {"attribute": "plan", "mix": {"free": 0.5, "pro": 0.5}}
    return params


def test_every_user_below_min_ratings_is_refused_at_prepare(tmp_path: Path) -> None:
    from audit.config import load_checked
    from tests import byo_dataset

    data = byo_dataset.write(tmp_path / "byo", n_users=60, per_user=(5, 9))
    with pytest.raises(DataError, match=re.escape("params.yaml: tasks.min_ratings leaves split 'train' without users: "
                                                  "none of its 41 training users has at least 13 ratings of existing "
                                                  "items, so all 41 are lost; expected at least one user who meets "
                                                  "tasks.min_ratings")):
        load_checked(_params(data), tmp_path, log=quiet)


def test_users_lost_to_min_ratings_and_small_groups_are_reported(tmp_path: Path) -> None:
    from audit.config import load_checked
    from metarec.splits import SplitConfig, partition
    from tests import byo_dataset

    data = byo_dataset.write(tmp_path / "byo", n_users=60, per_user=(10, 20))
    lines: list[str] = []
    cfg, loaded = load_checked(_params(data, min_group_size=15, min_ratings=12), tmp_path, log=lines.append)
    ratings, users, _ = byo_dataset.tables(n_users=60, per_user=(10, 20))
    counts = ratings.groupby("user_id").size()
    new_users = loaded.ids["user_id"].original(sorted(partition(loaded, SplitConfig(**cfg.tasks.model_dump())).new_users))
    assert "tasks: item_cold, user_item_cold: empty, the items have no release_year, so no item is new and there " \
           "are no item-cold scenarios" in lines
    line = next(x for x in lines if x.startswith("tasks: user_cold: "))
    kept, of = (int(x) for x in re.match(r"tasks: user_cold: (\d+) of (\d+) users", line).groups())
    assert of == 12 and 0 < kept < of and line.endswith(f"({of - kept} lost)")
    assert int((counts[new_users.tolist()] >= 12).sum()) == kept  # counted from the raw table
    sizes = users.country.value_counts()
    small = sorted(g for g, n in sizes.items() if n < 15)
    assert small
    warning = next(x for x in lines if x.startswith("warning: sensitive attribute 'country'"))
    assert warning == ("warning: sensitive attribute 'country' has groups smaller than strata.min_group_size (15): "
                       + ", ".join(f"{g} ({sizes[g]} users)" for g in small))


def test_robustness_attribute_must_exist_in_the_data(tmp_path: Path) -> None:
    from audit.config import load_checked
    from metarec.errors import ConfigError
    from tests import byo_dataset

    params = _params(byo_dataset.write(tmp_path / "byo"))
    params["robustness"]["attribute_noise"]["attribute"] = "gender"
    with pytest.raises(ConfigError, match=re.escape("params.yaml: robustness.attribute_noise.attribute names 'gender', "
                                                    "which is not an attribute of this dataset; expected one of "
                                                    "country, age, plan")):
        load_checked(params, tmp_path, log=quiet)
    params = _params(byo_dataset.write(tmp_path / "byo"))
    params["robustness"]["demographic_shift"]["mix"] = {"free": 0.5, "gold": 0.5}
    with pytest.raises(ConfigError, match=re.escape("params.yaml: robustness.demographic_shift.mix names group 'gold' "
                                                    "of 'plan', which no user is in; expected groups among free, plus, "
                                                    "pro")):
        load_checked(params, tmp_path, log=quiet)
