"""Masks as state: one bool tensor per target with a leading group dimension.

``MaskSet`` is an ``nn.Module`` whose buffers are the masks, so a checkpoint's ``state_dict`` holds
them next to the model. It also owns the ordered task names and the task -> group map (kept as
extra state, so they travel with the ``state_dict`` too). ``save_masks``/``load_masks`` write and
read the output-contract file ``masks.safetensors``: one tensor per target named as the parameter,
shape ``[groups, *param.shape]``, dtype bool, and metadata with the task names and task -> group
map. Loading is the exact inverse of saving and refuses anything that does not fit.
"""

from __future__ import annotations

import difflib
import json
import operator
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

FORMAT = "maskmtl.masks/1"


FLOAT_CACHES = ("all", "group")  # MaskSet.float_cache


class MaskError(ValueError):
    """Masks that do not fit the model, the tasks, or each other."""


class MaskIndexError(MaskError, IndexError):
    """A task or group index that is not an integer in range, or an unknown task name.

    Both a ``ValueError`` (via ``MaskError``) and an ``IndexError``."""


class MaskTargetError(MaskError, KeyError):
    """A target name the masks, the model or the optimizer do not have.

    Both a ``ValueError`` (via ``MaskError``) and a ``KeyError`` (what this used to raise)."""

    __str__ = BaseException.__str__  # the message as written, not KeyError's repr of it


def check_index(value: Any, size: int, arg: str, what: str) -> int:
    """``value`` as an ``int`` in ``0..size-1``; anything else (negative, too large, bool, float,
    str) raises ``MaskIndexError`` naming ``arg``, the value and the valid range."""
    bad_type = isinstance(value, bool) or (isinstance(value, torch.Tensor) and
                                           (value.dtype == torch.bool or value.is_floating_point()))
    try:
        idx = None if bad_type else operator.index(value)
    except TypeError:
        idx = None
    if idx is None:
        raise MaskIndexError(f"{arg}={value!r} ({type(value).__name__}) is not a {what} index: "
                             f"expected an integer in 0..{size - 1}")
    if not 0 <= idx < size:
        raise MaskIndexError(f"{arg}={idx} is out of range: {what} indices are 0..{size - 1}"
                             + (" (negative indices are refused, not wrapped)" if idx < 0 else ""))
    return idx


def _buffer_key(name: str) -> str:
    # Buffer names cannot contain '.', parameter names do.
    return name.replace(".", "__")


def _preview(names: Sequence[str], k: int = 6) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (f", ... ({len(names) - k} more)" if len(names) > k else "")


def check_masks_fit_model(masks: Mapping[str, torch.Tensor], model: nn.Module | Mapping[str, torch.Tensor], *,
                          source: str | os.PathLike | None = None) -> None:
    """Check masks (target name -> ``[G, *P]``) against ``model`` (a module, or parameter name ->
    tensor): every target is a parameter and its mask has shape ``[groups, *param.shape]`` exactly
    (no broadcasting).

    Raises:
        MaskError: names the target, the expected and the given shape, and ``source`` (a file) if given.
    """
    where = f"{source}: " if source is not None else ""
    if isinstance(model, nn.Module):
        params, owner = dict(model.named_parameters()), f"the model ({type(model).__name__})"
    else:
        params, owner = dict(model), "the parameters"
    missing = [n for n in masks if n not in params]
    if missing:
        close = {n: difflib.get_close_matches(n, list(params), n=2) for n in missing[:3]}
        hints = "; ".join(f"{n!r}: close parameter names {c}" for n, c in close.items() if c)
        raise MaskTargetError(f"{where}masks name targets {owner} does not have: "
                              f"{missing}" + (f" ({hints})" if hints else "")
                              + f"; its parameters are {_preview(list(params))}")
    for n, m in masks.items():
        want = tuple(params[n].shape)
        if m.dim() != len(want) + 1 or tuple(m.shape[1:]) != want:
            g = m.shape[0] if m.dim() else "G"
            raise MaskError(f"{where}mask of target {n!r} has shape {list(m.shape)}; expected "
                            f"[groups, *param.shape] = {[g, *want]} (parameter {n!r} has shape {list(want)}; "
                            f"masks must match it exactly, broadcasting is not allowed)")


