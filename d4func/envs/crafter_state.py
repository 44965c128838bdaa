"""Crafter's world made reproducible, and its runtime state saved and restored (exact resume, counterfactuals).

Reproducibility. Crafter keeps each 12x12 chunk's creatures in a Python ``set``, whose iteration order follows the
objects' memory addresses, and despawns ``creatures[random.randint(len)]`` from that order. The same seed and
actions therefore diverge between two envs, even in one process (measured: from the 19th step on seed 3).
:func:`make_reproducible` gives the world insertion-ordered chunk sets, so the seed and the actions alone decide
every episode. Nothing else in Crafter's dynamics reads a set's order.

Runtime state. :func:`crafter_state` captures a ``crafter.Env`` mid-episode as tensors and primitives (checkpoints
load with ``weights_only=True``): the env's counters, the world's RNG, material and object maps, every object's
attributes and each chunk's object order. :func:`restore_crafter_state` puts it back into any Crafter env with the
same world size, after which both play on bitwise alike. Object attributes are encoded by type, so a Crafter
release that adds one travels along; a value of a type the encoder does not know raises a ``TypeError`` naming it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, MutableSet
from typing import Any

import crafter
import numpy as np
import torch
from crafter import engine, objects

from d4func.envs.resumable import numpy_random_state, set_numpy_random_state

__all__ = ["InsertionOrderedSet", "ReproducibleWorld", "crafter_state", "make_reproducible", "restore_crafter_state"]

# An object's references to other live things; restored by identity rather than encoded by value.
_REFERENCES = ("world", "random", "player")
_OBJECT_CLASSES = {cls.__name__: cls for cls in vars(objects).values()
                   if isinstance(cls, type) and issubclass(cls, objects.Object)}


class InsertionOrderedSet(MutableSet):
    """A set that iterates in insertion order (a dict's keys), so code that picks from it by index is seeded."""

    def __init__(self, items: Iterable[Any] = ()) -> None:
        self._items: dict[Any, None] = dict.fromkeys(items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: Any) -> None:
        self._items[item] = None

    def discard(self, item: Any) -> None:
        self._items.pop(item, None)

    def remove(self, item: Any) -> None:
        del self._items[item]  # KeyError for a missing item, as a built-in set

    def copy(self) -> InsertionOrderedSet:
        return InsertionOrderedSet(self._items)


class ReproducibleWorld(engine.World):
    """Crafter's ``World`` with insertion-ordered chunk sets (see the module docstring)."""

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self._chunks = collections.defaultdict(InsertionOrderedSet)


def make_reproducible(env: crafter.Env) -> crafter.Env:
    """Give `env`'s world insertion-ordered chunk sets, in place (before its first reset: existing chunks are
    re-filled in their current order). The env's views keep their reference to the same world object."""
    world = env._world
    chunks = world._chunks
    world.__class__ = ReproducibleWorld
    world._chunks = collections.defaultdict(
        InsertionOrderedSet, {key: InsertionOrderedSet(objs) for key, objs in chunks.items()})
    return env


def _encode(value: Any, where: str) -> tuple:
    """A value as a (type tag, payload) tuple of tensors and primitives, so decoding gives back the same type."""
    if value is None or isinstance(value, (bool, int, float, str)) and not isinstance(value, np.generic):
        return ("py", value)
    if isinstance(value, np.generic):
        return ("np_scalar", value.dtype.str, value.item())
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{where}: cannot encode a numpy array of dtype {value.dtype}")
        # int64 / float64 hold every Crafter array exactly (uint8 and uint32 maps, int positions)
        wide = value.astype(np.float64 if value.dtype.kind == "f" else np.int64)
        return ("ndarray", value.dtype.str, torch.from_numpy(wide.copy()))
    if isinstance(value, tuple):
        return ("tuple", [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)])
    if isinstance(value, list):
        return ("list", [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)])
    if isinstance(value, (set, frozenset)):
        return ("set", sorted(_encode(v, f"{where}{{}}") for v in value))
    if isinstance(value, dict):
        return ("dict", [(_encode(k, f"{where} key"), _encode(v, f"{where}[{k!r}]")) for k, v in value.items()])
    raise TypeError(f"{where}: cannot encode a value of type {type(value).__name__} ({value!r}) in Crafter's state")


