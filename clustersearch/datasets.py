"""Dataset loaders.

Currently provides :func:`load_adult`, a loader for the UCI Adult (a.k.a.
"Census Income") dataset. The original UCI files ship with the package,
gzip-compressed, in ``clustersearch/data/adult`` (CC BY 4.0; see the README
there); another copy can be named with ``data_home`` or ``CLUSTERSEARCH_DATA``.

The parsing and one-hot encoding only need the standard library and NumPy;
pandas is optional and only required for ``as_frame=True``.
"""

import csv
import gzip
import importlib.resources
import itertools
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sklearn.utils import Bunch

__all__ = [
    "ADULT_CATEGORIES",
    "ADULT_COLUMNS",
    "ADULT_FEATURE_COLUMNS",
    "ADULT_NUMERIC_COLUMNS",
    "ADULT_CATEGORICAL_COLUMNS",
    "load_adult",
]

#: Environment variable naming the folder that holds ``adult.data`` etc.
DATA_ENV_VAR = "CLUSTERSEARCH_DATA"

#: All columns of the UCI files, in file order (from ``adult.names``); the
#: last one, ``income``, is the target.
ADULT_COLUMNS = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
    "income",
)

ADULT_FEATURE_COLUMNS = ADULT_COLUMNS[:-1]
_TARGET_COLUMN = ADULT_COLUMNS[-1]

ADULT_NUMERIC_COLUMNS = (
    "age",
    "fnlwgt",
    "education-num",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
)

ADULT_CATEGORICAL_COLUMNS = tuple(
    c for c in ADULT_FEATURE_COLUMNS if c not in ADULT_NUMERIC_COLUMNS
)

#: Fixed one-hot vocabulary: every distinct non-missing value of each
#: categorical column in the UCI training file ``adult.data``, sorted.
#: Using a fixed vocabulary gives train and test identical columns even
#: though ``adult.test`` has no "Holand-Netherlands" row.
ADULT_CATEGORIES = {
    "workclass": (
        "Federal-gov",
        "Local-gov",
        "Never-worked",
        "Private",
        "Self-emp-inc",
        "Self-emp-not-inc",
        "State-gov",
        "Without-pay",
    ),
    "education": (
        "10th",
        "11th",
        "12th",
        "1st-4th",
        "5th-6th",
        "7th-8th",
        "9th",
        "Assoc-acdm",
        "Assoc-voc",
        "Bachelors",
        "Doctorate",
        "HS-grad",
        "Masters",
        "Preschool",
        "Prof-school",
        "Some-college",
    ),
    "marital-status": (
        "Divorced",
        "Married-AF-spouse",
        "Married-civ-spouse",
        "Married-spouse-absent",
        "Never-married",
        "Separated",
        "Widowed",
    ),
    "occupation": (
        "Adm-clerical",
        "Armed-Forces",
        "Craft-repair",
        "Exec-managerial",
        "Farming-fishing",
        "Handlers-cleaners",
        "Machine-op-inspct",
        "Other-service",
        "Priv-house-serv",
        "Prof-specialty",
        "Protective-serv",
        "Sales",
        "Tech-support",
        "Transport-moving",
    ),
    "relationship": (
        "Husband",
        "Not-in-family",
        "Other-relative",
        "Own-child",
        "Unmarried",
        "Wife",
    ),
    "race": (
        "Amer-Indian-Eskimo",
        "Asian-Pac-Islander",
        "Black",
        "Other",
        "White",
    ),
    "sex": (
        "Female",
        "Male",
    ),
    "native-country": (
        "Cambodia",
        "Canada",
        "China",
        "Columbia",
        "Cuba",
        "Dominican-Republic",
        "Ecuador",
        "El-Salvador",
        "England",
        "France",
        "Germany",
        "Greece",
        "Guatemala",
        "Haiti",
        "Holand-Netherlands",
        "Honduras",
        "Hong",
        "Hungary",
        "India",
        "Iran",
        "Ireland",
        "Italy",
        "Jamaica",
        "Japan",
        "Laos",
        "Mexico",
        "Nicaragua",
        "Outlying-US(Guam-USVI-etc)",
        "Peru",
        "Philippines",
        "Poland",
        "Portugal",
        "Puerto-Rico",
        "Scotland",
        "South",
        "Taiwan",
        "Thailand",
        "Trinadad&Tobago",
        "United-States",
        "Vietnam",
        "Yugoslavia",
    ),
}

