"""Tests for clustersearch.datasets (no network access needed)."""

import gzip
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from clustersearch import datasets
from clustersearch.datasets import (
    ADULT_CATEGORICAL_COLUMNS,
    ADULT_CATEGORIES,
    ADULT_COLUMNS,
    ADULT_NUMERIC_COLUMNS,
    load_adult,
)

N_TRAIN = 32561
N_TEST = 16281
N_ONE_HOT = 6 + 99  # 6 numeric + 99 categories in the training file

# The shared data folder lives beside the repository checkout:
# <parent>/main/tests/test_datasets.py -> <parent>/shared/data/adult
SHARED_ADULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "adult"


@pytest.fixture
def adult_dir():
    """Folder with the real UCI Adult files; skip if it is not there."""
    needed = ["adult.data", "adult.test"]
    missing = [n for n in needed if not (SHARED_ADULT / n).is_file()]
    if missing:
        pytest.skip(f"UCI Adult files {missing} not found in {SHARED_ADULT}")
    return SHARED_ADULT


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """No test may see the caller's CLUSTERSEARCH_DATA."""
    monkeypatch.delenv("CLUSTERSEARCH_DATA", raising=False)


def _col(name):
    """Index of a one-hot feature name in the array output."""
    return load_adult_feature_names().index(name)


def load_adult_feature_names():
    return datasets._one_hot_feature_names()


# --------------------------------------------------------------------------
# Real files
# --------------------------------------------------------------------------


def test_train_shape_and_target(adult_dir):
    X, y = load_adult(adult_dir)
    assert X.shape == (N_TRAIN, N_ONE_HOT)
    assert X.dtype == np.float64
    assert y.shape == (N_TRAIN,)
    assert np.issubdtype(y.dtype, np.integer)
    assert set(np.unique(y)) == {0, 1}
    # adult.names: 23.93% positive overall; 7841 / 32561 in train.
    assert y.mean() == pytest.approx(0.24, abs=0.01)
    assert int(y.sum()) == 7841
    assert not np.isnan(X).any()


def test_test_subset_parses_dotted_labels(adult_dir):
    X_train, _ = load_adult(adult_dir, subset="train")
    X, y = load_adult(adult_dir, subset="test")
    assert X.shape == (N_TEST, X_train.shape[1])
    # Every label in adult.test ends in '.', e.g. '>50K.'; they must count.
    assert int(y.sum()) == 3846
    assert set(np.unique(y)) == {0, 1}
    # The comment line must not become a row.
    assert X[0, 0] == 25.0  # age of the first real record


def test_all_subset_is_train_then_test(adult_dir):
    X_tr, y_tr = load_adult(adult_dir, subset="train")
    X_te, y_te = load_adult(adult_dir, subset="test")
    X, y = load_adult(adult_dir, subset="all")
    assert X.shape == (N_TRAIN + N_TEST, N_ONE_HOT)
    np.testing.assert_array_equal(X, np.vstack([X_tr, X_te]))
    np.testing.assert_array_equal(y, np.concatenate([y_tr, y_te]))


def test_one_hot_groups_sum_to_at_most_one(adult_dir):
    X, _ = load_adult(adult_dir)
    names = load_adult_feature_names()
    for col in ADULT_CATEGORICAL_COLUMNS:
        idx = [i for i, n in enumerate(names) if n.startswith(col + "=")]
        sums = X[:, idx].sum(axis=1)
        assert set(np.unique(sums)) <= {0.0, 1.0}
    # '?' is missing: 1836 train rows have workclass '?' -> all zeros.
    wc = [i for i, n in enumerate(names) if n.startswith("workclass=")]
    assert int((X[:, wc].sum(axis=1) == 0).sum()) == 1836


def test_vocabulary_matches_training_file(adult_dir):
    pd = pytest.importorskip("pandas")
    raw = pd.read_csv(
        adult_dir / "adult.data",
        header=None,
        names=list(ADULT_COLUMNS),
        skipinitialspace=True,
        na_values="?",
    )
    for col in ADULT_CATEGORICAL_COLUMNS:
        assert list(ADULT_CATEGORIES[col]) == sorted(raw[col].dropna().unique())
    assert sum(len(v) for v in ADULT_CATEGORIES.values()) == 99