def _decode(encoded: tuple) -> Any:
    tag = encoded[0]
    if tag == "py":
        return encoded[1]
    if tag == "np_scalar":
        return np.dtype(encoded[1]).type(encoded[2])
    if tag == "ndarray":
        return encoded[2].numpy().astype(np.dtype(encoded[1]))
    if tag == "tuple":
        return tuple(_decode(v) for v in encoded[1])
    if tag == "list":
        return [_decode(v) for v in encoded[1]]
    if tag == "set":
        return {_decode(v) for v in encoded[1]}
    if tag == "dict":
        return {_decode(k): _decode(v) for k, v in encoded[1]}
    raise ValueError(f"unknown tag {tag!r} in a Crafter state")


def crafter_state(env: crafter.Env) -> dict[str, Any]:
    """`env`'s whole runtime state (see the module docstring); `env` must be reproducible (`make_reproducible`)."""
    world = env._world
    if not isinstance(world, ReproducibleWorld):
        raise TypeError("crafter_state needs a reproducible world (make_reproducible(env)): a built-in set's order "
                        "of a chunk's creatures cannot be restored")
    index = {id(obj): i for i, obj in enumerate(world._objects) if obj is not None}
    object_states = []
    for i, obj in enumerate(world._objects):
        if obj is None:
            object_states.append(None)
            continue
        if getattr(obj, "player", env._player) is not env._player:
            raise ValueError(f"object {i} ({type(obj).__name__}) follows a player that is not the env's")
        attrs = {k: v for k, v in vars(obj).items() if k not in _REFERENCES}
        object_states.append({"class": type(obj).__name__, "follows_player": hasattr(obj, "player"),
                              "attrs": _encode(attrs, f"object {i} ({type(obj).__name__})")})
    return {
        "env": _encode({"_seed": env._seed, "_episode": env._episode, "_step": env._step,
                        "_last_health": env._last_health, "_unlocked": env._unlocked}, "env"),
        "area": tuple(int(a) for a in world.area),
        "random": numpy_random_state(world.random),
        "daylight": _encode(world.daylight, "daylight"),
        "mat_ids": _encode(world._mat_ids, "mat_ids"),
        "mat_names": _encode(world._mat_names, "mat_names"),
        "mat_map": _encode(world._mat_map, "mat_map"),
        "obj_map": _encode(world._obj_map, "obj_map"),
        "objects": object_states,
        "player_index": None if env._player is None else index[id(env._player)],
        "chunks": [(_encode(key, "chunk key"), [index[id(obj)] for obj in members])
                   for key, members in world._chunks.items()],
    }


def restore_crafter_state(env: crafter.Env, state: dict[str, Any]) -> None:
    """Put a `crafter_state` back into `env` (made reproducible here if it is not yet)."""
    area = tuple(int(a) for a in env._world.area)
    if tuple(state["area"]) != area:
        raise ValueError(f"a Crafter state of world area {tuple(state['area'])} cannot go into a world of area {area}")
    world = make_reproducible(env)._world
    set_numpy_random_state(world.random, state["random"])
    world.daylight = _decode(state["daylight"])
    world._mat_ids = _decode(state["mat_ids"])
    world._mat_names = _decode(state["mat_names"])
    world._mat_map = _decode(state["mat_map"])
    world._obj_map = _decode(state["obj_map"])

    player_index = state["player_index"]
    restored: list[objects.Object | None] = []
    for i, entry in enumerate(state["objects"]):
        if entry is None:
            restored.append(None)
            continue
        cls = _OBJECT_CLASSES.get(entry["class"])
        if cls is None:
            raise ValueError(f"object {i}: unknown Crafter object class {entry['class']!r}")
        obj = cls.__new__(cls)  # attributes come from the state, not from the constructor's defaults
        obj.world, obj.random = world, world.random
        vars(obj).update(_decode(entry["attrs"]))
        restored.append(obj)
    player = None if player_index is None else restored[player_index]
    for obj, entry in zip(restored, state["objects"], strict=True):
        if obj is not None and entry["follows_player"]:
            obj.player = player
    world._objects = restored
    world._chunks = collections.defaultdict(
        InsertionOrderedSet, {_decode(key): InsertionOrderedSet(restored[i] for i in members)
                              for key, members in state["chunks"]})
    vars(env).update(_decode(state["env"]))
    env._player = player
