import numpy as np
import pytest

from recipes.metaworld.sampler import ReferenceSampler, SamplingConfig, SegmentSampler, heldout_episodes
from recipes.metaworld.storage import DatasetError, OfflineDataset

FIELDS = ("states", "actions", "rewards", "returns_to_go", "timesteps", "mask", "task", "prompt_states",
          "prompt_actions", "prompt_rewards", "prompt_returns_to_go", "prompt_timesteps", "prompt_mask")


@pytest.mark.parametrize("config", [
    SamplingConfig(context=20, prompt_length=5, heldout_episodes=2),
    SamplingConfig(context=8, prompt_length=5, heldout_episodes=2, prompt_episode="random", prompt_position="random",
                   state_norm="all", reward_scale=7.5),
    SamplingConfig(context=4, prompt_length=0, heldout_episodes=1, state_norm="none", reward_scale=1.0),
    SamplingConfig(context=20, prompt_length=5, heldout_episodes=2, hide_goal=True),
    SamplingConfig(context=6, prompt_length=0, heldout_episodes=0),
])
def test_matches_reference(synthetic, config):
    fast, slow = SegmentSampler(synthetic, config), ReferenceSampler(synthetic, config)
    rng = np.random.default_rng(0)
    index = fast.draw(rng.integers(0, 2, 400), rng)
    a, b = fast.gather(index), slow.gather(index)
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.shape == y.shape and x.dtype == y.dtype, f
        np.testing.assert_array_equal(x, y, err_msg=f)
    B, K, Ks = 400, config.context, config.prompt_length
    assert a.states.shape == (B, K, 39) and a.rewards.shape == (B, K, 1) and a.prompt_states.shape == (B, Ks, 39)
    assert (~a.mask).any()  # short episodes (3, 4, 7 steps) force padding in this fixture
    assert (a.states[..., 36:39] == 0).all() == config.hide_goal


def test_padding_and_rtg_by_hand(synthetic):
    config = SamplingConfig(context=5, prompt_length=2, heldout_episodes=1, state_norm="none", reward_scale=2.0)
    s = SegmentSampler(synthetic, config)
    d = synthetic["reach-v3"]
    # episode 1 of reach has 3 steps (rows 30..32): a segment from step 1 holds steps 1, 2 right-aligned
    from recipes.metaworld.sampler import SegmentIndex
    idx = SegmentIndex(*(np.array([v]) for v in (0, 1, 1, 3, 0)))
    b = s.gather(idx)
    assert b.mask[0].tolist() == [False, False, False, True, True]
    assert b.timesteps[0].tolist() == [0, 0, 0, 1, 2]
    np.testing.assert_array_equal(b.states[0, 3:], d.observations[31:33])
    assert not b.states[0, :3].any() and not b.actions[0, :3].any()
    r = d.rewards[30:33]
    np.testing.assert_allclose(b.returns_to_go[0, 3:, 0], [(r[1] + r[2]) / 2, r[2] / 2], rtol=1e-6)
    np.testing.assert_allclose(b.rewards[0, 3:, 0], r[1:] / 2)


def test_heldout_never_trained_on(synthetic):
    config = SamplingConfig(heldout_episodes=2)
    s = SegmentSampler(synthetic, config)
    rng = np.random.default_rng(1)
    idx = s.draw(rng.integers(0, 2, 5000), rng)
    for i, task in enumerate(synthetic.tasks):
        returns = synthetic[task].episode_returns()
        held = s.heldout[task]
        assert held.tolist() == np.argsort(-returns)[:2].tolist()  # the two highest returns, best first
        trained = set(idx.episode[idx.task == i].tolist())
        assert trained == set(s.train_episodes(task).tolist())   # every training episode is drawn...
        assert not trained & set(held.tolist())                  # ...and no held-out one
        # best/last prompt: the last 5 steps of the best held-out episode
        best = held[0]
        assert set(idx.prompt_episode[idx.task == i].tolist()) == {best}
        length = synthetic[task].episode_lengths()[best]
        assert set(idx.prompt_start[idx.task == i].tolist()) == {max(length - 5, 0)}


