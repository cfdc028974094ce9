"""Pair selection for AI-feedback preference data, and the file the rm stage reads back."""

from __future__ import annotations

from rlhf.data import read_records, to_preference_examples
from rlhf.pairs import select_pairs, write_pairs


def test_best_and_worst_non_empty_responses_make_the_pair_and_drops_are_counted(tmp_path):
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    pairs, dropped = select_pairs(
        ["a", "b", "c", "d"],
        [user("a"), user("b"), user("c"), user("d")],
        [["good", "", "bad", "ok"], ["same", "same"], ["x", ""], ["p", "q"]],
        [[0.9, -1.0, 0.1, 0.5], [0.2, 0.3], [0.5, -1.0], [0.50, 0.52]],
        min_score_gap=0.05,
    )
    assert [(p.chosen, p.rejected) for p in pairs] == [("good", "bad")]  # the empty reply is not "worst"
    assert dropped == {"identical responses": 1, "fewer than 2 non-empty responses": 1, "score gap <= 0.05": 1}

    path = write_pairs(pairs, tmp_path / "pairs.jsonl")
    examples, report = to_preference_examples(read_records(str(path)))
    assert [(e.chosen, e.rejected) for e in examples] == [("good", "bad")] and not report.skipped