_MISSING = "?"
_POSITIVE_LABEL = ">50K"
_TARGET_NAMES = ("<=50K", ">50K")
_FILES = {"train": "adult.data", "test": "adult.test"}
_SUBSETS = ("train", "test", "all")

_FALLBACK_DESCR = """\
UCI Adult ("Census Income") dataset
===================================

Extracted by Barry Becker from the 1994 US Census database; donated by
Ronny Kohavi and Barry Becker. 48,842 instances (train=32,561,
test=16,281), 14 features (6 numeric, 8 categorical), binary target:
whether a person's income exceeds $50K/year.

Source: https://archive.ics.uci.edu/dataset/2/adult
Citation: Becker, B. & Kohavi, R. (1996). Adult. UCI Machine Learning
Repository. https://doi.org/10.24432/C5XW20
License: Creative Commons Attribution 4.0 International (CC BY 4.0).
"""


# --------------------------------------------------------------------------
# Locating the data
# --------------------------------------------------------------------------


def _packaged_folder():
    """The copy shipped in the package (``clustersearch/data/adult``)."""
    return importlib.resources.files("clustersearch") / "data" / "adult"


def _resolve_data_home(data_home):
    """Return ``(folder, how)`` where *how* says where the folder came from."""
    if data_home is not None:
        return Path(os.fspath(data_home)).expanduser(), "the data_home argument"
    env = os.environ.get(DATA_ENV_VAR, "")
    if env:
        return Path(env).expanduser(), f"the {DATA_ENV_VAR} environment variable"
    return _packaged_folder(), "the copy shipped with clustersearch"


def _find(folder, name):
    """``folder/name``, else ``folder/name.gz``, else None."""
    for candidate in (name, name + ".gz"):
        path = folder / candidate
        if path.is_file():
            return path
    return None


def _read_text(path, errors="strict"):
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors=errors)


def _guidance(folder, how, files):
    return (
        f"looked for {', '.join(files)} (or the same gzip-compressed, .gz) in "
        f"'{folder}' (from {how}). Put the UCI files adult.data and adult.test "
        f"in that folder, or leave data_home=None and unset {DATA_ENV_VAR} to "
        f"read the copy shipped with clustersearch"
    )


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def _read_uci_file(path):
    """Parse one UCI Adult file into 15 lists of stripped strings.

    Blank lines and ``|`` comment lines (``adult.test`` starts with
    ``|1x3 Cross validator``) are skipped.
    """
    n_cols = len(ADULT_COLUMNS)
    rows = []
    lines = _read_text(path).splitlines()
    for lineno, row in enumerate(csv.reader(lines), start=1):
        if len(row) == n_cols:
            rows.append(row)
        elif not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        elif row[0].lstrip().startswith("|"):
            continue  # comment line
        else:
            raise ValueError(
                f"{path}, line {lineno}: expected {n_cols} comma-separated "
                f"fields, got {len(row)}"
            )
    if not rows:
        return [[] for _ in range(n_cols)]
    return [list(map(str.strip, col)) for col in zip(*rows, strict=True)]


def _concat(parts):
    """Concatenate several column-lists produced by :func:`_read_uci_file`."""
    if len(parts) == 1:
        return parts[0]
    return [sum((p[j] for p in parts), []) for j in range(len(ADULT_COLUMNS))]


def _labels_to_y(labels):
    """1 for '>50K' (with or without the trailing '.' of adult.test), else 0."""
    return np.fromiter(
        (label.rstrip(".").strip() == _POSITIVE_LABEL for label in labels),
        dtype=np.int64,
        count=len(labels),
    )


def _numeric(values):
    """Strings to float64; '?' or empty becomes NaN."""
    return np.array(
        ["nan" if v in (_MISSING, "") else v for v in values], dtype=np.float64
    )


def _category_codes(name, values):
    """Index into ADULT_CATEGORIES[name]; -1 for missing / unknown values."""
    lookup = {cat: i for i, cat in enumerate(ADULT_CATEGORIES[name])}
    codes = np.fromiter(
        map(lookup.get, values, itertools.repeat(-1)),
        dtype=np.intp,
        count=len(values),
    )
    unknown = set()
    if (codes < 0).any():
        unknown = {values[i] for i in np.flatnonzero(codes < 0)} - {_MISSING, ""}
    if unknown:
        warnings.warn(
            f"Column {name!r} has values outside the fixed training-set "
            f"vocabulary, treated as missing: {sorted(unknown)}",
            UserWarning,
            stacklevel=4,
        )
    return codes


