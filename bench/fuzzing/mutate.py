"""Structure-aware input generation: valid messages with mutated fields, plus random bytes.

A seed is a msgpack-ready tree (maps, lists, scalars) that a real encoder produced. One input is
that tree copied and changed one to three times (a field replaced by a hostile value, a key
dropped or added, a type confused, a number pushed over a bound, a string or list grown past a
limit, a nesting made deep, the message ``type`` swapped for a sibling's), then encoded; now and
then the encoded bytes are also damaged (bits flipped, cut, spliced). Random bytes are inputs too.
Everything is drawn from one seeded :class:`random.Random`, so a run is reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import msgpack

Tree = Any
MAX_ITEMS = 120_000  # the most items a generated list has: past every decoder's count limit
MAX_NODES = 2 * MAX_ITEMS  # the most nodes a generated tree has
Slot = tuple[Any, Any]  # (container, key or index) naming one node of a tree

# Lengths around the limits the decoders enforce (text, IDs, addresses, frames).
_LENGTHS = (31, 32, 33, 63, 64, 65, 127, 128, 129, 200, 256, 257, 511, 512, 513, 1024, 1025,
            4096, 4097, 65_536, 65_537)  # fmt: skip
_INTS = (0, 1, -1, 2, 15, 16, 255, 256, 1023, 1024, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1,
         2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1)  # fmt: skip
_FLOATS = (0.0, -0.0, 0.5, -1.5, 1e-300, 1e308, -1e308, math.nan, math.inf, -math.inf)
_TEXTS = ("", " ", "a", "\x00", "type", "../..", "../../../../root/.ssh", "/", "//", ".",
          "a/../../b", "\u202e", "\n\r\t", "%s%n", "é" * 3, "1e999", "NaN", "None", "true",
          "12D3KooW", "/p2p/", "/ip4/127.0.0.1/tcp/1", "stdout", "proxy", "squashfs",
          "\x1b[31m", "'\"\\")  # fmt: skip
_BYTES = (b"", b"\x00", bytes(31), bytes(32), bytes(33), bytes(63), bytes(64), b"\xff" * 32,
          b"\xc1", b"\x80" * 8)  # fmt: skip


class Mutator:
    """Draws inputs for one seed set; ``types`` are the message types of the same protocol (for
    cross-type swaps)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        r = rng
        # Built lazily: a change is only computed once chosen (some make long values).
        self._text_changes: tuple[Callable[[str], Tree], ...] = (
            lambda s: s + "x" * r.choice(_LENGTHS), lambda s: s[: len(s) // 2], str.encode,
            str.upper, lambda s: "\x00" + s, lambda s: s + "/../..", lambda s: "",
            lambda s: s * 3, lambda s: s + "\n",
        )  # fmt: skip
        self._bytes_changes: tuple[Callable[[bytes], Tree], ...] = (
            lambda b: b + b"\x00", lambda b: b[:-1], lambda b: b"", bytes.hex, lambda b: b * 2,
            lambda b: r.randbytes(len(b)), lambda b: b + r.randbytes(r.choice(_LENGTHS[:12])),
        )  # fmt: skip
        self._list_changes: tuple[Callable[[list[Any]], Tree], ...] = (
            lambda v: _repeat(v, r.choice((2, 3, 100))), self._filled, lambda v: v[:-1],
            lambda v: [],
            lambda v: [*v, self.hostile()], lambda v: [v], lambda v: dict(enumerate(v)),
            lambda v: {str(i): x for i, x in enumerate(v)}, lambda v: v[::-1],
        )  # fmt: skip
        self._map_changes: tuple[Callable[[dict[Any, Any]], Tree], ...] = (
            lambda m: [m], lambda m: list(m.values()), lambda m: {},
            lambda m: {**m, self.key(): m}, lambda m: str(m)[:100],
        )  # fmt: skip

    def _filled(self, items: list[Any]) -> Tree:
        """Now and then a list repeated up to the largest count any decoder allows (100,000 blob
        chunks): the cost of refusing the biggest input a limit lets through."""
        if self.rng.random() < 0.02:
            return _repeat(items, MAX_ITEMS // len(items) + 1)
        return _repeat(items, 1000)

    # ---- hostile values ------------------------------------------------------------------------

    def hostile(self, depth: int = 0) -> Tree:
        r = self.rng
        kind = r.randrange(12)
        if kind == 0:
            return r.choice((None, True, False))
        if kind == 1:
            return r.choice(_INTS) * r.choice((1, 1, -1)) if r.random() < 0.9 else r.getrandbits(63)
        if kind == 2:
            return r.choice(_FLOATS)
        if kind == 3:
            return r.choice(_TEXTS)
        if kind == 4:
            return r.choice(_BYTES)
        if kind == 5:
            return r.choice("ax/.\x00é") * r.choice(_LENGTHS)
        if kind == 6:
            return r.randbytes(r.choice(_LENGTHS[:12]))
        if kind == 7:
            return self.deep(r.randrange(3, 40))
        if kind == 8 and depth < 2:
            return [self.hostile(depth + 1) for _ in range(r.randrange(0, 6))]
        if kind == 9 and depth < 2:
            return {self.key(): self.hostile(depth + 1) for _ in range(r.randrange(0, 5))}
        if kind == 10:
            return [r.choice((0, "", b"", None))] * r.choice((257, 1025, 4097, 16_385))
        return r.choice(([], {}, [[]], {"": {}}))

    def key(self) -> Any:
        r = self.rng.random()
        if r < 0.7:
            return self.rng.choice((*_TEXTS[1:], "x", "extra", "request_id", "v", "sig"))
        if r < 0.9:
            return self.rng.choice((b"", b"type", b"\xff"))  # bytes keys pass strict_map_key
        return "k" * self.rng.choice(_LENGTHS[:10])

    def deep(self, depth: int) -> Tree:
        tree: Tree = self.rng.choice((0, "", None))
        as_map = self.rng.random() < 0.5
        for _ in range(depth):
            tree = {"a": tree} if as_map else [tree]
        return tree

    # ---- mutating a tree ----------------------------------------------------------------------

    def mutate(self, tree: Tree, types: tuple[str, ...] = ()) -> Tree:
        tree = copy(tree)
        for _ in range(self.rng.choice((1, 1, 1, 2, 2, 3))):
            changed = self._one(copy(tree), types)
            if _size_over(changed, MAX_NODES):
                break  # repeats of repeats: keep the tree as it was
            tree = changed
        return tree

    def _one(self, tree: Tree, types: tuple[str, ...]) -> Tree:
        slots = _slots(tree)
        r = self.rng
        op = r.randrange(10)
        if op == 0 and types and isinstance(tree, dict) and "type" in tree:
            tree["type"] = r.choice(types)
            return tree
        maps = [m for m in _containers(tree) if isinstance(m, dict)]
        if op == 1 and maps:
            target = r.choice(maps)
            if target:
                del target[r.choice(list(target))]
                return tree
        if op == 2 and maps:
            r.choice(maps)[self.key()] = self.hostile()
            return tree
        if not slots:
            return self.hostile() if isinstance(tree, list) and r.random() < 0.1 else tree
        parent, where = r.choice(slots)
        old = parent[where]
        parent[where] = self._changed(old) if op >= 5 else self.hostile()
        if op == 4 and len(slots) > 1:  # swap two scalars (containers could make a cycle)
            other_parent, other_where = r.choice(slots)
            other = other_parent[other_where]
            if not isinstance(old, dict | list) and not isinstance(other, dict | list):
                parent[where], other_parent[other_where] = other, old
        return tree

    def _changed(self, old: Tree) -> Tree:
        """A value close to ``old``: the same kind pushed past a bound, or a look-alike."""
        r = self.rng
        if type(old) is bool:
            return r.choice((int(old), str(old).lower(), None, not old))
        if type(old) is int:
            return r.choice(
                (
                    old + 1,
                    old - 1,
                    -old,
                    old * 2 ** r.randrange(1, 33),
                    float(old),
                    str(old),
                    bool(old),
                    _clamp(old + 2**31),
                    2**64 - 1,
                    -(2**63),
                )
            )
        if type(old) is float:
            return r.choice(
                (
                    math.nan,
                    math.inf,
                    -old,
                    old * 1e300,
                    int(old) if math.isfinite(old) else 0,
                    str(old),
                    0.0,
                )
            )
        if type(old) is str:
            return r.choice(self._text_changes)(old)
        if type(old) is bytes:
            return r.choice(self._bytes_changes)(old)
        if isinstance(old, list):
            return r.choice(self._list_changes)(old) if old else [self.hostile()]
        if isinstance(old, dict):
            return r.choice(self._map_changes)(old)
        return self.hostile()

    # ---- bytes -------------------------------------------------------------------------------

    def damage(self, data: bytes) -> bytes:
        """Byte-level damage to an encoded message."""
        r = self.rng
        buf = bytearray(data)
        for _ in range(r.choice((1, 1, 2, 4))):
            op = r.randrange(5)
            if op == 0 and buf:
                buf[r.randrange(len(buf))] ^= 1 << r.randrange(8)
            elif op == 1 and buf:
                del buf[r.randrange(len(buf)) :]
            elif op == 2:
                at = r.randrange(len(buf) + 1)
                buf[at:at] = r.randbytes(r.randrange(1, 9))
            elif op == 3 and buf:
                buf[r.randrange(len(buf))] = r.choice((0xC1, 0xD4, 0xC7, 0xDD, 0xDF, 0xCF, 0xFF))
            elif buf:
                at = r.randrange(len(buf))
                buf[at:at] = buf[at : at + r.randrange(1, 32)]
        return bytes(buf)

    def random_bytes(self) -> bytes:
        r = self.rng
        size = r.choice((0, 1, 2, 5, 16, 64, 256, 1024, 4100))
        data = r.randbytes(size)
        if r.random() < 0.5 and size:  # look like a msgpack map, so decoders go past byte one
            data = bytes([0x80 | r.randrange(16)]) + data
        return data


def encode(tree: Tree) -> bytes | None:
    """msgpack bytes of ``tree``, or None if it cannot be encoded (the input is skipped)."""
    try:
        data: bytes = msgpack.packb(tree, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return None
    return data


def copy(tree: Tree) -> Tree:
    if isinstance(tree, dict):
        return {k: copy(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [copy(v) for v in tree]
    return tree


def _containers(tree: Tree) -> list[Any]:
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict | list):
            found.append(node)
            stack.extend(node.values() if isinstance(node, dict) else node)
    return found


def _slots(tree: Tree) -> list[Slot]:
    slots: list[Slot] = []
    for node in _containers(tree):
        keys: Any = node.keys() if isinstance(node, dict) else range(len(node))
        slots.extend((node, k) for k in keys)
        if len(slots) > 4096:  # a mutated list may be long: enough choice without walking it all
            break
    return slots


def _size_over(tree: Tree, limit: int) -> bool:
    """Whether ``tree`` has more than ``limit`` nodes (counting shared ones each time)."""
    count, stack = 0, [tree]
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _repeat(items: list[Any], times: int) -> list[Any]:
    """``items`` repeated, but never past ``MAX_ITEMS`` in all: mutations compound, and an
    unbounded product of them took the fuzzer to 23 GB."""
    return items * max(1, min(times, MAX_ITEMS // max(1, len(items))))


def _clamp(value: int) -> int:
    return max(-(2**63), min(2**64 - 1, value))


Encoder = Callable[[Tree], bytes | None]
