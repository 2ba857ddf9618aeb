"""The organism's task generator: determinism, an independent solver, annotations, rendering."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from vpstudy.organism.tasks import COLOURS, QUESTION_TYPES, Example, generate, make_example, random_scene
from vpstudy.organism.shipped import write_eval_set

DIRS = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}


def _grid(objects: list[dict]) -> dict[tuple[int, int], dict]:
    """Scene description → {(row, col): object}, rows 'a'..'d' → 0..3, columns '1'..'4' → 0..3."""
    return {("abcd".index(o["cell"][0]), int(o["cell"][1]) - 1): o for o in objects}


def solve(objects: list[dict], question: str) -> str:
    """Answer a question from the scene description alone (written apart from the generator)."""
    grid = _grid(objects)
    w = question.split()
    count = lambda colour: sum(o["colour"] == colour for o in grid.values())  # noqa: E731
    if w[:2] == ["how", "many"] and w[3] == "and":  # v2: the sum of two colours' counts
        return str(count(w[2]) + count(w[4]))
    if w[:2] == ["how", "many"]:
        return str(count(w[2]))
    if w[:3] == ["how", "far", "is"]:  # v2: grid distance between two named objects
        (a,), (b,) = ([pos for pos, o in grid.items() if o["colour"] == w[i] and o["shape"] == w[i + 1]]
                      for i in (4, 8))  # fmt: skip
        return str(abs(a[0] - b[0]) + abs(a[1] - b[1]))
    if w[:3] == ["is", "there", "a"]:
        return "yes" if any(o["colour"] == w[3] and o["shape"] == w[4] for o in grid.values()) else "no"
    if w[0] == "more":
        a, b = count(w[1]), count(w[3])
        return w[1] if a > b else w[3] if b > a else "same"
    if w[:3] == ["what", "is", "at"]:
        o = grid.get(("abcd".index(w[3][0]), int(w[3][1]) - 1))
        return "empty" if o is None else f"{o['colour']} {o['shape']}"
    if w[:2] == ["what", "is"] and w[3:5] == ["of", "the"]:
        (r, c), = [pos for pos, o in grid.items() if o["colour"] == w[5] and o["shape"] == w[6]]
        dr, dc = DIRS[w[2]]
        assert 0 <= r + dr < 4 and 0 <= c + dc < 4, "neighbour outside the grid"
        o = grid.get((r + dr, c + dc))
        return "empty" if o is None else f"{o['colour']} {o['shape']}"
    raise AssertionError(f"solver does not know {question!r}")


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return generate(2000, seed=11)


def test_same_seed_same_examples_other_seed_different():
    def key(exs):
        return [(e.question, e.trace, e.cells, e.reads_image, e.scene.to_json(), e.scene.jitter) for e in exs]

    assert key(generate(50, 3)) == key(generate(50, 3))
    assert key(generate(50, 3)) != key(generate(50, 4))


def test_independent_solver_agrees_with_every_answer(examples):
    for ex in examples:
        assert solve(ex.scene.to_json(), ex.question) == ex.answer, (ex.question, ex.trace)


def test_all_question_types_occur_with_several_lookups(examples):
    kinds = {q: [e for e in examples if e.qtype == q] for q in QUESTION_TYPES}
    assert all(len(v) > 250 for v in kinds.values())
    for q in ("count", "exist", "compare", "neighbour"):
        assert np.mean([sum(e.reads_image) for e in kinds[q]]) >= 2, q
    for ex in examples:  # every trace mixes image-reading and text-only tokens
        assert any(ex.reads_image) and not all(ex.reads_image)


def test_token_annotations_state_the_referred_cells(examples):
    for ex in examples:
        grid = _grid(ex.scene.to_json())
        assert len(ex.cells) == len(ex.trace) == len(ex.reads_image)
        for word, cells, reads in zip(ex.trace, ex.cells, ex.reads_image, strict=True):
            if cells:
                assert reads
            for cell in cells:
                obj = grid.get(divmod(cell, 4))
                if word in COLOURS:
                    assert obj is not None and obj["colour"] == word
                elif word in ("square", "ring"):
                    assert obj is not None and obj["shape"] == word
                elif word == "empty":
                    assert obj is None
                else:  # a cell name listed because an object sits there
                    assert word == "abcd"[cell // 4] + str(cell % 4 + 1) and obj is not None


def test_rendered_image_shows_the_scene():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = random_scene(rng)
        pixels = np.asarray(scene.render()).astype(int)
        grid = _grid(scene.to_json())
        for r in range(4):
            for c in range(4):
                block = pixels[16 * r : 16 * r + 16, 16 * c : 16 * c + 16]
                obj = grid.get((r, c))
                edge, centre = block[3, 3], block[6, 6]
                if obj is None:
                    assert np.abs(block - block[0, 0]).max() == 0
                    continue
                assert np.abs(edge - np.array(COLOURS[obj["colour"]])).max() <= 12
                is_hollow = np.abs(centre - block[0, 0]).max() == 0
                assert is_hollow == (obj["shape"] == "ring")


def test_unknown_question_type_is_refused():
    with pytest.raises(ValueError, match="unknown question type"):
        make_example(random_scene(np.random.default_rng(0)), "colourfulness", np.random.default_rng(0))


def test_eval_set_files_are_byte_identical_for_the_same_seed(tmp_path):
    digests = []
    for name in ("one", "two"):
        path = write_eval_set(tmp_path / name, n=12, seed=5)
        files = sorted(p for p in path.parent.rglob("*") if p.is_file())
        digests.append([(p.relative_to(path.parent).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()) for p in files])
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert all(solve(r["scene"], r["question"]) == r["answer"] for r in records)
    assert digests[0] == digests[1]


def test_content_classes_label_each_visual_token_with_its_cells_content():
    from vpstudy.organism.tasks import SHAPES, content_classes

    rng = np.random.default_rng(1)
    colours = list(COLOURS)
    for _ in range(20):
        scene = random_scene(rng)
        classes = content_classes(scene).reshape(8, 8)
        pixels = np.asarray(scene.render()).astype(int)
        for ty in range(8):
            for tx in range(8):
                patch = pixels[8 * ty : 8 * ty + 8, 8 * tx : 8 * tx + 8]
                label = int(classes[ty, tx])
                if label == 0:
                    assert np.abs(patch - patch[0, 0]).max() == 0
                    continue
                colour, shape = colours[(label - 1) // len(SHAPES)], SHAPES[(label - 1) % len(SHAPES)]
                obj = scene.at((ty // 2) * 4 + tx // 2)
                assert (obj.colour, obj.shape) == (colour, shape)


def test_v2_tasks_agree_with_the_independent_solver_and_keep_v1_unchanged():
    from vpstudy.organism.tasks import QUESTION_TYPES, TASKS, vocabulary

    v2 = generate(2000, seed=12, qtypes=TASKS["v2"])
    assert {e.qtype for e in v2} == set(TASKS["v2"]) and set(QUESTION_TYPES) < set(TASKS["v2"])
    for ex in v2:
        assert solve(ex.scene.to_json(), ex.question) == ex.answer, (ex.question, ex.trace)
        assert len(ex.trace) == len(ex.cells) == len(ex.reads_image)
    # the new types' arithmetic stretch is text-only: nothing after the last cell name reads the image
    for ex in (e for e in v2 if e.qtype in ("sum", "distance")):
        last_read = max(i for i, r in enumerate(ex.reads_image) if r)
        tail = ex.trace[last_read + 1 :]
        assert "plus" in tail and not any(ex.reads_image[last_read + 1 :])
    # v2's vocabulary extends v1's: every v1 word keeps its id
    assert vocabulary("v2")[: len(vocabulary("v1"))] == vocabulary("v1")