def test_start_distribution_uniform_over_transitions(synthetic):
    """Starts are uniform over training transitions, so episodes are drawn ∝ their length."""
    config = SamplingConfig(heldout_episodes=1)
    s = SegmentSampler(synthetic, config)
    rng = np.random.default_rng(2)
    idx = s.draw(np.zeros(200_000, np.int64), rng)
    lengths = synthetic["reach-v3"].episode_lengths()
    train = s.train_episodes("reach-v3")
    counts = np.bincount(idx.episode, minlength=len(lengths))[train]
    np.testing.assert_allclose(counts / counts.sum(), lengths[train] / lengths[train].sum(), atol=0.01)
    assert (idx.start < lengths[idx.episode]).all() and (idx.start >= 0).all()


def test_state_normalisation(synthetic):
    s = SegmentSampler(synthetic, SamplingConfig(heldout_episodes=1, state_norm="task"))
    obs = synthetic["push-v3"].observations.astype(np.float64)
    np.testing.assert_allclose(s.state_mean[1], obs.mean(0))
    np.testing.assert_allclose(s.state_std[1], obs.std(0) + 1e-6)


def test_errors(synthetic):
    with pytest.raises(ValueError, match="data.sampling.state_norm='batch'"):
        SamplingConfig(state_norm="batch")
    with pytest.raises(ValueError, match="unknown keys \\['K'\\]"):
        SamplingConfig.from_config({"K": 20})
    small = OfflineDataset(["reach-v3"], {"reach-v3": synthetic["reach-v3"].head(2)})
    with pytest.raises(DatasetError, match="cannot hold out data.sampling.heldout_episodes=2"):
        SegmentSampler(small, SamplingConfig(heldout_episodes=2))


def test_heldout_ties_prefer_earlier():
    assert heldout_episodes(np.array([1.0, 3.0, 3.0, 2.0]), 3).tolist() == [1, 2, 3]


def test_to_torch(synthetic):
    torch = pytest.importorskip("torch")
    b = SegmentSampler(synthetic, SamplingConfig(heldout_episodes=1)).sample_task(1, 4, np.random.default_rng(0))
    t = b.to_torch()
    assert t["states"].dtype == torch.float32 and t["timesteps"].dtype == torch.int64 and t["mask"].dtype == torch.bool
    assert (t["task"] == 1).all()


@pytest.fixture
def with_demos(synthetic, make_task):
    demos = OfflineDataset(synthetic.tasks, {t: make_task(t, [9, 30, 2], seed=10 + i) for i, t in enumerate(synthetic.tasks)})
    return OfflineDataset(synthetic.tasks, synthetic.data, demos)


@pytest.mark.parametrize("config", [
    SamplingConfig(context=20, prompt_length=5, heldout_episodes=0),
    SamplingConfig(context=7, prompt_length=4, prompt_episode="random", prompt_position="random", state_norm="all"),
])
def test_demonstrations_are_the_prompts(with_demos, config):
    fast, slow = SegmentSampler(with_demos, config), ReferenceSampler(with_demos, config)
    rng = np.random.default_rng(3)
    index = fast.draw(rng.integers(0, 2, 3000), rng)
    a, b = fast.gather(index), slow.gather(index)
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    for i, task in enumerate(with_demos.tasks):
        n = with_demos[task].n_episodes
        mine = index.task == i
        assert set(index.episode[mine].tolist()) == set(range(n))          # all data episodes train
        assert (index.prompt_episode[mine] >= n).all()                     # prompts only from demos
        demo_returns = with_demos.demos[task].episode_returns()
        assert fast.heldout[task].tolist() == (n + np.argsort(-demo_returns)).tolist()
    if config.prompt_episode == "best":
        np.testing.assert_array_equal(a.prompt_states[0][a.prompt_mask[0]],
                                      b.prompt_states[0][b.prompt_mask[0]])


def test_prompts_need_a_source(synthetic):
    with pytest.raises(DatasetError, match="prompts need episodes"):
        SegmentSampler(synthetic, SamplingConfig(heldout_episodes=0, prompt_length=5))
