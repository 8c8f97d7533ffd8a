"""maskmtl's batched evaluator (run_grid) against Meta-World's own ``metaworld.evaluation``:
one noisy scripted policy, the same goals, episode by episode."""

from __future__ import annotations

import numpy as np
import pytest

from recipes.metaworld.agreement import NoisyExpert, check_agreement, metaworld_evaluation

pytestmark = pytest.mark.slow

TASKS = ["reach-v3", "pick-place-v3"]
EPISODES, SEED, NOISE = 4, 1, 1.0


@pytest.fixture(scope="module")
def reference():
    return metaworld_evaluation(TASKS, EPISODES, SEED, NoisyExpert(tuple(TASKS), SEED, NOISE))


def test_same_goals_same_success_and_returns(reference):
    res = check_agreement(TASKS, EPISODES, SEED, NOISE, reference=reference)
    assert res.mismatches() == []
    # the comparison has power: the grid holds successes and failures, early stops and full episodes
    flat = [s for row in res.ours_success for s in row]
    assert any(flat) and not all(flat)
    steps = [n for row in res.ours_steps for n in row]
    assert min(steps) < 500 and max(steps) == 500
    # every episode's return is Meta-World's, to float32 rounding (its sums are float32)
    for i, task in enumerate(TASKS):
        np.testing.assert_allclose(res.ours_returns[i], res.metaworld_returns[task], rtol=1e-5)
        assert len(res.metaworld_returns[task]) == EPISODES
    # Meta-World drew its goals from its 50 fixed goal vectors of each task, one per episode
    assert all(len(g) == EPISODES for g in res.goals)


def test_own_goals_are_other_episodes(reference):
    """With our own per-episode goals, the same policy plays other episodes: the check must see it."""
    res = check_agreement(TASKS, EPISODES, SEED, NOISE, goals="maskmtl", reference=reference)
    assert any("return" in m for m in res.mismatches())


def test_without_stopping_success_agrees_returns_do_not(reference):
    """eval.stop_on_success=false: success (ever succeeded) is Meta-World's; returns are longer."""
    res = check_agreement(TASKS, EPISODES, SEED, NOISE, stop_on_success=False, reference=reference)
    assert res.mismatches(returns=False) == []
    assert all(n == 500 for row in res.ours_steps for n in row)
    longer = [(a, b) for i, t in enumerate(TASKS) for a, b, s in
              zip(res.ours_returns[i], res.metaworld_returns[t], res.ours_success[i]) if s]
    assert longer and all(a > b for a, b in longer)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seed=0"):
        metaworld_evaluation(TASKS, 1, 0, NoisyExpert(tuple(TASKS), 0, NOISE))
    with pytest.raises(ValueError, match="goals="):
        check_agreement(TASKS, 1, SEED, NOISE, goals="theirs")
