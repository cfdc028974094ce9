"""Data layer without a tokenizer: readers, layouts, errors, splits and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.data import (
    DataError,
    Record,
    SkipReport,
    cached,
    phase_split,
    read_records,
    source_fingerprint,
    to_preference_examples,
    to_prompt_examples,
    to_sft_examples,
    train_eval_split,
)
from rlhf.data import readers


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def recs(*rows: dict, file: str = "d.jsonl") -> list[Record]:
    """Records as read from a JSONL file, line i + 1 for row i."""
    return [Record(row, f"{file} line {i + 1}") for i, row in enumerate(rows)]


USER = {"role": "user", "content": "hi"}


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------


def test_read_jsonl_counts_lines_from_one_and_skips_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n')
    records = read_records(str(path))
    assert [r.fields["prompt"] for r in records] == ["a", "c"]
    assert [r.where for r in records] == [f"{path} line 1", f"{path} line 3"]


def test_read_json_array_and_object_with_one_list(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    records = read_records(str(array))
    assert [r.fields for r in records] == [{"prompt": "a"}, {"prompt": "b"}]
    assert records[1].where == f"{array} item 2"

    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"version": 1, "data": [{"prompt": "a"}]}))
    assert read_records(str(wrapped))[0].fields == {"prompt": "a"}


def test_read_json_object_without_a_single_list_is_an_error(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"a": [], "b": []}))
    with pytest.raises(DataError, match=r"w\.json: expected a JSON array of objects.*2 list values"):
        read_records(str(path))


def test_read_csv_rows_are_strings_numbered_after_the_header(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('prompt,response,score\n"a, with comma",b,1.5\nc,"multi\nline",2\n')
    records = read_records(str(path))
    assert records[0].fields == {"prompt": "a, with comma", "response": "b", "score": "1.5"}
    assert records[1].fields["response"] == "multi\nline"
    assert [r.where for r in records] == [f"{path} row 1", f"{path} row 2"]


def test_read_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "x.parquet"
    pd.DataFrame({"prompt": ["a", "b"], "response": ["c", "d"], "score": [1, 2]}).to_parquet(path)
    records = read_records(str(path))
    assert records[1].fields == {"prompt": "b", "response": "d", "score": 2}
    assert type(records[1].fields["score"]) is int  # plain Python values, not numpy
    assert records[1].where == f"{path} row 2"


def test_read_parquet_chat_messages_become_plain_lists(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "chat.parquet"
    conversation = [USER, {"role": "assistant", "content": "hello"}]
    pd.DataFrame({"messages": [conversation]}).to_parquet(path)
    (example,), _ = to_sft_examples(read_records(str(path)))
    assert (example.messages, example.response, example.where) == ([USER], "hello", f"{path} row 1")


def test_read_hf_local_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    # Keep the datasets library's own cache out of the home folder.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "mydata"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}])
    write_jsonl(folder / "test.jsonl", [{"question": "q3", "answer": "a3"}])
    spec = f"hf:{folder}"
    records = read_records(spec, columns={"prompt": "question", "response": "answer"})
    assert [r.fields for r in records] == [{"prompt": "q1", "response": "a1"}, {"prompt": "q2", "response": "a2"}]
    assert records[1].where == f"{spec}[train] row 2"
    test = read_records(spec, split="test")
    assert test[0].fields == {"question": "q3", "answer": "a3"} and test[0].where == f"{spec}[test] row 1"
    with pytest.raises(DataError, match=r"hf:.*split 'nope'"):
        read_records(spec, split="nope")


def test_read_default_and_default_eval(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "DEFAULT_DATA_DIR", tmp_path)
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "t", "response": "r"}])
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "e", "response": "r"}])
    assert read_records("default")[0].fields["prompt"] == "t"
    assert read_records("default")[0].where == f"{tmp_path / 'train.jsonl'} line 1"
    assert read_records("default:eval")[0].fields["prompt"] == "e"


def test_shipped_default_dataset_normalises():
    train, evaluation = read_records("default"), read_records("default:eval")
    sft, report = to_sft_examples(train)
    assert len(sft) == len(train) > 0 and report.skipped == 0
    prompts, _ = to_prompt_examples(evaluation)
    assert prompts


def test_max_records(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": str(i)} for i in range(10)])
    assert [r.fields["prompt"] for r in read_records(str(path), max_records=3)] == ["0", "1", "2"]


def test_column_mapping_renames_and_swaps(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("question,answer,prompt\nq,a,other\n")
    records = read_records(str(path), columns={"prompt": "question", "response": "answer"})
    assert records[0].fields == {"prompt": "q", "response": "a"}
    swapped = read_records(str(path), columns={"question": "answer", "answer": "question"})
    assert swapped[0].fields["question"] == "a" and swapped[0].fields["answer"] == "q"


def test_missing_mapped_column_names_it_and_the_existing_columns(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(DataError) as err:
        read_records(str(path), columns={"prompt": "query"})
    message = str(err.value)
    assert f"{path} row 1" in message and "'query'" in message and "'prompt'" in message
    assert "question, answer" in message


# --------------------------------------------------------------------------------------------------
# Reader errors: each names the file, the line/row and what was wrong
# --------------------------------------------------------------------------------------------------


def test_malformed_json_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": }\n')
    with pytest.raises(DataError, match=rf"{path} line 2: not valid JSON: Expecting value at column \d+"):
        read_records(str(path))


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a"}\n["prompt", "a"]\n')
    with pytest.raises(DataError, match=rf"{path} line 2: expected a JSON object.*got list"):
        read_records(str(path))


def test_json_array_item_that_is_not_an_object(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[{"prompt": "a"}, 3]')
    with pytest.raises(DataError, match=rf"{path} item 2: expected a JSON object, got int"):
        read_records(str(path))


def test_malformed_json_file_names_the_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]')
    with pytest.raises(DataError, match=rf"{path} line 3: not valid JSON"):
        read_records(str(path))


def test_unknown_extension_lists_supported_ones(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"x\.txt: unsupported file type '\.txt'; supported: .*\.jsonl.*\.parquet"):
        read_records(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_records(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("name,content", [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "prompt,response\n"),
                                          ("e.csv", "")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{path}: no records"):
        read_records(str(path))


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"{path}: unreadable Parquet"):
        read_records(str(path))


def test_unreadable_csv_and_non_utf8_jsonl_name_the_line(tmp_path):
    csv_path = tmp_path / "x.csv"
    csv_path.write_bytes(b"prompt,response\na,b\n\xff\xfe,c\n")
    with pytest.raises(DataError, match=rf"{csv_path} line 3: unreadable CSV: not UTF-8 text"):
        read_records(str(csv_path))
    jsonl_path = tmp_path / "x.jsonl"
    jsonl_path.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{jsonl_path} line 2: not UTF-8 text"):
        read_records(str(jsonl_path))


def test_csv_row_with_wrong_number_of_values(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("prompt,response\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=rf"{path} row 2: has 3 values, the header has 2"):
        read_records(str(path))


def test_reader_skips_bad_lines_when_given_a_report(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a"}\nnot json\n[1]\n{"prompt": "b"}\nbad\n')
    report = SkipReport()
    records = read_records(str(path), skipped=report)
    assert [r.fields["prompt"] for r in records] == ["a", "b"]
    assert report.reasons == {"malformed JSON": 2, "not a JSON object": 1}
    assert report.total == 5 and report.first["malformed JSON"] == f"{path} line 2"


# --------------------------------------------------------------------------------------------------
# SFT layouts
# --------------------------------------------------------------------------------------------------

HH_MULTI = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant: Why not?"


def test_sft_layouts():
    records = recs(
        {"prompt": "Say hi", "response": " Hi! "},
        {"user_input": "Say hi", "completion": "Hi!", "score": 1},
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi"},
                      {"role": "assistant", "content": "Hi!"}]},
        {"text": HH_MULTI},
        {"chosen": HH_MULTI, "rejected": "\n\nHuman: Hi there\n\nAssistant: no"},
        {"prompt": "\n\nHuman: Say hi\n\nAssistant:", "chosen": " Hi!", "rejected": " No."},
    )
    examples, report = to_sft_examples(records)
    assert report.skipped == 0 and len(examples) == 6
    simple = [{"role": "user", "content": "Say hi"}]
    assert (examples[0].messages, examples[0].response) == (simple, "Hi!")
    assert (examples[1].messages, examples[1].response) == (simple, "Hi!")
    assert examples[2].messages == [{"role": "system", "content": "Be kind."}, *simple]
    assert examples[2].response == "Hi!"
    hh_prompt = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    assert (examples[3].messages, examples[3].response) == (hh_prompt, "Why not?")
    assert (examples[4].messages, examples[4].response) == (hh_prompt, "Why not?")
    assert (examples[5].messages, examples[5].response) == (simple, "Hi!")
    assert [e.where for e in examples] == [f"d.jsonl line {i}" for i in range(1, 7)]


def test_sft_messages_must_end_with_the_assistant():
    records = recs({"messages": [USER]})
    with pytest.raises(DataError, match=r"d\.jsonl line 1: field 'messages\[0\]\.role': expected 'assistant'"):
        to_sft_examples(records)


def test_sft_messages_role_must_be_known():
    records = recs({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]})
    with pytest.raises(DataError, match=r"line 1: field 'messages\[0\]\.role': expected one of system, user, "
                                        r"assistant, got 'bot'"):
        to_sft_examples(records)


# --------------------------------------------------------------------------------------------------
# Preference layouts
# --------------------------------------------------------------------------------------------------


def test_preference_prompt_chosen_rejected_rm_static():
    records = recs({"prompt": "\n\nHuman: Q?\n\nAssistant:", "chosen": " good", "rejected": " bad"})
    (example,), _ = to_preference_examples(records)
    assert example.messages == [{"role": "user", "content": "Q?"}]
    assert (example.chosen, example.rejected) == ("good", "bad")


def test_preference_hh_texts_split_at_the_last_assistant_turn():
    chosen = "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: good"
    rejected = "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: bad"
    (example,), _ = to_preference_examples(recs({"chosen": chosen, "rejected": rejected}))
    assert example.messages == [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                                {"role": "user", "content": "C"}]
    assert (example.chosen, example.rejected) == ("good", "bad")


def test_preference_hh_texts_with_different_conversations_are_an_error():
    records = recs({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"})
    with pytest.raises(DataError, match=r"d\.jsonl line 1: field 'rejected': expected the same conversation"):
        to_preference_examples(records)


def test_preference_pairs_from_scores_drop_and_count_ties():
    records = recs(
        {"user_input": "Q1", "completion": "a", "score": 1},
        {"user_input": "Q2", "completion": "x", "score": 0.5},
        {"user_input": "Q1", "completion": "b", "score": 3},
        {"user_input": "Q1", "completion": "c", "score": "1"},  # CSV gives strings; tie with "a"
        {"user_input": "Q3", "completion": "alone", "score": 1},
        {"user_input": "Q2", "completion": "y", "score": 0.1},
    )
    examples, report = to_preference_examples(records)
    pairs = [(e.messages[0]["content"], e.chosen, e.rejected) for e in examples]
    assert pairs == [("Q1", "b", "a"), ("Q1", "b", "c"), ("Q2", "x", "y")]
    assert report.notes == {"pairs dropped for tied scores": 1, "prompts with a single scored completion (no pair)": 1}
    assert report.skipped == 0
    assert "1 pairs dropped for tied scores" in report.summary()
    assert examples[0].where == "d.jsonl line 3 and d.jsonl line 1"


def test_preference_scores_must_be_numbers():
    records = recs({"user_input": "Q", "completion": "a", "score": "high"})
    with pytest.raises(DataError, match=r"line 1: field 'score': expected a finite number, got 'high'"):
        to_preference_examples(records)


def test_identical_chosen_and_rejected():
    with pytest.raises(DataError, match=r"d\.jsonl line 1: field 'rejected': expected a response different from "
                                        r"'chosen', got 'same'"):
        to_preference_examples(recs({"prompt": "Q", "chosen": "same", "rejected": " same "}))
    scored = recs({"user_input": "Q", "completion": "a", "score": 1}, {"user_input": "Q", "completion": "a", "score": 2})
    with pytest.raises(DataError, match=r"line 2 and d\.jsonl line 1: field 'completion'"):
        to_preference_examples(scored)
    examples, report = to_preference_examples(scored + recs({"prompt": "Q", "chosen": "a", "rejected": "b"}),
                                              skip_invalid=True)
    assert len(examples) == 1 and report.reasons == {"chosen equals rejected": 1}


# --------------------------------------------------------------------------------------------------
# Prompt layouts
# --------------------------------------------------------------------------------------------------


def test_prompt_layouts_and_duplicates():
    records = recs(
        {"prompt": "P1"},
        {"user_input": "P2", "completion": "x", "score": 1},
        {"user_input": "P2", "completion": "y", "score": 2},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "P3"},
                      {"role": "assistant", "content": "drop me"}]},
        {"text": "\n\nHuman: P4\n\nAssistant: A4"},
        {"chosen": "\n\nHuman: P5\n\nAssistant: A\n\nHuman: more\n\nAssistant: B", "rejected": "..."},
        {"prompt": "Q", "response": "R"},
        {"prompt": "\n\nHuman: P6\n\nAssistant:", "chosen": "c", "rejected": "r"},
    )
    examples, report = to_prompt_examples(records)
    assert [e.messages for e in examples] == [
        [{"role": "user", "content": "P1"}],
        [{"role": "user", "content": "P2"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "P3"}],
        [{"role": "user", "content": "P4"}],
        [{"role": "user", "content": "P5"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "more"}],
        [{"role": "user", "content": "Q"}],
        [{"role": "user", "content": "P6"}],
    ]
    assert report.notes == {"duplicate prompts dropped": 1}


# --------------------------------------------------------------------------------------------------
# Record errors: each names the file, the line and the field
# --------------------------------------------------------------------------------------------------


def test_missing_field():
    with pytest.raises(DataError) as err:
        to_sft_examples(recs({"prompt": "a", "response": "b"}, {"prompt": "a", "answer": "b"}))
    assert str(err.value) == "d.jsonl line 2: field 'response': missing; the record has fields: prompt, answer"


def test_empty_field():
    with pytest.raises(DataError, match=r"^d\.jsonl line 1: field 'response': expected a non-empty string, got ' '$"):
        to_sft_examples(recs({"prompt": "a", "response": " "}))


def test_non_string_field():
    with pytest.raises(DataError, match=r"^d\.jsonl line 1: field 'response': expected a non-empty string, got 3$"):
        to_sft_examples(recs({"prompt": "a", "response": 3}))
    with pytest.raises(DataError, match=r"line 1: field 'prompt': expected a non-empty string, got None"):
        to_prompt_examples(recs({"prompt": None}))


def test_record_longer_than_max_record_chars():
    with pytest.raises(DataError, match=r"^d\.jsonl line 1: field 'response': expected a record of at most "
                                        r"max_record_chars=10 characters, got 13$"):
        to_sft_examples(recs({"prompt": "abc", "response": "x" * 10}), max_record_chars=10)


def test_unknown_layout_names_fields_found_and_layouts_accepted():
    with pytest.raises(DataError) as err:
        to_sft_examples(recs({"question": "a", "answer": "b"}))
    message = str(err.value)
    assert message.startswith("d.jsonl line 1: unknown record layout: the record has fields question, answer")
    assert "prompt/response" in message and "messages (chat)" in message
    with pytest.raises(DataError, match=r"line 1: unknown record layout.*prompt/chosen/rejected"):
        to_preference_examples(recs({"response": "b"}))


def test_hh_text_must_end_with_an_assistant_turn():
    with pytest.raises(DataError, match=r"line 1: field 'text': expected an HH conversation ending with"):
        to_sft_examples(recs({"text": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"}))
    with pytest.raises(DataError, match=r"line 1: field 'text': expected an Anthropic-HH conversation"):
        to_sft_examples(recs({"text": "just text"}))


def test_skip_invalid_counts_by_reason():
    records = recs(
        {"prompt": "a", "response": "b"},
        {"prompt": "a", "response": ""},
        {"prompt": "a", "response": "  "},
        {"prompt": "a", "response": 3},
        {"prompt": "a", "response": "x" * 50},
        {"nothing": "here"},
        {"prompt": "a"},
        {"prompt": "c", "response": "d"},
    )
    examples, report = to_sft_examples(records, skip_invalid=True, max_record_chars=40)
    assert [e.response for e in examples] == ["b", "d"]
    assert report.total == 8 and report.skipped == 6
    assert report.reasons == {
        "empty field 'response'": 2,
        "invalid field 'response'": 1,
        "longer than 40 characters": 1,
        "unknown layout": 1,
        "missing field 'response'": 1,
    }
    assert report.summary().startswith("skipped 6 of 8 records: 2 empty field 'response', ")
    assert report.first["empty field 'response'"] == "d.jsonl line 2"


def test_skip_invalid_with_nothing_left_is_an_error():
    with pytest.raises(DataError, match=r"no usable examples in 2 records.*skipped 2 of 2 records"):
        to_sft_examples(recs({"prompt": "a"}, {"prompt": "b"}), skip_invalid=True)


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def test_train_eval_split_is_deterministic_and_sized():
    items = list(range(100))
    train, evaluation = train_eval_split(items, 0.1, seed=1)
    assert len(evaluation) == 10 and sorted(train + evaluation) == items
    assert train == sorted(train)  # original order kept
    assert train_eval_split(items, 0.1, seed=1) == (train, evaluation)
    assert train_eval_split(items, 0.1, seed=2)[1] != evaluation
    assert len(train_eval_split(items[:3], 0.01, seed=0)[1]) == 1  # at least one held out
    assert train_eval_split(items[:1], 0.5, seed=0) == ([0], [])  # and at least one left to train on
    assert train_eval_split(items, 0.0, seed=0) == (items, [])


def test_phase_split_partitions_exactly_and_deterministically():
    items = list(range(103))
    shares = [phase_split(items, "2,4,4", phase=p, seed=7) for p in range(3)]
    assert sorted(shares[0] + shares[1] + shares[2]) == items  # nothing lost, nothing repeated
    assert [len(s) for s in shares] == [20, 41, 42]
    assert shares == [phase_split(items, "2,4,4", phase=p, seed=7) for p in range(3)]
    assert shares[0] != phase_split(items, "2,4,4", phase=0, seed=8)
    assert phase_split(items, "0,0,1", phase=2, seed=7) == items
    assert phase_split(items, "0,0,1", phase=0, seed=7) == []
    with pytest.raises(ValueError, match="phase must be 0"):
        phase_split(items, "2,4,4", phase=3, seed=7)
    with pytest.raises(ValueError, match="three non-negative integers"):
        phase_split(items, "2,4", phase=0, seed=7)


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def test_cache_hit_does_not_call_build_and_keys_differ(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return [{"input_ids": [1, 2, 3]}]

    key = {"source": "abc", "max_length": 512}
    assert cached(key, build, tmp_path) == [{"input_ids": [1, 2, 3]}]
    assert cached(dict(reversed(key.items())), build, tmp_path) == [{"input_ids": [1, 2, 3]}]
    assert len(calls) == 1
    cached({**key, "max_length": 256}, build, tmp_path)
    assert len(calls) == 2
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2 and all(f.suffix == ".json" for f in files)  # no temp files left behind
    assert json.loads(files[0].read_text())["items"] == [{"input_ids": [1, 2, 3]}]


def test_cache_rebuilds_an_unreadable_file_and_leaves_nothing_on_failure(tmp_path):
    key = {"k": 1}
    cached(key, lambda: [{"a": 1}], tmp_path)
    (file,) = tmp_path.iterdir()
    file.write_text('{"items": [')  # truncated by hand
    assert cached(key, lambda: [{"a": 2}], tmp_path) == [{"a": 2}]

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached({"k": 2}, broken, tmp_path)
    with pytest.raises(TypeError):  # not JSON-serialisable items: the temp file is removed
        cached({"k": 3}, lambda: [{"a": object()}], tmp_path)
    assert [f.name for f in tmp_path.iterdir()] == [file.name]


def test_cache_dir_defaults_under_rlhf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    cached({"k": "home"}, lambda: [], None)
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.json"))) == 1


def test_source_fingerprint_follows_content(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}])
    first = source_fingerprint(str(path))
    assert source_fingerprint(str(path)) == first
    write_jsonl(path, [{"prompt": "b"}])
    assert source_fingerprint(str(path)) != first
    assert source_fingerprint("hf:org/name") == "hf:org/name"
    assert len(source_fingerprint("default")) == 64
