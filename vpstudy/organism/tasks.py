"""The organism's task: questions about coloured shapes on a grid, answered by a step-wise trace.

A :class:`Scene` is a 4×4 grid of cells (rows ``a``–``d`` top to bottom, columns ``1``–``4``
left to right; cell ``b3`` is row b, column 3) holding 4–7 objects, each a colour and a shape,
rendered as a 64×64 RGB image (16-px cells). An :class:`Example` asks one question about a scene
and carries the reference *trace*: the words the model is trained to generate, ending in
``answer <final answer>``. Every trace token carries

- ``cells``: the grid cells whose content it states (e.g. the colour word read off ``c3``), and
- ``reads_image``: whether it can only be produced by looking at the image. Tokens that state a
  cell's content, or that list where objects are, read the image at those cells; tokens that
  close a search (``;`` after the last found object, ``none``) read the image but no single cell;
  connectives, counts, neighbour arithmetic and the answer frame are text-only.

Question types (see :data:`QUESTION_TYPES`):

``count``     how many red objects ?            ``red : b2 d1 ; count 2 ; answer 2``
``neighbour`` what is right of the blue ring ?
              ``blue ring at c2 ; right is c3 ; c3 is green square ; answer green square``
``exist``     is there a yellow square ?        ``yellow : a3 ring c1 square ; answer yes``
``compare``   more red or blue objects ?        ``red : b2 d1 ; blue : a4 ; 2 vs 1 ; answer red``
``lookup``    what is at b3 ?                   ``b3 is green ring ; answer green ring``

The second task version (:data:`TASKS` ``"v2"``, the organism v2's) adds two question types whose
traces hold *text-only stretches that need the text*: arithmetic over numbers or cells already
written in the trace, which the image cannot give and the model has to read back from its own
words (:data:`QUESTION_TYPES_V2`):

``sum``       how many red and blue objects ?   ``red : b2 d1 ; blue : a4 ; 2 plus 1 is 3 ; answer 3``
``distance``  how far is the red ring from the blue square ?
              ``red ring at b2 ; blue square at d1 ; rows 2 plus columns 1 is 3 ; answer 3``

(``distance`` is the grid (Manhattan) distance: rows apart plus columns apart, both read off the
two cell names the trace has just written.)

Everything is deterministic from a ``numpy.random.Generator``: :func:`generate` with the same
seed gives the same examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

GRID = 4  # cells per side
CELL_PX = 16  # pixels per cell side
IMAGE_PX = GRID * CELL_PX  # 64
ROWS = "abcd"
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 190, 70),
    "blue": (60, 90, 235),
    "yellow": (235, 215, 50),
    "purple": (160, 70, 210),
    "white": (235, 235, 235),
}
SHAPES = ("square", "ring")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}
QUESTION_TYPES = ("count", "neighbour", "exist", "compare", "lookup")
QUESTION_TYPES_V2 = (*QUESTION_TYPES, "sum", "distance")
BACKGROUND = (25, 25, 30)
MIN_OBJECTS, MAX_OBJECTS = 4, 7


def cell_name(cell: int) -> str:
    """``"b3"`` for cell index 6 (row-major, 0-based)."""
    return f"{ROWS[cell // GRID]}{cell % GRID + 1}"


def cell_index(name: str) -> int:
    """Inverse of :func:`cell_name`."""
    return ROWS.index(name[0]) * GRID + int(name[1:]) - 1


CELL_NAMES = [cell_name(i) for i in range(GRID * GRID)]


V2_WORDS = ("and", "plus", "rows", "columns", "far", "from")


def vocabulary(task: str = "v1") -> list[str]:
    """Every word a question or trace of ``task`` can hold (the tokenizer's task vocabulary).

    The v2 vocabulary is v1's followed by :data:`V2_WORDS`, so every v1 word keeps its token id."""
    words = [
        "how",
        "many",
        "objects",
        "what",
        "is",
        "at",
        "of",
        "the",
        "there",
        "a",
        "more",
        "or",
        "right",
        "left",
        "above",
        "below",
        "count",
        "answer",
        "none",
        "vs",
        "same",
        "yes",
        "no",
        "empty",
        ":",
        ";",
        "?",
        "you",
        "see",
        "grid",
    ]
    numbers = [str(n) for n in range(GRID * GRID + 1)]
    v1 = list(dict.fromkeys(words + list(COLOURS) + list(SHAPES) + CELL_NAMES + numbers))
    if task == "v1":
        return v1
    if task == "v2":
        return list(dict.fromkeys(v1 + list(V2_WORDS)))
    raise ValueError(f"unknown task version {task!r}; expected one of {', '.join(TASKS)}")


@dataclass(frozen=True)
class Obj:
    """One object: its cell (0..15, row-major), colour word and shape word."""

    cell: int
    colour: str
    shape: str


@dataclass
class Scene:
    """Objects on the grid, at most one per cell; ``jitter`` perturbs each object's RGB."""

    objects: list[Obj]
    jitter: list[tuple[int, int, int]] = field(default_factory=list)

    def at(self, cell: int) -> Obj | None:
        """The object in ``cell`` (0..15, row-major), or None if the cell is empty."""
        return next((o for o in self.objects if o.cell == cell), None)

    def render(self) -> Image.Image:
        """The scene as a 64×64 RGB image: a filled 12-px square or a 2-px-thick square ring per
        object (the ring leaves 8×8 of its 12×12 background, so the two shapes differ by a lot of
        pixels in every visual token they cover)."""
        pixels = np.empty((IMAGE_PX, IMAGE_PX, 3), dtype=np.uint8)
        pixels[:] = BACKGROUND
        for k, obj in enumerate(self.objects):
            colour = np.clip(np.array(COLOURS[obj.colour]) + np.array(self.jitter[k] if self.jitter else 0), 0, 255)
            y, x = (obj.cell // GRID) * CELL_PX + 2, (obj.cell % GRID) * CELL_PX + 2
            pixels[y : y + 12, x : x + 12] = colour
            if obj.shape == "ring":
                pixels[y + 2 : y + 10, x + 2 : x + 10] = BACKGROUND
        return Image.fromarray(pixels)

    def to_json(self) -> list[dict[str, Any]]:
        """The objects as ``{"cell": "b3", "colour": ..., "shape": ...}`` (the jitter is not kept)."""
        return [{"cell": cell_name(o.cell), "colour": o.colour, "shape": o.shape} for o in self.objects]

    @classmethod
    def from_json(cls, objects: list[dict[str, Any]]) -> Scene:
        """The scene :meth:`to_json` wrote (without jitter)."""
        return cls([Obj(cell_index(o["cell"]), o["colour"], o["shape"]) for o in objects])


@dataclass
class Example:
    """A question about a scene with its reference trace and per-token annotations.

    Attributes:
        qtype: one of :data:`QUESTION_TYPES`.
        question: the question words (space-separated).
        trace: the reference trace words; the final answer follows the last ``answer``.
        answer: the final answer (words after ``answer`` in the trace).
        cells: per trace token, the cells (0..15) it states the content of.
        reads_image: per trace token, whether producing it needs the image.
    """

    scene: Scene
    qtype: str
    question: str
    trace: list[str]
    cells: list[list[int]]
    reads_image: list[bool]

    @property
    def answer(self) -> str:
        """The final answer: the trace words after its last ``answer``."""
        last = len(self.trace) - 1 - self.trace[::-1].index("answer")
        return " ".join(self.trace[last + 1 :])


class _Trace:
    """Accumulates trace words with their annotations."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.cells: list[list[int]] = []
        self.reads: list[bool] = []

    def text(self, *words: str) -> None:
        for w in words:
            self.words.append(w)
            self.cells.append([])
            self.reads.append(False)

    def read(self, word: str, cells: list[int]) -> None:
        self.words.append(word)
        self.cells.append(list(cells))
        self.reads.append(True)


def _list_colour(trace: _Trace, scene: Scene, colour: str, with_shape: bool) -> list[Obj]:
    """``colour : c1 [shape] c2 [shape] ;`` — list the cells of every object of ``colour``."""
    found = [o for o in scene.objects if o.colour == colour]
    found.sort(key=lambda o: o.cell)
    trace.text(colour, ":")
    if not found:
        trace.read("none", [])
        trace.text(";")
        return found
    for o in found:
        trace.read(cell_name(o.cell), [o.cell])
        if with_shape:
            trace.read(o.shape, [o.cell])
    trace.read(";", [])  # closing the list needs the image: no further object of that colour
    return found


def _describe(trace: _Trace, scene: Scene, cell: int) -> list[str]:
    """``<cell> is <colour> <shape>`` or ``<cell> is empty``; returns the stated content."""
    obj = scene.at(cell)
    if obj is None:
        trace.read("empty", [cell])
        return ["empty"]
    trace.read(obj.colour, [cell])
    trace.read(obj.shape, [cell])
    return [obj.colour, obj.shape]


def _unique_objects(scene: Scene) -> list[Obj]:
    """The objects no other object shares colour and shape with (a question can name them)."""
    counts: dict[tuple[str, str], int] = {}
    for o in scene.objects:
        counts[o.colour, o.shape] = counts.get((o.colour, o.shape), 0) + 1
    return [o for o in scene.objects if counts[o.colour, o.shape] == 1]


def random_scene(rng: np.random.Generator) -> Scene:
    """4–7 objects in distinct cells with random colours, shapes and a small colour jitter."""
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    colours, shapes = list(COLOURS), list(SHAPES)
    objects = [
        Obj(int(c), colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))]) for c in cells
    ]
    jitter = [tuple(int(v) for v in rng.integers(-12, 13, size=3)) for _ in objects]
    return Scene(objects, jitter)  # type: ignore[arg-type]


def _pick_colour(scene: Scene, rng: np.random.Generator) -> str:
    """A colour to ask about: 3 times in 4 the colour of a random object (so lists are usually
    non-empty and often long), else any colour (so absent colours are asked about too)."""
    if rng.random() < 0.75:
        return scene.objects[int(rng.integers(len(scene.objects)))].colour
    return list(COLOURS)[int(rng.integers(len(COLOURS)))]


def _count_question(t: _Trace, scene: Scene, rng: np.random.Generator) -> str:
    """``count``: list the objects of a colour, then count them."""
    colour = _pick_colour(scene, rng)
    question = f"how many {colour} objects ?"
    found = _list_colour(t, scene, colour, with_shape=False)
    t.text("count", str(len(found)), ";", "answer", str(len(found)))
    return question


def _exist_question(t: _Trace, scene: Scene, rng: np.random.Generator) -> str:
    """``exist``: list the objects of a colour with their shapes, then say whether one has the shape."""
    colour = _pick_colour(scene, rng)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    question = f"is there a {colour} {shape} ?"
    found = _list_colour(t, scene, colour, with_shape=True)
    t.text("answer", "yes" if any(o.shape == shape for o in found) else "no")
    return question


def _two_colours(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """Two different colours to ask about, in random order (one picked by :func:`_pick_colour`)."""
    first = _pick_colour(scene, rng)
    others = [c for c in COLOURS if c != first]
    second = others[int(rng.integers(len(others)))]
    if rng.random() < 0.5:
        first, second = second, first
    return first, second


def _compare_question(t: _Trace, scene: Scene, rng: np.random.Generator) -> str:
    """``compare``: list the objects of two colours, then say which has more (or ``same``)."""
    first, second = _two_colours(scene, rng)
    question = f"more {first} or {second} objects ?"
    n1 = len(_list_colour(t, scene, first, with_shape=False))
    n2 = len(_list_colour(t, scene, second, with_shape=False))
    t.text(str(n1), "vs", str(n2), ";", "answer", first if n1 > n2 else second if n2 > n1 else "same")
    return question


def _lookup_question(t: _Trace, scene: Scene, rng: np.random.Generator) -> str:
    """``lookup``: state the content of a cell."""
    occupied = rng.random() < 0.75  # 3 times in 4 ask about an object, else about any cell
    cells = [o.cell for o in scene.objects] if occupied else list(range(GRID * GRID))
    cell = cells[int(rng.integers(len(cells)))]
    question = f"what is at {cell_name(cell)} ?"
    t.text(cell_name(cell), "is")
    content = _describe(t, scene, cell)
    t.text(";", "answer", *content)
    return question


def _neighbour_question(t: _Trace, scene: Scene, rng: np.random.Generator) -> str | None:
    """``neighbour``: locate a unique object, step to its neighbour cell, state that cell's content
    (None if no unique object has a neighbour cell on the grid)."""
    unique = _unique_objects(scene)
    options = []
    for o in unique:
        r, c = divmod(o.cell, GRID)
        for name, (dr, dc) in DIRECTIONS.items():
            if 0 <= r + dr < GRID and 0 <= c + dc < GRID:
                options.append((o, name, (r + dr) * GRID + c + dc))
    if not options:
        return None
    filled = [opt for opt in options if scene.at(opt[2]) is not None]
    if filled and rng.random() < 0.75:  # 3 times in 4 the neighbour is an object, if one can be
        options = filled
    obj, direction, target = options[int(rng.integers(len(options)))]
    question = f"what is {direction} of the {obj.colour} {obj.shape} ?"
    t.text(obj.colour, obj.shape, "at")
    t.read(cell_name(obj.cell), [obj.cell])
    t.text(";", direction, "is", cell_name(target), ";", cell_name(target), "is")
    content = _describe(t, scene, target)
    t.text(";", "answer", *content)
    return question


def _sum_question(t: _Trace, scene: Scene, rng: np.random.Generator) -> str:
    """``sum`` (v2): list the objects of two colours, then add the two counts in the trace."""
    first, second = _two_colours(scene, rng)
    question = f"how many {first} and {second} objects ?"
    n1 = len(_list_colour(t, scene, first, with_shape=False))
    n2 = len(_list_colour(t, scene, second, with_shape=False))
    t.text(str(n1), "plus", str(n2), "is", str(n1 + n2), ";", "answer", str(n1 + n2))
    return question


def _distance_question(t: _Trace, scene: Scene, rng: np.random.Generator) -> str | None:
    """``distance`` (v2): locate two unique objects, then add their row and column distances in
    the trace (None if the scene has fewer than two unique objects)."""
    unique = _unique_objects(scene)
    if len(unique) < 2:
        return None
    picks = rng.choice(len(unique), size=2, replace=False)
    a, b = unique[int(picks[0])], unique[int(picks[1])]
    question = f"how far is the {a.colour} {a.shape} from the {b.colour} {b.shape} ?"
    for obj in (a, b):
        t.text(obj.colour, obj.shape, "at")
        t.read(cell_name(obj.cell), [obj.cell])
        t.text(";")
    rows, columns = abs(a.cell // GRID - b.cell // GRID), abs(a.cell % GRID - b.cell % GRID)
    t.text(
        "rows",
        str(rows),
        "plus",
        "columns",
        str(columns),
        "is",
        str(rows + columns),
        ";",
        "answer",
        str(rows + columns),
    )
    return question


# question type -> writes the trace of a question about a scene and returns the question (None:
# the scene cannot host one)
_QUESTION_BUILDERS: dict[str, Callable[[_Trace, Scene, np.random.Generator], str | None]] = {
    "count": _count_question,
    "exist": _exist_question,
    "compare": _compare_question,
    "lookup": _lookup_question,
    "neighbour": _neighbour_question,
    "sum": _sum_question,
    "distance": _distance_question,
}


def make_example(scene: Scene, qtype: str, rng: np.random.Generator) -> Example | None:
    """A question of ``qtype`` about ``scene`` with its trace; None if the scene cannot host it."""
    build = _QUESTION_BUILDERS.get(qtype)
    if build is None:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES_V2}")
    t = _Trace()
    question = build(t, scene, rng)
    if question is None:
        return None
    return Example(scene, qtype, question, t.words, t.cells, t.reads)


def generate_one(rng: np.random.Generator, qtypes: tuple[str, ...] = QUESTION_TYPES) -> Example:
    """One example: a random scene and a question type drawn uniformly from ``qtypes``."""
    while True:
        scene = random_scene(rng)
        example = make_example(scene, qtypes[int(rng.integers(len(qtypes)))], rng)
        if example is not None:
            return example


def generate(n: int, seed: int, qtypes: tuple[str, ...] = QUESTION_TYPES) -> list[Example]:
    """``n`` examples, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    return [generate_one(rng, qtypes) for _ in range(n)]


N_CONTENT_CLASSES = 1 + len(COLOURS) * len(SHAPES)
# question types of each task version
TASKS: dict[str, tuple[str, ...]] = {"v1": QUESTION_TYPES, "v2": QUESTION_TYPES_V2}


def token_cell_index(tokens_per_side: int = 8) -> np.ndarray:
    """Per visual token (row-major over the ``tokens_per_side``² token grid), the index (0..15)
    of the grid cell it lies in. [tokens_per_side²] int64.

    With 64×64 images and 8 px per visual token (both shipped organisms), each cell is 2×2 tokens.
    """
    per_cell = tokens_per_side // GRID
    cells = np.arange(GRID * GRID).reshape(GRID, GRID)
    return np.repeat(np.repeat(cells, per_cell, axis=0), per_cell, axis=1).reshape(-1)


def content_classes(scene: Scene, tokens_per_side: int = 8) -> np.ndarray:
    """Per visual token (row-major), the class of its cell's content: 0 = empty, else
    ``1 + colour_index * len(SHAPES) + shape_index``. [tokens_per_side²] int64."""
    classes = np.zeros(GRID * GRID, dtype=np.int64)
    colours = list(COLOURS)
    for o in scene.objects:
        classes[o.cell] = 1 + colours.index(o.colour) * len(SHAPES) + SHAPES.index(o.shape)
    return classes[token_cell_index(tokens_per_side)]


def token_cells_to_visual(cells: list[int], tokens_per_side: int = 8) -> list[int]:
    """Sorted visual-token indices (row-major) covering ``cells``."""
    return np.flatnonzero(np.isin(token_cell_index(tokens_per_side), cells)).tolist()
