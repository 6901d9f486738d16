"""Unique item SCIDs: tail re-assignment and the extra-level fallback."""
from __future__ import annotations

import numpy as np

from align3gr_pipelines.tokenizer.scid_collisions import colliding_mask, collision_stats, resolve_collisions


def setup(n: int = 40, levels: int = 3, k: int = 4, d: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, k, size=(n, levels)), rng.normal(size=(n, levels, d)), rng.normal(size=(levels, k, d))


def test_collision_stats():
    codes = np.array([[0, 1], [0, 1], [1, 1], [0, 1]])
    assert colliding_mask(codes).tolist() == [True, True, False, True]
    assert collision_stats(codes) == {"colliding": 3.0, "collision_rate": 0.75, "unique_scids": 2.0}


def test_resolution_makes_scids_unique_and_only_touches_colliders():
    codes, residuals, books = setup()
    before = colliding_mask(codes)
    new, report = resolve_collisions(codes, residuals, books)
    assert new.shape == codes.shape
    assert not colliding_mask(new).any()
    assert (new >= 0).all() and (new < books.shape[1]).all()
    assert (new[~before] == codes[~before]).all()  # items that did not collide keep their SCID
    changed = (new != codes).any(1)
    assert report["items_touched"] == int(changed.sum()) > 0
    assert report["colliding_items_before"] == int(before.sum())
    assert report["colliding_items_after"] == 0 and not report["extra_level_added"]


def test_the_item_nearest_the_shared_codeword_keeps_it_and_the_other_moves_to_the_nearest_free_code():
    books = np.zeros((2, 3, 1))
    books[1, :, 0] = [0.0, 1.0, 5.0]
    codes = np.array([[0, 0], [0, 0]])
    residuals = np.zeros((2, 2, 1))
    residuals[:, 1, 0] = [0.9, 0.1]  # item 1 sits on codeword 0; item 0 is nearest free codeword 1
    new, report = resolve_collisions(codes, residuals, books)
    assert new.tolist() == [[0, 1], [0, 0]]
    assert report["items_touched"] == 1 and report["items_reassigned_tail1"] == 1


def test_overfull_prefix_is_resolved_over_the_last_two_levels():
    k = 3
    books = np.random.default_rng(1).normal(size=(3, k, 2))
    codes = np.zeros((5, 3), dtype=int)  # five items under one 2-level prefix, only three last-level codes
    residuals = np.random.default_rng(2).normal(size=(5, 3, 2))
    new, report = resolve_collisions(codes, residuals, books)
    assert not colliding_mask(new).any()
    assert (new[:, 0] == 0).all()  # the first level is never changed
    assert report["items_reassigned_tail2"] > 0 and not report["extra_level_added"]


def test_extra_level_fallback_keeps_lengths_equal():
    books = np.random.default_rng(0).normal(size=(2, 2, 2))
    codes = np.zeros((7, 2), dtype=int)  # seven items, only four SCIDs exist at all
    residuals = np.random.default_rng(1).normal(size=(7, 2, 2))
    new, report = resolve_collisions(codes, residuals, books)
    assert new.shape == (7, 3)
    assert not colliding_mask(new).any()
    assert report["extra_level_added"] and report["levels"] == 3


def test_resolution_is_deterministic():
    codes, residuals, books = setup(seed=3)
    a, _ = resolve_collisions(codes, residuals, books)
    b, _ = resolve_collisions(codes, residuals, books)
    assert np.array_equal(a, b)


def test_no_collisions_is_a_no_op():
    codes = np.array([[0, 1], [1, 0], [1, 1]])
    new, report = resolve_collisions(codes, np.zeros((3, 2, 1)), np.zeros((2, 2, 1)))
    assert np.array_equal(new, codes) and report["items_touched"] == 0