def _group_list(task_to_group: Sequence[int], arg: str = "task_to_group") -> list[int]:
    """``task_to_group`` as a list of ints; bools, floats and other non-integers are refused."""
    out = []
    for i, g in enumerate(task_to_group):
        try:
            if isinstance(g, bool):
                raise TypeError
            out.append(operator.index(g))
        except TypeError:
            raise MaskIndexError(f"{arg}[{i}]={g!r} ({type(g).__name__}) is not a group index: "
                                 f"expected an integer >= 0") from None
    return out


def validate_task_to_group(tasks: Sequence[str], task_to_group: Sequence[int]) -> int:
    """Check a task -> group map; return the number of groups. Groups must be 0..G-1, all used."""
    if len(set(tasks)) != len(tasks):
        dup = sorted({t for t in tasks if list(tasks).count(t) > 1})
        raise MaskError(f"task names must be unique, repeated: {dup}")
    if len(task_to_group) != len(tasks):
        raise MaskError(f"task_to_group has {len(task_to_group)} entries for {len(tasks)} tasks")
    if not task_to_group:
        raise MaskError("at least one task is required")
    groups = sorted(set(int(g) for g in task_to_group))
    if groups != list(range(len(groups))):
        raise MaskError(f"task_to_group must use every group 0..G-1 without gaps, got groups {groups}")
    return len(groups)


