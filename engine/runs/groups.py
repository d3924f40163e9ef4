"""Runs that belong together, for ``tunetop compare``: a sweep's, or a tag's.

A sweep tags each run it queues ``sweep:ID``; a person tags runs with ``tunetop tag`` or
``tags = [...]`` in a config (tunetop.runs.labels). ``tunetop compare`` alone compares the
latest group: the runs carrying the newest tagged run's ``sweep:`` tag, else its first tag; and
``tunetop compare TAG`` (or a sweep's ID) the runs carrying that tag. No mlx import here.
"""

from __future__ import annotations

from tunetop.runs.folders import RunDir, list_runs
from tunetop.runs.labels import labels_of

SWEEP_PREFIX = "sweep:"


def tagged(tag: str, runs: list[RunDir] | None = None) -> list[RunDir]:
    """The runs carrying ``tag``, oldest first."""
    return [run for run in (list_runs() if runs is None else runs) if tag in labels_of(run).tags]


def group_tag(tags: list[str]) -> str | None:
    """The tag a run's group goes by: its sweep's, else its first; None for an untagged run."""
    return next((t for t in tags if t.startswith(SWEEP_PREFIX)), tags[0] if tags else None)


def latest_group(runs: list[RunDir] | None = None) -> tuple[str, list[RunDir]] | None:
    """(the tag, the runs carrying it, oldest first) of the newest run whose group has two runs or
    more (a tag on one run alone compares nothing, so an older sweep is taken); else the newest
    run's one-run group; None when no run has a tag."""
    runs = list_runs() if runs is None else runs
    alone: tuple[str, list[RunDir]] | None = None
    seen: set[str] = set()
    for run in reversed(runs):
        tag = group_tag(labels_of(run).tags)
        if tag is None or tag in seen:
            continue
        seen.add(tag)
        group = tagged(tag, runs)
        if len(group) > 1:
            return tag, group
        alone = alone or (tag, group)
    return alone


def group_of(spec: str, runs: list[RunDir] | None = None) -> tuple[str, list[RunDir]] | None:
    """The runs tagged ``spec``, or ``sweep:spec`` (a sweep's id alone); None when no run is."""
    runs = list_runs() if runs is None else runs
    for tag in (spec, SWEEP_PREFIX + spec):
        found = tagged(tag, runs)
        if found:
            return tag, found
    return None
