"""Feature taps: the named feature vectors one VGG forward pass can emit, and how a head's
`features` choice combines them. A leaf module (no Keras): config validation uses it too.

A tap is `<pool><block>[_flip]`: pool `gap` (global average) or `gmp` (global max) of the output
of VGG16's or VGG19's block 1 to 5 (its `block{b}_pool` layer), of the image or (`_flip`) of
the image mirrored left-right. `gap5` is the tutorial's 512 features and the cache's default.

A `features` choice joins terms with `+` (concatenated, in that order); a term is a tap, or
`<tap>_flipavg`: the mean of the tap and of its `_flip` (test-time augmentation).
Examples: `gap5`, `gap4+gap5`, `gap5_flipavg`, `gap5+gap5_flip`.

An augmented view (extract.views) of an unflipped tap is the output `<tap>_view<k>`, k = 1, 2, ...:
the tap of the image's k-th augmented view (emotr.data.augment), cached in a folder of its own.

A cached activation (extract.cache_activation) is a whole pooled feature map, e.g. `block4_pool`:
(H/16, W/16, 512) per image, stored as bfloat16 for fine-tuning the blocks above it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_TAP = "gap5"
DEFAULT_FEATURES = DEFAULT_TAP
FLIP_SUFFIX = "_flip"
FLIPAVG_SUFFIX = "_flipavg"
POOLS = ("gap", "gmp")
# Channels of the block outputs, the same in VGG16 and VGG19: the blocks a tap may pool.
_BLOCK_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
BLOCKS = tuple(_BLOCK_CHANNELS)
TAPS = tuple(
    f"{pool}{block}{flip}" for flip in ("", FLIP_SUFFIX) for block in BLOCKS for pool in POOLS
)
ACTIVATIONS = ("block3_pool", "block4_pool")
# Halvings of the input by the max pools up to and including that block.
_ACTIVATION_HALVINGS = {"block3_pool": 3, "block4_pool": 4}
_TAP = re.compile(rf"^({'|'.join(POOLS)})([{''.join(map(str, BLOCKS))}])({FLIP_SUFFIX})?$")
_VIEW = re.compile(r"^(.+)_view([1-9][0-9]*)$")
MAX_VIEWS = 64


@dataclass(frozen=True)
class Tap:
    """One tap: which pooling of which block, of the image or of its mirror image."""

    name: str
    pool: str  # gap | gmp
    block: int  # 1 to 5
    flip: bool

    @property
    def layer(self) -> str:
        """The backbone layer whose output is pooled."""
        return f"block{self.block}_pool"

    @property
    def dim(self) -> int:
        """Features per image."""
        return _BLOCK_CHANNELS[self.block]


def parse_tap(name: str) -> Tap:
    """A tap by name; ValueError naming the allowed taps otherwise."""
    match = _TAP.match(name)
    if not match:
        raise ValueError(f"unknown feature tap {name!r}; taps are {', '.join(TAPS)}")
    pool, block, flip = match.groups()
    return Tap(name, pool, int(block), flip is not None)


def tap_dim(name: str) -> int:
    """Length of a tap's feature vector."""
    return parse_tap(name).dim


def view_output(tap: str, k: int) -> str:
    """The output name of view `k` (1, 2, ...) of an unflipped tap, e.g. `gap5_view3`."""
    if parse_tap(tap).flip:
        raise ValueError(f"views are of unflipped taps (a view flips itself), got {tap!r}")
    if not 1 <= k <= MAX_VIEWS:
        raise ValueError(f"view numbers run from 1 to {MAX_VIEWS}, got {k}")
    return f"{tap}_view{k}"


def parse_view_output(name: str) -> tuple[str, int] | None:
    """(tap, k) of a view output such as `gap5_view3`; None for any other output name."""
    match = _VIEW.match(name)
    return (match.group(1), int(match.group(2))) if match else None


def view_taps(taps: Sequence[str]) -> tuple[str, ...]:
    """The taps of `taps` that have augmented views: the unflipped ones (a view flips itself)."""
    return tuple(tap for tap in taps if tap not in ACTIVATIONS and not parse_tap(tap).flip)