class MaskSet(nn.Module):
    """Bool masks ``[G, *P]`` per target, task names, and the task -> group map.

    Args:
        masks: target name -> bool tensor ``[G, *P]``.
        tasks: ordered task names.
        task_to_group: group index per task (default: one group per task).
    """

    def __init__(
        self,
        masks: Mapping[str, torch.Tensor],
        tasks: Sequence[str],
        task_to_group: Sequence[int] | None = None,
        float_cache: str = "all",
    ):
        super().__init__()
        if not masks:
            raise MaskError("a MaskSet needs at least one target")
        self.tasks: list[str] = list(tasks)
        self._float_cache: dict[tuple[str, torch.dtype], tuple] = {}  # see as_float
        self._row_cache: dict[tuple[str, torch.dtype], tuple] = {}    # see float_group
        self.float_cache = float_cache
        t2g = list(range(len(self.tasks))) if task_to_group is None else _group_list(task_to_group)
        n_groups = validate_task_to_group(self.tasks, t2g)
        self.task_to_group: list[int] = t2g
        self.names: list[str] = list(masks)
        self._name_set = frozenset(self.names)
        keys = [_buffer_key(n) for n in self.names]
        if len(set(keys)) != len(keys):
            raise MaskError(f"target names collide once '.' is replaced by '__': {self.names}")
        for name, key in zip(self.names, keys):
            m = masks[name]
            if m.dtype != torch.bool:
                raise MaskError(f"mask {name!r} has dtype {m.dtype}; masks are torch.bool")
            if m.dim() < 1 or m.shape[0] != n_groups:
                raise MaskError(f"mask {name!r} has shape {tuple(m.shape)}; expected [{n_groups}, *param.shape]")
            self.register_buffer(key, m.clone())

    # ---- access -------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        return max(self.task_to_group) + 1

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    def __getitem__(self, name: str) -> torch.Tensor:
        """The ``[G, *P]`` bool mask of one target."""
        if name not in self._name_set:
            close = difflib.get_close_matches(str(name), self.names, n=3)
            raise MaskTargetError(f"no mask for target {name!r}"
                                  + (f"; close target names: {close}" if close else "")
                                  + f"; the {len(self.names)} targets are {_preview(self.names)}")
        return getattr(self, _buffer_key(name))

    def check_model(self, model: nn.Module, *, source: str | os.PathLike | None = None) -> None:
        """Raise ``MaskError`` unless every target is a parameter of ``model`` and its mask has
        shape ``[groups, *param.shape]`` exactly (see ``check_masks_fit_model``)."""
        check_masks_fit_model(self.as_dict(), model, source=source)

    def items(self):
        return [(n, self[n]) for n in self.names]

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {n: self[n] for n in self.names}

    def task_index(self, task: int | str, arg: str = "task") -> int:
        """Index of ``task`` (an index in ``0..N-1`` or a task name); refuses anything else."""
        if isinstance(task, str):
            if task not in self.tasks:
                raise MaskIndexError(f"{arg}={task!r} is not one of the {self.n_tasks} task names {self.tasks}")
            return self.tasks.index(task)
        return check_index(task, self.n_tasks, arg, "task")

    def group_index(self, group: int, arg: str = "group") -> int:
        """``group`` checked to be an integer in ``0..G-1``."""
        return check_index(group, self.n_groups, arg, "group")

    def group_of(self, task: int | str) -> int:
        """Group of ``task`` (index in ``0..N-1`` or name)."""
        return self.task_to_group[self.task_index(task)]

    def as_float(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Masks ``[G, *P]`` of target ``name`` as 0/1 of ``dtype``, for multiplying. Converted once
        per version of the bool buffer (masks change only at mask updates and loads), so training
        steps launch no conversion kernels; costs one float copy of the masks per dtype."""
        buf = self[name]
        hit = self._float_cache.get((name, dtype))
        if hit is None or hit[0] is not buf or hit[1] != buf._version:
            hit = (buf, buf._version, buf.to(dtype))
            self._float_cache[(name, dtype)] = hit
        return hit[2]

    @property
    def float_cache(self) -> str:
        """What ``float_group`` keeps: ``"all"`` (one float copy of every group's masks per dtype, made
        once per mask version: no conversion in a training step) or ``"group"`` (only the last
        group's row per target and dtype, converted again when the group changes: N times less
        memory, one conversion per target at each change of group)."""
        return self._float_cache_mode

    @float_cache.setter
    def float_cache(self, mode: str) -> None:
        if mode not in FLOAT_CACHES:
            raise MaskError(f"float_cache={mode!r}: expected one of {list(FLOAT_CACHES)}")
        self._float_cache_mode = mode
        self._float_cache.clear()
        self._row_cache.clear()

    def float_group(self, name: str, dtype: torch.dtype, group: int) -> torch.Tensor:
        """Group ``group``'s mask of target ``name`` (shape ``P``) as 0/1 of ``dtype``, cached as
        ``float_cache`` says. The same values either way."""
        if self._float_cache_mode == "all":
            return self.as_float(name, dtype)[group]
        buf = self[name]
        hit = self._row_cache.get((name, dtype))
        if hit is None or hit[0] is not buf or hit[1] != buf._version or hit[2] != group:
            hit = (buf, buf._version, group, buf[group].to(dtype))
            self._row_cache[(name, dtype)] = hit
        return hit[3]

    def float_cache_bytes(self) -> int:
        """Bytes the float copies of the masks hold now (``as_float`` and ``float_group``)."""
        return sum(h[-1].numel() * h[-1].element_size() for c in (self._float_cache, self._row_cache)
                   for h in c.values())

    def group(self, g: int) -> dict[str, torch.Tensor]:
        """Target name -> bool mask of group ``g`` (views, shape ``P``)."""
        g = self.group_index(g, "g")
        return {n: self[n][g] for n in self.names}

    def for_task(self, task: int | str) -> dict[str, torch.Tensor]:
        return self.group(self.group_of(task))

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replace mask values in place (same names, shapes, dtype)."""
        if set(masks) != set(self.names):
            raise MaskError(f"set_masks got targets {sorted(masks)}, expected {sorted(self.names)}")
        for n in self.names:
            new = masks[n]
            if new.shape != self[n].shape or new.dtype != torch.bool:
                raise MaskError(f"set_masks: {n!r} got {tuple(new.shape)} {new.dtype}, "
                                f"expected {tuple(self[n].shape)} torch.bool")
            self[n].copy_(new)

    def set_grouping(self, task_to_group: Sequence[int], masks: Mapping[str, torch.Tensor]) -> None:
        """Regroup tasks: new task -> group map and masks with the matching group count."""
        t2g = _group_list(task_to_group)
        n_groups = validate_task_to_group(self.tasks, t2g)
        if set(masks) != set(self.names):
            raise MaskError(f"set_grouping got targets {sorted(masks)}, expected {sorted(self.names)}")
        for n in self.names:
            m = masks[n]
            if m.dtype != torch.bool or m.shape[1:] != self[n].shape[1:] or m.shape[0] != n_groups:
                raise MaskError(f"set_grouping: {n!r} got {tuple(m.shape)} {m.dtype}, expected "
                                f"[{n_groups}, *{tuple(self[n].shape[1:])}] torch.bool")
            setattr(self, _buffer_key(n), m.clone().to(self[n].device))
        self.task_to_group = t2g

    # ---- statistics ------------------------------------------------------------------------
    def counts(self) -> torch.Tensor:
        """Active entries per group over all targets, ``[G]`` int64."""
        return sum(self[n].reshape(self.n_groups, -1).sum(dim=1) for n in self.names)

    def numel(self) -> int:
        """Maskable entries per group (same for every group)."""
        return sum(self[n][0].numel() for n in self.names)

    def density(self) -> torch.Tensor:
        """Density per group over all targets, ``[G]`` float64."""
        return self.counts().double() / self.numel()

    def layer_density(self) -> dict[str, list[float]]:
        """Target name -> density per group."""
        return {n: self[n].reshape(self.n_groups, -1).double().mean(dim=1).tolist() for n in self.names}

    def voting_mask(self, thresh: float) -> dict[str, torch.Tensor]:
        """Mask for unseen tasks (spec §6): an entry is on when more than ``thresh`` tasks use it.

        ``thresh >= 1`` is a count of tasks (paper: 25 with 45-50 tasks); ``0 <= thresh < 1`` a
        fraction of the number of tasks. Each task votes with its group's mask.
        Returns target name -> bool tensor of the parameter's shape.
        """
        if thresh < 0:
            raise MaskError(f"voting threshold must be >= 0, got {thresh}")
        count_thresh = thresh * self.n_tasks if thresh < 1 else thresh
        idx = torch.tensor(self.task_to_group, device=self[self.names[0]].device)
        return {n: self[n].index_select(0, idx).sum(dim=0) > count_thresh for n in self.names}

    # ---- state_dict carries tasks and grouping ----------------------------------------
    def get_extra_state(self):
        return {"tasks": list(self.tasks), "task_to_group": list(self.task_to_group)}

    def set_extra_state(self, state):
        if list(state["tasks"]) != self.tasks:
            raise MaskError(f"checkpoint masks are for tasks {state['tasks']}, this run has {self.tasks}")
        self.task_to_group = [int(g) for g in state["task_to_group"]]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A regrouped checkpoint has another group count: resize buffers before loading.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            n_groups = validate_task_to_group(self.tasks, extra["task_to_group"])
            for n in self.names:
                key = prefix + _buffer_key(n)
                if key in state_dict and state_dict[key].shape[0] == n_groups != self[n].shape[0]:
                    setattr(self, _buffer_key(n), torch.zeros_like(state_dict[key], device=self[n].device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ---- the masks.safetensors file -----------------------------------------------------------

# Names of atomic_write_bytes's temporary files: tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")
# puts 8 characters of [a-z0-9_] between them.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (briefly process-wide)
    os.umask(old)
    return old


KILL_IN_WRITE_ENV = "MASKMTL_KILL_IN_WRITE"  # a file name: SIGKILL once its temporary file is written, before the rename


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder: readers never see
    a half-written file. ``replace=False`` never replaces an existing file (FileExistsError).

    The file gets mode ``0o666 & ~umask``, as a file created by ``open(path, "wb")`` would (the
    temporary file's private 0600 is not kept), so colleagues sharing the folder can read it.
    A process killed mid-write leaves its temporary file ``.NAME.XXXXXXXX.tmp`` behind;
    ``remove_stale_temps`` removes those.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(KILL_IN_WRITE_ENV) == path.name:  # fault injection (kill-and-resume tests)
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temps(folder: str | os.PathLike, *, min_age_s: float = 0.0) -> list[Path]:
    """Remove the temporary files that interrupted ``atomic_write_bytes`` calls left in ``folder``.

    Only regular files named exactly as those temporaries (``.NAME.XXXXXXXX.tmp``, ``XXXXXXXX``
    eight characters of ``[a-z0-9_]``) directly in ``folder`` are removed; nothing else is touched
    and sub-folders are not searched. A write in progress has such a file too: call this when no
    other process writes into ``folder`` (e.g. when a run starts in its own folder), or pass
    ``min_age_s`` to spare files modified in the last ``min_age_s`` seconds.

    Returns the removed paths, sorted; ``[]`` when ``folder`` does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    removed = []
    for p in sorted(folder.iterdir()):
        if not _TEMP_NAME.fullmatch(p.name) or p.is_symlink() or not p.is_file():
            continue
        try:
            if min_age_s > 0 and now - p.stat().st_mtime < min_age_s:
                continue
            p.unlink()
        except FileNotFoundError:  # finished (renamed) or removed by someone else meanwhile
            continue
        removed.append(p)
    return removed


def save_masks(masks: MaskSet, path: str | os.PathLike) -> None:
    """Write ``masks.safetensors`` atomically (bool tensors named as the parameters + metadata)."""
    from safetensors.torch import save

    tensors = {n: m.detach().cpu().contiguous() for n, m in masks.items()}
    meta = {"format": FORMAT, "tasks": json.dumps(masks.tasks), "task_to_group": json.dumps(masks.task_to_group)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def read_masks_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str], list[int]]:
    """Read a masks file without a model to check it against: (masks, tasks, task_to_group)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MaskError(f"mask file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise MaskError(f"{path} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise MaskError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        tasks = json.loads(meta["tasks"])
        t2g = json.loads(meta["task_to_group"])
    except (KeyError, ValueError) as e:
        raise MaskError(f"{path}: metadata 'tasks' and 'task_to_group' must be JSON lists "
                        f"({type(e).__name__}: {e})") from e
    for k, t in tensors.items():
        if t.dtype == torch.uint8:
            if t.numel() and int(t.max()) > 1:
                raise MaskError(f"{path}: uint8 mask {k!r} holds values other than 0 and 1")
            tensors[k] = t.bool()
        elif t.dtype != torch.bool:
            raise MaskError(f"{path}: tensor {k!r} has dtype {t.dtype}; masks are bool (or uint8 0/1)")
    return tensors, tasks, t2g


def load_masks(masks: MaskSet, path: str | os.PathLike, model: nn.Module | None = None) -> None:
    """Load a masks file into ``masks`` in place: the exact inverse of ``save_masks``.

    Raises MaskError when task names, target names or shapes differ (regrouping to another group
    count is allowed: the file's task -> group map is taken). With ``model``, the file is also
    checked against the model: every target is one of its parameters, with the mask shape
    ``[groups, *param.shape]``.
    """
    tensors, tasks, t2g = read_masks_file(path)
    if model is not None:
        check_masks_fit_model(tensors, model, source=path)
    if tasks != masks.tasks:
        raise MaskError(f"{path}: masks are for tasks {tasks}, this run has {masks.tasks}")
    missing, extra = sorted(set(masks.names) - set(tensors)), sorted(set(tensors) - set(masks.names))
    if missing or extra:
        raise MaskError(f"{path}: targets differ from the model's; missing {missing}, unexpected {extra}")
    n_groups = validate_task_to_group(tasks, t2g)
    for n in masks.names:
        want = (n_groups, *masks[n].shape[1:])
        if tuple(tensors[n].shape) != want:
            raise MaskError(f"{path}: mask {n!r} has shape {tuple(tensors[n].shape)}, expected {list(want)}")
    device = masks[masks.names[0]].device
    masks.set_grouping(t2g, {n: t.to(device) for n, t in tensors.items()})