def _one_hot_feature_names():
    names = list(ADULT_NUMERIC_COLUMNS)
    for col in ADULT_CATEGORICAL_COLUMNS:
        names.extend(f"{col}={cat}" for cat in ADULT_CATEGORIES[col])
    return names


def _encode(columns):
    """One-hot encode parsed columns into a float64 array.

    Layout, like ``pd.get_dummies`` on the raw frame: the 6 numeric columns
    first (as-is), then one indicator per (categorical column, category) in
    the order of ``ADULT_CATEGORICAL_COLUMNS`` and ``ADULT_CATEGORIES``.
    A missing ('?') value gives all zeros in its column's group.
    """
    by_name = dict(zip(ADULT_COLUMNS, columns, strict=True))
    n_rows = len(columns[0])
    n_numeric = len(ADULT_NUMERIC_COLUMNS)
    n_features = n_numeric + sum(len(v) for v in ADULT_CATEGORIES.values())
    X = np.zeros((n_rows, n_features), dtype=np.float64)
    for j, col in enumerate(ADULT_NUMERIC_COLUMNS):
        X[:, j] = _numeric(by_name[col])
    offset = n_numeric
    rows = np.arange(n_rows)
    for col in ADULT_CATEGORICAL_COLUMNS:
        codes = _category_codes(col, by_name[col])
        present = codes >= 0
        X[rows[present], offset + codes[present]] = 1.0
        offset += len(ADULT_CATEGORIES[col])
    return X


