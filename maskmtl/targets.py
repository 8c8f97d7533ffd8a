"""Which parameters of a model carry task masks: name patterns, the match, and its report.

A pattern is either a regex string, full-matched against the parameter name, or a list of names,
each matching a parameter exactly or as a dotted suffix (``"weight"`` matches ``"fc.weight"``,
``"fc.weight"`` matches ``"net.fc.weight"``, but ``"eight"`` matches nothing). Exclusion wins over
inclusion. Tied parameters appear once, under the first name ``named_parameters`` gives them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import torch
from torch import nn

Pattern = Union[str, Sequence[str], None]


class TargetError(ValueError):
    """The target patterns are malformed or select nothing."""


@dataclass(frozen=True)
class Target:
    """One maskable parameter."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _compile(pattern: Pattern, key: str):
    """Return a predicate name -> bool for ``pattern`` (None matches nothing)."""
    if pattern is None:
        return lambda name: False
    if isinstance(pattern, str):
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise TargetError(f"{key}={pattern!r} is not a valid regular expression: {e}") from e
        return lambda name: rx.fullmatch(name) is not None
    items = list(pattern)
    for p in items:
        if not isinstance(p, str) or not p:
            raise TargetError(f"{key} must be a regex string or a list of non-empty names, got item {p!r}")
    exact = set(items)
    suffixes = tuple("." + p for p in items)
    return lambda name: name in exact or name.endswith(suffixes)


def _close_names(pattern: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Parameter names (or their dotted suffixes, the forms a list entry may take) close to ``pattern``."""
    forms: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        forms.setdefault(name)
        for i in range(1, len(parts)):
            forms.setdefault(".".join(parts[i:]))
    return difflib.get_close_matches(pattern, list(forms), n=n, cutoff=0.6)


def _matches(p: str, names: Iterable[str]) -> list[str]:
    return [n for n in names if n == p or n.endswith("." + p)]


def _unmatched_entries(pattern: Pattern, names: Sequence[str], key: str, aliases: dict[str, str]) -> None:
    """Every entry of a list pattern must match a parameter (exactly or as a dotted suffix).
    ``aliases``: second names of tied parameters -> their first name."""
    if pattern is None or isinstance(pattern, str):
        return
    for p in pattern:
        if _matches(p, names):
            continue
        tied = _matches(p, aliases)
        if tied:
            raise TargetError(f"{key} entry {p!r} names {tied[0]!r}, which is tied to {aliases[tied[0]]!r}: "
                              f"tied parameters are one target, listed under their first name; "
                              f"use {aliases[tied[0]]!r}")
        close = _close_names(p, names)
        preview = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
        raise TargetError(
            f"{key} entry {p!r} matches no parameter of the model (list entries match a parameter name "
            f"exactly or as a dotted suffix); "
            + (f"close parameter names: {close}" if close else f"the model's {len(names)} parameters are {preview}")
        )


def match_name(name: str, include: Pattern, exclude: Pattern = None) -> bool:
    """Whether one parameter name is a target under these patterns."""
    return _compile(include, "targets.include")(name) and not _compile(exclude, "targets.exclude")(name)


def select_targets(
    model: nn.Module,
    include: Pattern,
    exclude: Pattern = None,
    *,
    key: str = "targets",
) -> list[Target]:
    """Pick the model's maskable parameters.

    Args:
        model: any module.
        include: regex (full match) or list of exact/suffix names.
        exclude: same forms; wins over ``include``.
        key: config key named in errors.
    Returns:
        Targets in ``named_parameters`` order.
    Raises:
        TargetError: nothing selected; the message says whether nothing matched ``include`` or
            every match was excluded. Also every entry of an ``include`` or ``exclude`` list must
            match some parameter (a misspelt name is an error, not silently ignored; close names
            are suggested). An ``exclude`` regex may match nothing: the same recipe regex (e.g.
            ``.*(ln|norm).*``) serves models with and without such layers.
    """
    if include is None:
        raise TargetError(f"{key}.include is required (a regex string or a list of parameter names)")
    inc = _compile(include, f"{key}.include")
    exc = _compile(exclude, f"{key}.exclude")
    names = [n for n, _ in model.named_parameters()]
    first = {id(p): n for n, p in model.named_parameters()}
    aliases = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}
    _unmatched_entries(include, names, f"{key}.include", aliases)
    _unmatched_entries(exclude, names, f"{key}.exclude", aliases)
    included = [n for n in names if inc(n)]
    if not included:
        preview = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        close = _close_names(include, names) if isinstance(include, str) else []
        raise TargetError(
            f"{key}.include={include!r} matched none of the model's {len(names)} parameters "
            f"({preview})" + (f"; close parameter names: {close}" if close else "")
        )
    params = dict(model.named_parameters())
    targets = [Target(n, tuple(params[n].shape)) for n in included if not exc(n)]
    if not targets:
        raise TargetError(
            f"{key}.exclude={exclude!r} excluded all {len(included)} parameters matched by "
            f"{key}.include={include!r}: nothing is left to mask"
        )
    return targets


def target_report_rows(
    model: nn.Module, targets: Iterable[Target], masks: dict[str, torch.Tensor] | None = None
) -> list[dict]:
    """Rows for the target report: every parameter, whether it is masked, and its mask density.

    ``masks`` (name -> ``[G, *P]`` bool) adds per-target density (mean over groups, min, max).
    """
    chosen = {t.name for t in targets}
    rows = []
    for name, p in model.named_parameters():
        row = {"name": name, "shape": tuple(p.shape), "numel": p.numel(), "masked": name in chosen}
        if masks is not None and name in masks:
            m = masks[name]
            per_group = m.reshape(m.shape[0], -1).float().mean(dim=1)
            row.update(density=per_group.mean().item(), density_min=per_group.min().item(),
                       density_max=per_group.max().item())
        rows.append(row)
    return rows


def print_target_report(rows: list[dict], console=None) -> None:
    """Print the report rows as a rich table, with a total line."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="mask targets", show_lines=False)
    for col in ("parameter", "shape", "numel", "masked", "density (mean / min / max)"):
        table.add_column(col, justify="right" if col == "numel" else "left")
    total = masked = active = 0.0
    for r in rows:
        dens = ""
        if "density" in r:
            dens = f"{r['density']:.4f} / {r['density_min']:.4f} / {r['density_max']:.4f}"
            active += r["density"] * r["numel"]
        table.add_row(r["name"], str(list(r["shape"])), f"{r['numel']:,}", "yes" if r["masked"] else "", dens)
        total += r["numel"]
        masked += r["numel"] if r["masked"] else 0
    overall = f"{active / masked:.4f}" if masked and any("density" in r for r in rows) else ""
    table.add_row("[b]total[/b]", "", f"{int(total):,}", f"{int(masked):,} masked", overall)
    console.print(table)
