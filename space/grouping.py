"""Editing a session's supernodes: group kept features by hand or take the automatic suggestion. Functions of the
session alone (no loaded model); the Space checks and marks the session used before it calls them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from clt_hub.errors import ConfigError

if TYPE_CHECKING:
    from space.state import Session


def add_supernode(session: Session, name: str, node_ids: Sequence[str]) -> None:
    """Group kept features under `name` (a node moves out of any group it was in; same name: replaced)."""
    name = (name or "").strip()
    if not name:
        raise ConfigError("give the supernode a name")
    if not node_ids:
        raise ConfigError("pick the features to group (in the list, or by clicking nodes in the graph)")
    kept = set(session.kept_features())
    for n in node_ids:
        if n not in kept:
            raise ConfigError(f"{n!r} is not a feature kept in this graph; only kept features can be grouped")
    chosen = list(dict.fromkeys(node_ids))
    others = [[s[0], *[n for n in s[1:] if n not in chosen]] for s in session.supernodes if s[0] != name]
    session.supernodes = [s for s in others if len(s) > 1] + [[name, *chosen]]

def accept_suggestion(session: Session) -> None:
    """Use the automatic grouping (features with alike outgoing effects), replacing the current groups."""
    suggested = session.result.suggested_supernodes
    if not suggested:
        raise ConfigError("no suggestion for this graph: fewer than two kept features have alike outgoing effects")
    seen: dict[str, int] = {}
    out = []
    for name, *members in suggested:
        seen[name] = seen.get(name, 0) + 1
        out.append([name if seen[name] == 1 else f"{name} ({seen[name]})", *members])
    session.supernodes = out

def remove_supernode(session: Session, name: str) -> None:
    if name not in {s[0] for s in session.supernodes}:
        raise ConfigError(f"there is no supernode {name!r}")
    session.supernodes = [s for s in session.supernodes if s[0] != name]

def supernode_rows(session: Session) -> list[list[Any]]:
    return [[s[0], len(s) - 1, ", ".join(s[1:])] for s in session.supernodes]
