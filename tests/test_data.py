"""The data plane: each dataset reaches each node once, by content hash."""

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_ran_on_workers, assert_same_results
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import GridSearchCV
from sklearn.tree import DecisionTreeClassifier

from clustersearch import ClusterGridSearchCV, LocalCluster
from clustersearch.client.blobs import BlobTable
from clustersearch.node.cache import NodeCache
from clustersearch.wire.blobs import MIN_BLOB_BYTES, parse_size
from clustersearch.wire.serialization import dumps_with_blobs


def _data(seed, n=4000, d=40):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, d))
    y = (X[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)
    return X, y


GRID = {"max_depth": [2, 4, 8], "min_samples_leaf": [1, 5]}


def _split_bytes(n, cv):
    # train + test indices (int64) of every split
    return cv * n * 8


def test_each_node_gets_the_data_once_and_a_second_search_sends_none(cluster):
    # Data no other test uses (each cluster has a cache of its own): the
    # nodes' caches start without it. Fixed seeds: the same data every run.
    X, y = _data(seed=11)
    dataset = X.nbytes + y.nbytes + _split_bytes(len(X), 3)

    first = ClusterGridSearchCV(
        DecisionTreeClassifier(random_state=0), GRID, cv=3, cluster=cluster
    ).fit(X, y)
    assert_ran_on_workers(first, cluster, 18)
    sent = first.data_bytes_per_node_
    # The nodes of one LocalCluster share a cache folder: the data went
    # there once in all, and no more than its size (+10 %) to any node.
    assert dataset <= sum(sent.values()) <= 1.1 * dataset, sent
    # Task messages carry references, not the data (a test fold's indices
    # alone are 10.7 kB), nor _fit_and_score's 3.4 kB docstring, which
    # scikit-learn's call wrapper copies: 4.9 kB per fit here, 8.3 kB with it.
    messages = sum(first.message_bytes_per_node_.values())
    assert messages < 6_000 * 18, first.message_bytes_per_node_

    second = ClusterGridSearchCV(
        DecisionTreeClassifier(random_state=0), GRID, cv=3, cluster=cluster
    ).fit(X.copy(), y.copy())  # equal data, other objects: found by content
    assert sum(second.data_bytes_per_node_.values()) == 0, second.data_bytes_per_node_
    expected = GridSearchCV(DecisionTreeClassifier(random_state=0), GRID, cv=3).fit(X, y)
    assert_same_results(first, expected)
    assert_same_results(second, expected)


def test_a_task_message_does_not_grow_with_the_grid(monkeypatch):
    # scikit-learn (>= 1.9) gives every _fit_and_score call a callback
    # context whose parent maps the contexts of all the search's fits; sent
    # whole, a one-fit message grew by 85 bytes per fit of the search
    # (116 kB per message at 1,200 fits). joblib's first batches hold one
    # call each: compare those of a 30-fit and a 1,200-fit search.
    import clustersearch.client.session as scheduler

    sizes = []

    def recording(func, table, drop=None):
        payload, refs = dumps_with_blobs(func, table, drop)
        if len(func) == 1:
            sizes[-1].append(len(payload))
        return payload, refs

    monkeypatch.setattr(scheduler, "dumps_with_blobs", recording)
    X, y = _data(seed=3, n=300, d=5)
    # joblib's own batching (longest_first off: the scheduler would send the
    # 1,200-fit search in batches of 18 fits from the start).
    with LocalCluster(n_workers=2, longest_first=False) as cluster:
        for n_candidates in (10, 400):
            sizes.append([])
            grid = {"min_samples_leaf": list(range(1, n_candidates + 1))}
            search = ClusterGridSearchCV(
                DecisionTreeClassifier(random_state=0), grid, cv=3, cluster=cluster
            ).fit(X, y)
            assert_ran_on_workers(search, cluster, 3 * n_candidates)
    small, large = sizes
    assert small and large, sizes
    # The search itself travels in every task (scikit-learn's caller=self),
    # its param_grid too: 0.9 kB more for the 400-value grid. Not 100 kB.
    assert max(large) < min(small) + 2_000, (small[:5], large[:5])


def test_processes_of_one_node_share_one_copy():
    X, y = _data(seed=5)
    with LocalCluster(n_workers=1, concurrency=2) as cluster:
        search = ClusterGridSearchCV(
            DecisionTreeClassifier(random_state=0), GRID, cv=3, cluster=cluster
        ).fit(X, y)
        (node,) = cluster.node_names
        blobs = sorted(Path(cluster.cache_dir).glob("*.npy"))
    dataset = X.nbytes + y.nbytes + _split_bytes(len(X), 3)
    (sent,) = search.data_bytes_per_node_.values()
    # Sent once (plus the .npy headers), although two processes used it.
    assert dataset <= sent < dataset + 8 * 200
    assert list(search.data_bytes_per_node_) == [node]
    # X, y and the 3 x 2 index arrays, each stored once.
    assert len(blobs) == 8


class Damaging(ClassifierMixin, BaseEstimator):
    """A classifier whose fit, on a node, can damage the node's data cache."""

    def __init__(self, damage="none", delay=0.05, cache_dir=None):
        self.damage = damage
        self.delay = delay
        self.cache_dir = cache_dir

    def fit(self, X, y):
        cache = self.cache_dir
        if cache and self.damage != "none":
            for path in Path(cache).glob("*.npy"):
                if path.name.startswith("."):  # another process's temporary file
                    continue
                if self.damage == "wipe":
                    path.unlink(missing_ok=True)
                elif self.damage == "corrupt":
                    # A new file with flipped bytes (processes that mapped
                    # the old one keep it, as after a disk write elsewhere).
                    # Another process may find an earlier corruption and
                    # delete the file meanwhile.
                    try:
                        data = bytearray(path.read_bytes())
                    except FileNotFoundError:
                        continue
                    data[-8:] = bytes(255 - b for b in data[-8:])
                    # A name of this process's own: two nodes share the
                    # folder and may damage it at the same moment.
                    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
                    tmp.write_bytes(data)
                    os.replace(tmp, path)
        time.sleep(self.delay)
        self.classes_ = np.unique(y)
        self.mean_ = float(np.asarray(X).mean())
        return self

    def predict(self, X):
        X = np.asarray(X)
        return np.where(X[:, 0] > self.mean_, self.classes_[-1], self.classes_[0])


@pytest.mark.parametrize("damage", ["wipe", "corrupt"])
def test_a_damaged_cache_is_fetched_again_not_a_failed_fit(cluster, damage):
    X, y = _data(seed={"wipe": 101, "corrupt": 102}[damage])
    dataset = X.nbytes + y.nbytes + _split_bytes(len(X), 3)
    grid = {"damage": ["none", "none", damage, "none", "none", "none", "none", "none"]}
    damaging = Damaging(cache_dir=cluster.cache_dir)
    search = ClusterGridSearchCV(damaging, grid, cv=3, cluster=cluster).fit(X, y)
    expected = GridSearchCV(Damaging(), grid, cv=3).fit(X, y)
    assert_ran_on_workers(search, cluster, 24)
    assert_same_results(search, expected)
    assert not np.isnan(search.cv_results_["mean_test_score"]).any()
    # The damaged blobs were sent again.
    assert sum(search.data_bytes_per_node_.values()) > 1.1 * dataset, search.data_bytes_per_node_


# -- the pieces, without a cluster ------------------------------------------


def _store(table, cache, refs):
    for digest, kind, _ in refs:
        with open(cache.path(digest, kind), "wb") as f:
            for chunk in table.get(digest).chunks(size=1000):
                f.write(chunk)


def test_large_arrays_become_references_small_ones_stay_inline(tmp_path):
    table = BlobTable()
    big = np.arange(MIN_BLOB_BYTES // 8, dtype=np.int64)
    small = np.arange(10)
    fortran = np.asfortranarray(np.random.RandomState(0).normal(size=(300, 7)))
    strided = np.arange(4 * MIN_BLOB_BYTES, dtype=np.float64)[::2]
    objects = np.array(["a", 1, None] * 1000, dtype=object)
    obj = {"big": big, "again": big, "small": small, "f": fortran, "s": strided, "o": objects}
    payload, refs = dumps_with_blobs(obj, table)
    assert len(payload) < 2000
    assert sorted(kind for _, kind, _ in refs) == ["npy", "npy", "npy", "pkl"]
    # Each reference declares its blob's size (what a node accepts of it).
    assert all(n == table.get(d).nbytes > 0 for d, _, n in refs)
    cache = NodeCache(tmp_path)
    _store(table, cache, refs)
    assert all(cache._valid(d, k) for d, k, _ in refs)
    loaded = cache.loads(payload)
    assert loaded["big"] is loaded["again"]
    np.testing.assert_array_equal(loaded["big"], big)
    np.testing.assert_array_equal(loaded["small"], small)
    np.testing.assert_array_equal(loaded["f"], fortran)
    np.testing.assert_array_equal(loaded["s"], strided)
    assert list(loaded["o"]) == list(objects)
    # Shared, read-only pages: a fit cannot change the node's copy.
    assert not loaded["big"].flags.writeable


def test_a_foreign_persistent_id_is_refused(tmp_path):
    import io

    class Foreign(pickle.Pickler):
        def persistent_id(self, obj):
            return ("something-else", 1) if obj == "x" else None

    buffer = io.BytesIO()
    Foreign(buffer).dump(["x"])
    with pytest.raises(pickle.UnpicklingError, match="unknown persistent id"):
        NodeCache(tmp_path).loads(buffer.getvalue())
    assert NodeCache(tmp_path).loads(pickle.dumps([1, 2])) == [1, 2]


def test_equal_content_is_one_blob_and_hashed_once():
    table = BlobTable()
    a = np.ones((100, 100))
    _, refs_a = dumps_with_blobs(a, table)
    _, refs_b = dumps_with_blobs(a.copy(), table)
    assert refs_a == refs_b
    assert len(table.blobs) == 1


def test_cache_evicts_least_recently_used_within_its_bound(tmp_path):
    table = BlobTable()
    arrays = [np.full(2000, i, dtype=np.float64) for i in range(5)]  # 16 kB each
    cache = NodeCache(tmp_path, max_bytes=40_000)
    refs = []
    for array in arrays:
        _, (ref,) = dumps_with_blobs(array, table)
        _store(table, cache, [ref])
        assert cache._valid(*ref[:2])
        refs.append(ref)
        cache._evict(keep={ref[0]})
        time.sleep(0.01)
    left = {p.name.split(".")[0] for p in tmp_path.glob("*.npy")}
    assert left == {refs[3][0], refs[4][0]}
    assert sum(p.stat().st_size for p in tmp_path.glob("*.npy")) <= 40_000


def test_a_corrupted_file_is_not_loaded(tmp_path):
    table = BlobTable()
    _, (ref,) = dumps_with_blobs(np.ones(5000), table)
    cache = NodeCache(tmp_path)
    _store(table, cache, [ref])
    path = cache.path(*ref[:2])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)
    assert not cache._valid(*ref[:2])
    assert not path.exists()


@pytest.mark.parametrize(
    "text, expected",
    [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1000", 1000), ("1.5G", int(1.5 * 2**30))],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "2XB", "GB"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_cli_rejects_a_bad_cache_size(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "clustersearch", "worker", "--broker",
         f"filesystem://{tmp_path}", "--cache-size", "lots", "--allow-root"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--cache-size" in proc.stderr and "not a size" in proc.stderr


def _blob_files(cluster, X):
    """The cache files holding ``X`` (by its content hash) in ``cluster``'s cache."""
    _, refs = dumps_with_blobs(X, BlobTable())
    (digest, kind, _nbytes), = refs
    return list(Path(cluster.cache_dir).glob(f"{digest}.{kind}"))


def test_cache_size_bounds_the_nodes_cache_end_to_end():
    # Each dataset takes more than half of the bound: the second search's
    # data pushes the first's out, and a third search on the first data
    # fetches it again, with scikit-learn's results.
    first, second = _data(seed=201), _data(seed=202)
    bound = 2_000_000
    assert bound / 2 < first[0].nbytes < bound
    grid = {"max_depth": [2, 4]}
    tree = DecisionTreeClassifier(random_state=0)
    expected = GridSearchCV(tree, grid, cv=3).fit(*first)
    with LocalCluster(n_workers=1, cache_size=bound) as cluster:
        search = ClusterGridSearchCV(tree, grid, cv=3, cluster=cluster).fit(*first)
        assert_same_results(search, expected)
        assert _blob_files(cluster, first[0]), "the first data never reached the cache"
        ClusterGridSearchCV(tree, grid, cv=3, cluster=cluster).fit(*second)
        assert _blob_files(cluster, second[0])
        assert not _blob_files(cluster, first[0]), "the first data was not evicted"
        sizes = [p.stat().st_size for p in Path(cluster.cache_dir).iterdir()]
        assert sum(sizes) <= bound, sizes

        again = ClusterGridSearchCV(tree, grid, cv=3, cluster=cluster).fit(*first)
        assert_ran_on_workers(again, cluster, 6)
        # Fetched again: X at least (the rest may have stayed).
        assert sum(again.data_bytes_per_node_.values()) >= first[0].nbytes
        assert _blob_files(cluster, first[0])
        assert_same_results(again, expected)
