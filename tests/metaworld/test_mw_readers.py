import pickle

import numpy as np
import pytest

from recipes.metaworld.readers import PickleNotAllowedError, read_episode_dirs, read_trajectory_pickles
from recipes.metaworld.storage import DatasetError, load_dataset, save_dataset


def _episodes(rng, n, length=6, obs_dim=39, act_dim=4, done_key="terminals", reward_col=False):
    out = []
    for _ in range(n):
        ep = {"observations": rng.normal(size=(length, obs_dim)), "actions": rng.uniform(-1, 1, (length, act_dim)),
              "rewards": rng.uniform(0, 1, (length, 1) if reward_col else length),
              done_key: np.zeros(length, bool)}
        out.append(ep)
    return out


def _write_dirs(root, task_dir, episodes):
    (root / task_dir).mkdir(parents=True)
    for i, ep in enumerate(episodes):
        np.savez(root / task_dir / f"{i}.npz", **ep)


def _same(data, episodes):
    np.testing.assert_array_equal(data.observations, np.concatenate([e["observations"] for e in episodes]).astype(np.float32))
    np.testing.assert_array_equal(data.actions, np.concatenate([e["actions"] for e in episodes]).astype(np.float32))
    np.testing.assert_array_equal(data.rewards, np.concatenate([np.ravel(e["rewards"]) for e in episodes]).astype(np.float32))
    np.testing.assert_array_equal(data.episode_lengths(), [len(e["rewards"]) for e in episodes])


def test_episode_dirs_v2_names(tmp_path):
    rng = np.random.default_rng(0)
    eps = {"reach-v3": _episodes(rng, 5), "push-v3": _episodes(rng, 5, reward_col=True, done_key="dones")}
    _write_dirs(tmp_path, "reach-v2", eps["reach-v3"])   # published data uses -v2 folder names
    _write_dirs(tmp_path, "push-v3", eps["push-v3"])
    ds = read_episode_dirs(tmp_path, ["reach-v3", "push-v3"], episodes=4)
    assert ds.tasks == ["reach-v3", "push-v3"]
    for t in ds.tasks:
        _same(ds[t], eps[t][:4])
        assert ds[t].success is None  # not recorded by this format


def test_episode_dirs_published_split(tmp_path):
    rng = np.random.default_rng(1)
    eps = _episodes(rng, 2000, length=2)
    _write_dirs(tmp_path, "reach-v2", eps)
    near = read_episode_dirs(tmp_path, ["reach-v3"], composition="near_optimal")
    sub = read_episode_dirs(tmp_path, ["reach-v3"], composition="sub_optimal")
    assert near["reach-v3"].n_episodes == 2000 and sub["reach-v3"].n_episodes == 1000
    _same(sub["reach-v3"], eps[:1000])


def test_episode_dirs_errors(tmp_path):
    rng = np.random.default_rng(2)
    _write_dirs(tmp_path, "reach-v3", _episodes(rng, 3))
    with pytest.raises(DatasetError, match=r"reach-v3/3\.npz is missing"):
        read_episode_dirs(tmp_path, ["reach-v3"], episodes=4)
    with pytest.raises(DatasetError, match="task push-v3: none of"):
        read_episode_dirs(tmp_path, ["reach-v3", "push-v3"], episodes=3)
    _write_dirs(tmp_path, "push-v3", _episodes(rng, 3, obs_dim=12))
    with pytest.raises(DatasetError, match="observations have 12 dimensions, the environment has 39"):
        read_episode_dirs(tmp_path, ["push-v3"], episodes=3)
    (tmp_path / "reach-v3" / "1.npz").write_bytes(b"not a zip file")
    with pytest.raises(DatasetError, match=r"reach-v3/1\.npz: unreadable archive"):
        read_episode_dirs(tmp_path, ["reach-v3"], episodes=3)


def test_pickles_need_opt_in(tmp_path):
    rng = np.random.default_rng(3)
    eps = _episodes(rng, 4, done_key="dones")
    for e in eps:
        e["success"] = np.array([0, 0, 1, 1, 0, 0])
    with open(tmp_path / "reach-v2.pkl", "wb") as f:
        pickle.dump(eps, f)
    with pytest.raises(PickleNotAllowedError, match=r"reach-v2\.pkl is a pickle; unpickling runs arbitrary code"):
        read_trajectory_pickles(tmp_path, ["reach-v3"])
    ds = read_trajectory_pickles(tmp_path, ["reach-v3"], allow_pickle=True)
    _same(ds["reach-v3"], eps)
    assert ds["reach-v3"].success.tolist() == [True] * 4


def test_pickle_errors(tmp_path):
    with open(tmp_path / "reach-v3.pkl", "wb") as f:
        pickle.dump({"not": "a list"}, f)
    with pytest.raises(DatasetError, match="expected a non-empty list"):
        read_trajectory_pickles(tmp_path, ["reach-v3"], allow_pickle=True)
    with open(tmp_path / "push-v3.pkl", "wb") as f:
        pickle.dump([{"observations": np.zeros((3, 39)), "actions": np.zeros((3, 4))}], f)
    with pytest.raises(DatasetError, match=r"push-v3\.pkl trajectory 0: missing keys \['rewards'\]"):
        read_trajectory_pickles(tmp_path, ["push-v3"], allow_pickle=True)
    (tmp_path / "door-open-v3.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError, match=r"door-open-v3\.pkl: cannot unpickle"):
        read_trajectory_pickles(tmp_path, ["door-open-v3"], allow_pickle=True)


def test_readers_feed_storage(tmp_path):
    """A read dataset is the same object storage saves and loads."""
    rng = np.random.default_rng(4)
    eps = _episodes(rng, 3)
    _write_dirs(tmp_path / "src", "reach-v3", eps)
    ds = read_episode_dirs(tmp_path / "src", ["reach-v3"], episodes=3)
    save_dataset(tmp_path / "out", ds)
    back = load_dataset(tmp_path / "out", ["reach-v3"])
    _same(back["reach-v3"], eps)
    assert back["reach-v3"].provenance["format"] == "episode-dirs"