def view_outputs(taps: Sequence[str], n_views: int) -> tuple[str, ...]:
    """The outputs extract.views adds: views 1..n_views of each unflipped tap of `taps`."""
    return tuple(view_output(tap, k) for k in range(1, n_views + 1) for tap in view_taps(taps))


def views_of(outputs: Sequence[str]) -> dict[int, tuple[str, ...]]:
    """View number -> the taps whose view it is, of the view outputs among `outputs`."""
    views: dict[int, list[str]] = {}
    for name in outputs:
        if (view := parse_view_output(name)) is not None:
            views.setdefault(view[1], []).append(view[0])
    return {k: tuple(taps) for k, taps in sorted(views.items())}


def conv_passes(outputs: Sequence[str]) -> int:
    """Passes of the conv base per image that computing `outputs` takes: one for the plain
    outputs, one more for their mirror image (a `_flip` tap), one per augmented view."""
    views = views_of(outputs)
    plain = [name for name in outputs if parse_view_output(name) is None]
    flips = any(name not in ACTIVATIONS and parse_tap(name).flip for name in plain)
    return (1 if plain else 0) + (1 if flips else 0) + len(views)


def output_tap(name: str) -> str:
    """The tap an output computes: a tap's own name, or the tap of a view output."""
    view = parse_view_output(name)
    return view[0] if view else name


@dataclass(frozen=True)
class Term:
    """One `+`-separated term of a features choice: a tap, or a tap averaged with its mirror."""

    tap: str
    flipavg: bool = False

    @property
    def taps(self) -> tuple[str, ...]:
        """The cached taps this term reads."""
        return (self.tap, self.tap + FLIP_SUFFIX) if self.flipavg else (self.tap,)


def parse_features(spec: str) -> tuple[Term, ...]:
    """The terms of a features choice such as `gap4+gap5_flipavg`; ValueError if malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a features choice is a non-empty string such as 'gap5', got {spec!r}")
    terms = []
    for raw in spec.split("+"):
        name = raw.strip()
        flipavg = name.endswith(FLIPAVG_SUFFIX)
        tap = parse_tap(name.removesuffix(FLIPAVG_SUFFIX) if flipavg else name)
        if flipavg and tap.flip:
            raise ValueError(f"{name!r}: _flipavg applies to an unflipped tap (e.g. gap5_flipavg)")
        terms.append(Term(tap.name, flipavg))
    if len(set(terms)) != len(terms):
        raise ValueError(f"features choice {spec!r} repeats a term")
    return tuple(terms)


def taps_of(spec: str) -> tuple[str, ...]:
    """The cached taps a features choice reads, each once, in order of first use."""
    taps: dict[str, None] = {}
    for term in parse_features(spec):
        taps.update(dict.fromkeys(term.taps))
    return tuple(taps)


def features_dim(spec: str) -> int:
    """Length of a features choice's vector."""
    return sum(tap_dim(term.tap) for term in parse_features(spec))


def combine_features(spec: str, taps: Mapping[str, np.ndarray]) -> np.ndarray:
    """The (n, features_dim) float32 matrix of a features choice from its taps' matrices.

    The one place where terms are combined: training (emotr.search.training_set) and serving
    (emotr.deploy.serving) both call it, so a deployed model sees what its head was trained on.
    """
    columns = []
    for term in parse_features(spec):
        if term.flipavg:
            # Averaged in float64 then rounded once: the order of the two taps does not matter.
            both = np.asarray(taps[term.tap], np.float64) + taps[term.tap + FLIP_SUFFIX]
            columns.append((both / 2).astype(np.float32))
        else:
            columns.append(np.asarray(taps[term.tap], np.float32))
    return columns[0] if len(columns) == 1 else np.concatenate(columns, axis=1)


def activation_shape(name: str, input_size: Sequence[int]) -> tuple[int, int, int]:
    """(h, w, c) of a cached activation for images resized to input_size (height, width)."""
    if name not in _ACTIVATION_HALVINGS:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
    height, width = input_size
    for _ in range(_ACTIVATION_HALVINGS[name]):  # each 2x2 max pool (valid padding) floors
        height, width = height // 2, width // 2
    block = int(name.removeprefix("block").removesuffix("_pool"))
    return height, width, _BLOCK_CHANNELS[block]
