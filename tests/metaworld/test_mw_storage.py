import json

import numpy as np
import pytest

from recipes.metaworld.storage import (DatasetError, OfflineDataset, load_dataset, load_task, read_sidecar,
                                       save_dataset, save_task, task_paths)


def test_round_trip(tmp_path, synthetic):
    save_dataset(tmp_path, synthetic)
    back = load_dataset(tmp_path, synthetic.tasks)
    assert back.tasks == synthetic.tasks
    for t in synthetic.tasks:
        a, b = synthetic[t], back[t]
        for key in ("observations", "actions", "rewards", "episode_starts", "success"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
            assert getattr(a, key).dtype == getattr(b, key).dtype
        assert b.provenance == {"made_by": "test"}
    meta = read_sidecar(tmp_path, "reach-v3")
    stats = meta["stats"]
    obs = synthetic["reach-v3"].observations.astype(np.float64)
    np.testing.assert_allclose(stats["state_mean"], obs.mean(0))
    np.testing.assert_allclose(stats["state_std"], obs.std(0))
    returns = synthetic["reach-v3"].episode_returns()
    assert stats["return_quantiles"]["q50"] == pytest.approx(np.median(returns))
    assert stats["episode_returns"] == pytest.approx(returns.tolist())
    assert meta["n_transitions"] == 177 and meta["n_episodes"] == 7


def test_episode_helpers(synthetic):
    d = synthetic["push-v3"]
    assert d.n_episodes == 6 and d.n_transitions == 153
    np.testing.assert_array_equal(d.episode_lengths(), [12, 60, 4, 33, 18, 26])
    assert d.episode_returns()[2] == pytest.approx(d.rewards[72:76].astype(np.float64).sum())
    h = d.head(2)
    assert h.n_transitions == 72 and h.n_episodes == 2 and len(h.success) == 2


def test_refuses_overwrite(tmp_path, synthetic):
    save_task(tmp_path, synthetic["reach-v3"])
    with pytest.raises(DatasetError, match="already stored"):
        save_task(tmp_path, synthetic["reach-v3"])


def test_missing_task_names_file(tmp_path, synthetic):
    save_task(tmp_path, synthetic["reach-v3"])
    with pytest.raises(DatasetError, match=r"task push-v3 is missing .*push-v3\.npz"):
        load_dataset(tmp_path, ["reach-v3", "push-v3"])


def test_truncated_archive(tmp_path, synthetic):
    save_task(tmp_path, synthetic["reach-v3"])
    npz, _ = task_paths(tmp_path, "reach-v3")
    npz.write_bytes(npz.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"reach-v3\.npz: .*truncated"):
        load_task(tmp_path, "reach-v3")


def test_corrupt_archive_same_size(tmp_path, synthetic):
    save_task(tmp_path, synthetic["reach-v3"])
    npz, _ = task_paths(tmp_path, "reach-v3")
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"reach-v3\.npz: content hash differs"):
        load_task(tmp_path, "reach-v3")
    # without the hash check the archive itself must still be caught (zip CRC / decompression)
    with pytest.raises(DatasetError, match=r"reach-v3\.npz"):
        load_task(tmp_path, "reach-v3", check_hash=False)


def test_bad_sidecar(tmp_path, synthetic):
    save_task(tmp_path, synthetic["reach-v3"])
    _, side = task_paths(tmp_path, "reach-v3")
    side.write_text("{not json")
    with pytest.raises(DatasetError, match=r"reach-v3\.json: not valid JSON"):
        load_task(tmp_path, "reach-v3")


def _rewrite(tmp_path, task, **arrays):
    """Replace arrays inside a stored archive and fix the sidecar's size/hash, so only validation can object."""
    import hashlib
    import io

    npz, side = task_paths(tmp_path, task)
    with np.load(npz) as f:
        content = {k: f[k] for k in f.files}
    content.update(arrays)
    buf = io.BytesIO()
    np.savez_compressed(buf, **content)
    npz.write_bytes(buf.getvalue())
    meta = json.loads(side.read_text())
    meta.update(npz_bytes=len(buf.getvalue()), npz_sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    side.write_text(json.dumps(meta))


@pytest.mark.parametrize("change, message", [
    (lambda d: {"observations": np.where(np.arange(177)[:, None] == 5, np.nan, d.observations).astype(np.float32)},
     "observations holds 39 NaN/inf"),
    (lambda d: {"rewards": d.rewards[:-1]}, "must agree"),
    (lambda d: {"actions": d.actions.astype(np.float64)}, "actions has dtype float64"),
    (lambda d: {"episode_starts": np.array([0, 50, 40, 177])}, "episode_starts must rise strictly"),
    (lambda d: {"observations": d.observations[:, :30]}, "observations have 30 dimensions, the environment has 39"),
    (lambda d: {"success": np.ones(3, bool)}, "success must be bool of shape"),
])
def test_invalid_arrays(tmp_path, synthetic, change, message):
    save_task(tmp_path, synthetic["reach-v3"])
    _rewrite(tmp_path, "reach-v3", **change(synthetic["reach-v3"]))
    with pytest.raises(DatasetError, match=message) as err:
        load_task(tmp_path, "reach-v3")
    assert "reach-v3.npz" in str(err.value)


def test_dims_disagree_between_tasks(tmp_path, make_task):
    ds = {"reach-v3": make_task("reach-v3", [5, 5]), "push-v3": make_task("push-v3", [5, 5], act_dim=3)}
    with pytest.raises(DatasetError, match="disagree on"):
        OfflineDataset(["reach-v3", "push-v3"], ds)
    for d in ds.values():
        save_task(tmp_path, d)
    with pytest.raises(DatasetError, match=r"push-v3\.npz: actions have 3 dimensions"):
        load_dataset(tmp_path, ["reach-v3", "push-v3"])
    with pytest.raises(DatasetError, match="disagree on"):
        load_dataset(tmp_path, ["reach-v3", "push-v3"], obs_dim=None, act_dim=None)


def test_demonstrations_round_trip(tmp_path, synthetic, make_task):
    demos = OfflineDataset(synthetic.tasks, {t: make_task(t, [4, 6], seed=5) for t in synthetic.tasks})
    save_dataset(tmp_path, OfflineDataset(synthetic.tasks, synthetic.data, demos))
    assert (tmp_path / "demos-2" / "push-v3.npz").exists()
    back = load_dataset(tmp_path, synthetic.tasks, demos=2)
    np.testing.assert_array_equal(back.demos["push-v3"].observations, demos["push-v3"].observations)
    assert load_dataset(tmp_path, synthetic.tasks).demos is None
    with pytest.raises(DatasetError, match=r"demos-3/reach-v3\.npz"):
        load_dataset(tmp_path, synthetic.tasks, demos=3)
    with pytest.raises(DatasetError, match="demonstrations cover"):
        OfflineDataset(synthetic.tasks, synthetic.data, OfflineDataset(["reach-v3"], {"reach-v3": demos["reach-v3"]}))