def test_matches_pandas_get_dummies(adult_dir):
    pd = pytest.importorskip("pandas")
    raw = pd.read_csv(
        adult_dir / "adult.data",
        header=None,
        names=list(ADULT_COLUMNS),
        skipinitialspace=True,
        na_values="?",
    )
    dummies = pd.get_dummies(raw.drop(columns="income"), prefix_sep="=", dtype=float)
    bunch = load_adult(adult_dir, return_X_y=False)
    assert bunch.feature_names == list(dummies.columns)
    np.testing.assert_array_equal(bunch.data, dummies.to_numpy())


def test_bunch(adult_dir):
    bunch = load_adult(adult_dir, subset="test", return_X_y=False)
    assert len(bunch.feature_names) == bunch.data.shape[1]
    assert bunch.feature_names[: len(ADULT_NUMERIC_COLUMNS)] == list(
        ADULT_NUMERIC_COLUMNS
    )
    assert "workclass=Private" in bunch.feature_names
    # Present in the vocabulary even though adult.test has no such row.
    hn = bunch.feature_names.index("native-country=Holand-Netherlands")
    assert bunch.data[:, hn].sum() == 0
    assert bunch.frame is None
    assert bunch.target.shape == (N_TEST,)
    assert list(bunch.target_names) == ["<=50K", ">50K"]
    if (adult_dir / "adult.names").is_file():
        assert bunch.DESCR == (adult_dir / "adult.names").read_text()
    else:
        assert "CC BY 4.0" in bunch.DESCR


def test_env_var_is_honored(adult_dir, monkeypatch):
    monkeypatch.setenv("CLUSTERSEARCH_DATA", str(adult_dir))
    X, y = load_adult(download=False)
    assert X.shape == (N_TRAIN, N_ONE_HOT)
    assert y.shape == (N_TRAIN,)