def _to_frame(columns, pd):
    """Raw feature DataFrame (14 columns) from parsed columns."""
    by_name = dict(zip(ADULT_COLUMNS, columns, strict=True))
    data = {}
    for col in ADULT_FEATURE_COLUMNS:
        values = by_name[col]
        if col in ADULT_NUMERIC_COLUMNS:
            arr = _numeric(values)
            if not np.isnan(arr).any() and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            data[col] = arr
        else:
            codes = _category_codes(col, values)
            data[col] = pd.Categorical.from_codes(
                codes, categories=list(ADULT_CATEGORIES[col])
            )
    return pd.DataFrame(data, columns=list(ADULT_FEATURE_COLUMNS))


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def load_adult(
    data_home: str | os.PathLike[str] | None = None,
    *,
    subset: Literal["train", "test", "all"] = "train",
    return_X_y: bool = True,
    as_frame: bool = False,
    download: bool = True,
) -> tuple[Any, Any] | Bunch:
    """Load the UCI Adult ("Census Income") binary classification dataset.

    The original UCI files are read: ``adult.data`` (train, 32,561 rows)
    and ``adult.test`` (test, 16,281 rows; its first line is a ``|1x3 Cross
    validator`` comment and its labels carry a trailing ``.``, e.g.
    ``>50K.``). They are read from *data_home*, else from the folder named
    by the ``CLUSTERSEARCH_DATA`` environment variable, else from the copy
    shipped with clustersearch (``clustersearch/data/adult``, gzip-compressed),
    so no network access is ever needed. In a folder, ``adult.data.gz`` etc.
    are read when the uncompressed files are absent.

    Fields are whitespace-stripped and ``'?'`` marks a missing value. The
    target is 1 for ``>50K`` (with or without the trailing ``.``) and 0
    otherwise.

    The data is licensed under Creative Commons Attribution 4.0
    International (CC BY 4.0); cite Becker, B. & Kohavi, R. (1996). Adult.
    UCI Machine Learning Repository. https://doi.org/10.24432/C5XW20

    Nothing is cached in memory; every call re-reads the files.

    Parameters
    ----------
    data_home : str or path-like, default=None
        Folder holding ``adult.data``, ``adult.test`` and optionally
        ``adult.names`` (each may be gzip-compressed, ``.gz``). ``None``
        means the ``CLUSTERSEARCH_DATA`` environment variable if set and
        non-empty, else the copy shipped with clustersearch.
    subset : {"train", "test", "all"}, default="train"
        Which split to return. ``"all"`` is train followed by test.
    return_X_y : bool, default=True
        If True, return ``(X, y)``; otherwise a :class:`~sklearn.utils.Bunch`.
    as_frame : bool, default=False
        If False, ``X`` is a float64 NumPy array, one-hot encoded: the 6
        numeric columns as-is, followed by one 0/1 column per category of
        each of the 8 categorical columns, using the fixed vocabulary
        ``ADULT_CATEGORIES`` (every non-missing category seen in the training
        file, sorted), so train and test always have the same 105 columns.
        A missing value gives all zeros in that column's group; a value not
        in the vocabulary is treated the same way, with a ``UserWarning``.
        If True, ``X`` is the raw pandas DataFrame with the 14 original
        columns (numeric columns as integers, categorical ones as
        ``category`` dtype with the fixed vocabulary, missing as NaN) and
        ``y`` a pandas Series named ``"income"``. Requires pandas.
    download : bool, default=True
        Ignored; kept so that existing calls keep working. Nothing is
        downloaded: the data ships with the package.

    Returns
    -------
    X : ndarray of shape (n_samples, 105) or DataFrame of shape (n_samples, 14)
        Features; returned when ``return_X_y=True``.
    y : ndarray of shape (n_samples,) or Series
        Integer target (0 or 1); returned when ``return_X_y=True``.
    data : :class:`~sklearn.utils.Bunch`
        Returned when ``return_X_y=False``, with attributes:

        - ``data``: ``X`` as above.
        - ``target``: ``y`` as above.
        - ``feature_names``: list of column names of ``data``; one-hot
          columns are named like ``"workclass=Private"``.
        - ``target_names``: ``["<=50K", ">50K"]`` (for target 0 and 1).
        - ``frame``: None if ``as_frame=False``, else a DataFrame with the
          14 feature columns and the ``"income"`` target column.
        - ``DESCR``: the contents of ``adult.names`` if present in the
          folder (it is in the shipped copy), else a short built-in
          description.

    Raises
    ------
    ValueError
        If *subset* is not one of "train", "test", "all", or a file is
        malformed.
    ImportError
        If ``as_frame=True`` and pandas is not installed.
    FileNotFoundError
        If a needed file is missing from the folder named by *data_home* or
        ``CLUSTERSEARCH_DATA`` (there is no silent fallback to the shipped
        copy when a folder is named).

    Examples
    --------
    >>> from clustersearch.datasets import load_adult
    >>> X, y = load_adult()  # doctest: +SKIP
    >>> X.shape, y.mean().round(2)  # doctest: +SKIP
    ((32561, 105), 0.24)
    >>> X_test, y_test = load_adult(subset="test")  # doctest: +SKIP
    >>> X_test.shape  # doctest: +SKIP
    (16281, 105)
    >>> bunch = load_adult("/path/to/adult", return_X_y=False)  # doctest: +SKIP
    >>> bunch.feature_names[6]  # doctest: +SKIP
    'workclass=Federal-gov'
    """
    if subset not in _SUBSETS:
        raise ValueError(f"subset must be one of {_SUBSETS}, got {subset!r}")

    pd: Any = None
    if as_frame:
        try:
            # pandas is optional: pd stays None unless as_frame.
            import pandas as pd  # type: ignore[no-redef]
        except ImportError as exc:
            raise ImportError(
                "load_adult(as_frame=True) requires pandas; install it with "
                "'pip install pandas' or use as_frame=False."
            ) from exc

    folder, how = _resolve_data_home(data_home)
    splits = ("train", "test") if subset == "all" else (subset,)
    paths = {_FILES[split]: _find(folder, _FILES[split]) for split in splits}
    absent = [name for name, path in paths.items() if path is None]
    if absent:
        raise FileNotFoundError(
            f"Adult dataset not found: {_guidance(folder, how, absent)}."
        )
    parts = [_read_uci_file(path) for path in paths.values()]

    columns = _concat(parts)
    y = _labels_to_y(columns[-1])

    frame = None
    if as_frame:
        X = _to_frame(columns, pd)
        y = pd.Series(y, name=_TARGET_COLUMN)
        feature_names = list(ADULT_FEATURE_COLUMNS)
        if not return_X_y:
            frame = pd.concat([X, y], axis=1)
    else:
        X = _encode(columns)
        feature_names = _one_hot_feature_names()

    if return_X_y:
        return X, y

    names_file = _find(folder, "adult.names")
    try:
        descr = _read_text(names_file, "replace") if names_file else _FALLBACK_DESCR
    except OSError:
        descr = _FALLBACK_DESCR

    return Bunch(
        data=X,
        target=y,
        feature_names=feature_names,
        target_names=list(_TARGET_NAMES),
        frame=frame,
        DESCR=descr,
    )
