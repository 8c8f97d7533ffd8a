"""Meta-World task sets in the papers' fixed order.

``PAPER_ORDER`` is the published ``config/MetaWorld/task.json`` order (spec §8) with Meta-World 3.x
names (``-v3``). MT5, MT30 and MT50 are its prefixes, as in the papers. MT10 is ambiguous: the
papers never use it, and Meta-World's own MT10 is a different list. Here ``MT10`` is the first ten
tasks of the papers' order (so MT5 ⊂ MT10 ⊂ MT30 ⊂ MT50 and data generated for one set is reused
by the larger ones) and ``MT10-metaworld`` is Meta-World's benchmark list.

``ML45-train`` / ``ML45-test`` are Meta-World's ML45 split (45 training tasks, 5 held out for
unseen-task evaluation), the training tasks kept in the papers' order.
"""

from __future__ import annotations

PAPER_ORDER: tuple[str, ...] = tuple(f"{name}-v3" for name in (
    "basketball", "bin-picking", "button-press-topdown", "button-press", "button-press-wall",
    "coffee-button", "coffee-pull", "coffee-push", "dial-turn", "disassemble",
    "door-close", "door-lock", "door-open", "door-unlock", "hand-insert",
    "drawer-close", "drawer-open", "faucet-open", "faucet-close", "handle-press-side",
    "handle-press", "handle-pull-side", "handle-pull", "lever-pull", "peg-insert-side",
    "pick-place-wall", "pick-out-of-hole", "reach", "push-back", "push",
    "pick-place", "plate-slide", "plate-slide-side", "plate-slide-back", "plate-slide-back-side",
    "soccer", "push-wall", "shelf-place", "sweep-into", "sweep",
    "window-open", "window-close", "assembly", "button-press-topdown-wall", "hammer",
    "peg-unplug-side", "reach-wall", "stick-push", "stick-pull", "box-close",
))

METAWORLD_MT10: tuple[str, ...] = tuple(f"{name}-v3" for name in (
    "reach", "push", "pick-place", "door-open", "drawer-open",
    "drawer-close", "button-press-topdown", "peg-insert-side", "window-open", "window-close",
))

ML45_TEST: tuple[str, ...] = ("bin-picking-v3", "box-close-v3", "hand-insert-v3", "door-lock-v3", "door-unlock-v3")

# Difficulty classes of Seo et al. (2022, "Masked World Models", appendix), used by the generation
# curriculum to place the end of the learning phase (harder tasks learn later).
_DIFFICULTY_NAMES = {
    "medium": ("basketball", "bin-picking", "box-close", "coffee-pull", "coffee-push", "hammer",
               "peg-insert-side", "push-wall", "soccer", "sweep", "sweep-into"),
    "hard": ("assembly", "hand-insert", "pick-out-of-hole", "pick-place", "push", "push-back"),
    "very_hard": ("shelf-place", "disassemble", "stick-pull", "stick-push", "pick-place-wall"),
}
DIFFICULTY: dict[str, str] = {t: "easy" for t in PAPER_ORDER}
for _level, _names in _DIFFICULTY_NAMES.items():
    for _n in _names:
        DIFFICULTY[f"{_n}-v3"] = _level

TASKSETS: dict[str, tuple[str, ...]] = {
    "MT5": PAPER_ORDER[:5],
    "MT10": PAPER_ORDER[:10],
    "MT30": PAPER_ORDER[:30],
    "MT50": PAPER_ORDER,
    "MT10-metaworld": METAWORLD_MT10,
    "ML45-train": tuple(t for t in PAPER_ORDER if t not in ML45_TEST),
    "ML45-test": ML45_TEST,
}


class UnknownTaskError(ValueError):
    """A task or task-set name that Meta-World 3.x / this module does not know."""


def canonical_task(name: str) -> str:
    """``'reach'``, ``'reach-v2'`` or ``'reach-v3'`` → ``'reach-v3'``; unknown names raise."""
    base = name.removesuffix("-v2").removesuffix("-v3")
    v3 = f"{base}-v3"
    if v3 not in DIFFICULTY:
        raise UnknownTaskError(f"unknown Meta-World task {name!r}; known tasks: {', '.join(PAPER_ORDER)}")
    return v3


def taskset(name: str) -> list[str]:
    """The ordered task names of a task set (``MT5|MT10|MT30|MT50|MT10-metaworld|ML45-train|ML45-test``)."""
    try:
        return list(TASKSETS[name])
    except KeyError:
        raise UnknownTaskError(f"unknown task set {name!r}; known: {', '.join(TASKSETS)}") from None


def resolve_tasks(taskset_name: str | None = None, tasks=None) -> list[str]:
    """Explicit ``tasks`` (canonicalised, duplicates refused) win over ``taskset_name``."""
    if tasks:
        out = [canonical_task(str(t)) for t in tasks]
        if len(set(out)) != len(out):
            raise UnknownTaskError(f"duplicate tasks in {list(tasks)}")
        return out
    if taskset_name is None:
        raise UnknownTaskError("give a task set name or a list of tasks")
    return taskset(str(taskset_name))