def test_data_home_takes_precedence_over_env(adult_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("CLUSTERSEARCH_DATA", str(tmp_path))  # empty folder
    X, _ = load_adult(adult_dir, download=False)
    assert X.shape[0] == N_TRAIN


def test_as_frame(adult_dir):
    pd = pytest.importorskip("pandas")
    X, y = load_adult(adult_dir, as_frame=True)
    assert isinstance(X, pd.DataFrame)
    assert X.shape == (N_TRAIN, 14)
    assert list(X.columns) == list(ADULT_COLUMNS[:-1])
    assert isinstance(y, pd.Series)
    assert y.shape == (N_TRAIN,)
    assert int(y.sum()) == 7841
    assert X["workclass"].isna().sum() == 1836
    assert X["age"].iloc[0] == 39
    assert X["workclass"].iloc[0] == "State-gov"
    # Test frame shares the training vocabulary.
    X_te, _ = load_adult(adult_dir, subset="test", as_frame=True)
    assert list(X_te["native-country"].cat.categories) == list(
        ADULT_CATEGORIES["native-country"]
    )


def test_as_frame_bunch(adult_dir):
    pd = pytest.importorskip("pandas")
    bunch = load_adult(adult_dir, as_frame=True, return_X_y=False, subset="test")
    assert isinstance(bunch.frame, pd.DataFrame)
    assert bunch.frame.shape == (N_TEST, 15)
    assert list(bunch.frame.columns) == list(ADULT_COLUMNS)
    assert bunch.feature_names == list(ADULT_COLUMNS[:-1])


# --------------------------------------------------------------------------
# Hand-written files
# --------------------------------------------------------------------------

TINY_DATA = (
    "39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, "
    "Not-in-family, White, Male, 2174, 0, 40, United-States, <=50K\n"
    "50, ?, 83311, Masters, 14, Married-civ-spouse, ?, Husband, Black, "
    "Female, 0, 1902, 60, ?, >50K\n"
    "23,Private,1000,Preschool,1,Widowed,Armed-Forces,Wife,Other,Male,"
    "5,6,7,Holand-Netherlands,<=50K\n"
)

TINY_TEST = (
    "|1x3 Cross validator\n"
    "25, Private, 226802, 11th, 7, Never-married, Machine-op-inspct, "
    "Own-child, Black, Male, 0, 0, 40, United-States, <=50K.\n"
    "44, Private, 160323, Some-college, 10, Married-civ-spouse, "
    "Machine-op-inspct, Husband, Black, Male, 7688, 0, 40, United-States, >50K.\n"
    "\n"
)


@pytest.fixture
def tiny_dir(tmp_path):
    (tmp_path / "adult.data").write_text(TINY_DATA)
    (tmp_path / "adult.test").write_text(TINY_TEST)
    return tmp_path


def test_tiny_file_one_hot(tiny_dir):
    X, y = load_adult(tiny_dir, download=False)
    assert X.shape == (3, N_ONE_HOT)
    np.testing.assert_array_equal(y, [0, 1, 0])
    np.testing.assert_array_equal(
        X[:, :6],
        [
            [39, 77516, 13, 2174, 0, 40],
            [50, 83311, 14, 0, 1902, 60],
            [23, 1000, 1, 5, 6, 7],
        ],
    )
    names = load_adult_feature_names()
    expected_ones = [
        {
            "workclass=State-gov",
            "education=Bachelors",
            "marital-status=Never-married",
            "occupation=Adm-clerical",
            "relationship=Not-in-family",
            "race=White",
            "sex=Male",
            "native-country=United-States",
        },
        {
            # workclass, occupation and native-country are '?': no ones.
            "education=Masters",
            "marital-status=Married-civ-spouse",
            "relationship=Husband",
            "race=Black",
            "sex=Female",
        },
        {
            "workclass=Private",
            "education=Preschool",
            "marital-status=Widowed",
            "occupation=Armed-Forces",
            "relationship=Wife",
            "race=Other",
            "sex=Male",
            "native-country=Holand-Netherlands",
        },
    ]
    for row, ones in zip(X, expected_ones, strict=True):
        got = {names[j] for j in np.flatnonzero(row[6:]) + 6}
        assert got == ones
    # '?' gives all zeros in that column's group.
    for col in ("workclass", "occupation", "native-country"):
        idx = [j for j, n in enumerate(names) if n.startswith(col + "=")]
        assert X[1, idx].sum() == 0


def test_tiny_test_file(tiny_dir):
    X, y = load_adult(tiny_dir, subset="test", download=False)
    assert X.shape == (2, N_ONE_HOT)
    np.testing.assert_array_equal(y, [0, 1])
    assert X[1, _col("education=Some-college")] == 1.0
    X_all, y_all = load_adult(tiny_dir, subset="all", download=False)
    assert X_all.shape == (5, N_ONE_HOT)
    np.testing.assert_array_equal(y_all, [0, 1, 0, 0, 1])


def test_tiny_as_frame(tiny_dir):
    pd = pytest.importorskip("pandas")
    X, y = load_adult(tiny_dir, as_frame=True, download=False)
    assert X.shape == (3, 14)
    assert pd.isna(X.loc[1, "workclass"])
    assert X.loc[2, "native-country"] == "Holand-Netherlands"
    assert X["age"].tolist() == [39, 50, 23]
    assert y.tolist() == [0, 1, 0]


def test_unknown_category_warns_and_gives_zeros(tmp_path):
    (tmp_path / "adult.data").write_text(TINY_DATA.replace("State-gov", "Moon-gov"))
    with pytest.warns(UserWarning, match="Moon-gov"):
        X, _ = load_adult(tmp_path, download=False)
    idx = [
        j
        for j, n in enumerate(load_adult_feature_names())
        if n.startswith("workclass=")
    ]
    assert X[0, idx].sum() == 0


def test_known_data_does_not_warn(tiny_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adult(tiny_dir, subset="all", download=False)


def test_malformed_line_raises(tmp_path):
    (tmp_path / "adult.data").write_text(TINY_DATA + "1, 2, 3\n")
    with pytest.raises(ValueError, match="line 4"):
        load_adult(tmp_path, download=False)


def test_missing_names_file_gives_fallback_descr(tiny_dir):
    bunch = load_adult(tiny_dir, return_X_y=False, download=False)
    assert "CC BY 4.0" in bunch.DESCR


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("download", [False, True])
def test_empty_folder_raises(tmp_path, download):
    # A named folder without the files is an error, never a silent fallback
    # to the shipped copy (download=True downloads nothing).
    with pytest.raises(FileNotFoundError, match="CLUSTERSEARCH_DATA") as info:
        load_adult(tmp_path, download=download)
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert "data_home" in msg
    assert "adult.data" in msg


def test_empty_env_folder_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("CLUSTERSEARCH_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load_adult(subset="test")
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert "the CLUSTERSEARCH_DATA environment variable" in msg
    assert "adult.test" in msg


def test_invalid_subset():
    with pytest.raises(ValueError, match="subset"):
        load_adult(subset="validation")


def test_as_frame_without_pandas(tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes import fail
    with pytest.raises(ImportError, match="pandas"):
        load_adult(tiny_dir, as_frame=True)
    # as_frame=False still works without pandas.
    X, _ = load_adult(tiny_dir)
    assert X.shape == (3, N_ONE_HOT)


# --------------------------------------------------------------------------
# The copy shipped in the package
# --------------------------------------------------------------------------

PACKAGED = Path(datasets.__file__).parent / "data" / "adult"


def test_packaged_files_are_the_uci_files(adult_dir):
    for name in ("adult.data", "adult.test", "adult.names"):
        packaged = gzip.decompress((PACKAGED / (name + ".gz")).read_bytes())
        assert packaged == (adult_dir / name).read_bytes(), name


@pytest.mark.parametrize("subset", ["train", "test", "all"])
def test_packaged_copy_gives_the_same_arrays(adult_dir, subset):
    X, y = load_adult(subset=subset)  # no data_home, no CLUSTERSEARCH_DATA
    X_ref, y_ref = load_adult(adult_dir, subset=subset)
    assert X.shape[0] == {"train": N_TRAIN, "test": N_TEST}.get(
        subset, N_TRAIN + N_TEST
    )
    np.testing.assert_array_equal(X, X_ref)
    np.testing.assert_array_equal(y, y_ref)


def test_packaged_copy_bunch_has_the_uci_description(adult_dir):
    bunch = load_adult(return_X_y=False)
    assert bunch.DESCR == (adult_dir / "adult.names").read_text()


def test_packaged_copy_carries_its_attribution():
    notice = (PACKAGED / "README.md").read_text()
    for needed in (
        "Barry Becker",
        "Ronny Kohavi",
        "UCI Machine Learning Repository",
        "10.24432/C5XW20",
        "CC BY 4.0",
    ):
        assert needed in notice


_BARE_LOAD = """
import socket

def no_network(*args, **kwargs):
    raise OSError("network used by load_adult")

socket.socket.connect = no_network
socket.create_connection = no_network

from clustersearch.datasets import load_adult

X, y = load_adult()
X_test, y_test = load_adult(subset="test")
print(X.shape[0], X.shape[1], int(y.sum()), X_test.shape[0], int(y_test.sum()))
"""


def test_packaged_copy_is_read_on_a_bare_machine(tmp_path):
    """No data_home, an empty CLUSTERSEARCH_DATA, an empty home, cwd elsewhere
    and no network: the shipped copy is read."""
    home = tmp_path / "home"
    cwd = tmp_path / "elsewhere"
    home.mkdir()
    cwd.mkdir()
    package_root = Path(datasets.__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERSEARCH_")}
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        CLUSTERSEARCH_DATA="",
        PYTHONPATH=str(package_root),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _BARE_LOAD],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        str(N_TRAIN),
        str(N_ONE_HOT),
        "7841",
        str(N_TEST),
        "3846",
    ]
    assert list(home.iterdir()) == []  # nothing downloaded or cached


def test_gzip_files_in_a_folder(tiny_dir):
    X_plain, y_plain = load_adult(tiny_dir, subset="all")
    for name in ("adult.data", "adult.test"):
        path = tiny_dir / name
        (tiny_dir / (name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    X, y = load_adult(tiny_dir, subset="all")
    np.testing.assert_array_equal(X, X_plain)
    np.testing.assert_array_equal(y, y_plain)
