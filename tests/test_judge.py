"""The default programmatic judge and user reward functions."""

from __future__ import annotations

import pytest

from rlhf.judge import EMPTY_SCORE, DefaultJudge, concise, finished, load_function, sentence_count, topic_overlap


@pytest.fixture(scope="module")
def judge():
    return DefaultJudge()


def test_friendly_beats_hostile(judge):
    prompt = "How do I care for a basil plant?"
    kind, rude = judge(
        [prompt, prompt],
        ["Great question! Basil loves sunny windows and gentle watering; you will enjoy a happy plant.",
         "Basil is awful and you will fail; it is a terrible, hopeless plant."],
    )
    assert kind > rude + 1.0


def test_on_topic_beats_off_topic_at_equal_tone(judge):
    prompt = "Any tips for baking bread at home?"
    on, off = judge([prompt, prompt], ["Baking bread at home is fun.", "Painting fences is fun."])
    assert on > off
    assert topic_overlap(prompt, "Baking bread at home is fun.") == pytest.approx(3 / 4)  # not "tips"


def test_empty_response_scores_lowest(judge):
    assert judge(["hi"], ["   "]) == [EMPTY_SCORE]


def test_length_mismatch_is_an_error(judge):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        judge(["a", "b"], ["x"])


def test_load_user_function(tmp_path):
    file = tmp_path / "my_reward.py"
    file.write_text("def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    function = load_function(f"{file}:score")
    assert function(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    with pytest.raises(ValueError, match="no function named 'missing'"):
        load_function(f"{file}:missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_function(f"{tmp_path}/nope.py:score")
    with pytest.raises(ValueError, match="FILE.py:NAME"):
        load_function("no_colon")


def test_a_natural_complete_reply_beats_a_string_of_positive_words(judge):
    prompt = "How do I care for a basil plant?"
    natural, gamed = judge([prompt, prompt], [
        "Basil loves a sunny window and gentle watering. Pinch off the flowers and it will keep growing!",
        "Great! Love! Wonderful! Amazing! Happy! piano forty late learn",
    ])
    assert natural > gamed + 0.5


def test_a_finished_reply_beats_the_same_reply_cut_off(judge):
    prompt = "Any tips for a first marathon?"
    whole = "Start slowly and drink water at every station. You will do wonderfully on the day!"
    cut = "Start slowly and drink water at every station. You will do wonderfully on"
    assert finished(whole) and not finished(cut)
    done, truncated = judge([prompt, prompt], [whole, cut])
    assert done > truncated + 0.4


def test_concise_means_one_to_three_sentences_of_some_substance():
    assert sentence_count("One. Two! Three? Four.") == 4
    assert sentence_count('She said "hi." Then she smiled') == 2
    assert concise("A short friendly answer with enough words in it.")
    assert not concise("Too short.")
    assert not concise("One sentence here is fine. Two is fine too. Three as well, yes. Four is too many now.")
