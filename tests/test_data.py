"""Training data (gemma_core.data): what each file kind trains on, batch shapes and order, and an
exact resume from a step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gemma_core.data import IGNORE_INDEX, Batches, Example, chat_example, read_examples
from gemma_core.errors import InputError
from gemma_core.tokenizer import GemmaTokenizer


@pytest.fixture(scope="module")
def tok(spm_file: Path) -> GemmaTokenizer:
    return GemmaTokenizer(spm_file)


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_chat_trains_on_the_model_turns_only(tok: GemmaTokenizer) -> None:
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "the cat"},
                {"role": "user", "content": "and"}, {"role": "assistant", "content": "a dog"}]
    ex = chat_example(tok, messages)
    # the ids are the chat template's own tokens (the way generation will see the prompt)
    assert list(ex.ids) == tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    trained = tok.decode([i for i, t in zip(ex.ids, ex.targets, strict=True) if t])
    assert trained == "the cat<end_of_turn>a dog<end_of_turn>"


def test_each_file_kind(tok: GemmaTokenizer, tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("the cat\n\n\nthe dog\n")
    docs = read_examples(txt, tok)
    assert [tok.decode(e.ids) for e in docs] == ["<bos>the cat<eos>", "<bos>the dog<eos>"]
    assert all(e.targets[1:] == (True,) * (len(e.ids) - 1) and not e.targets[0] for e in docs)
    path = _jsonl(tmp_path / "b.jsonl", [{"text": "the cat"}, {"prompt": "the", "completion": " dog"}])
    plain, completion = read_examples(path, tok)
    assert plain.ids == docs[0].ids
    trained = [i for i, t in zip(completion.ids, completion.targets, strict=True) if t]
    assert tok.decode(trained) == " dog<eos>"


@pytest.mark.parametrize(("records", "message"), [
    (["not an object"], r"b.jsonl:1: expected a JSON object"),
    ([{"txt": "x"}], r"b.jsonl:1: expected a 'text', 'messages' or 'prompt'/'completion' field"),
    ([{"text": "x"}, {"messages": [{"role": "assistant", "content": "x"}]}], r"b.jsonl:2: .*alternate"),
    ([{"text": 3}], r"'text' must be a string"),
])
def test_malformed_lines_are_named(tok: GemmaTokenizer, tmp_path: Path, records: list[object],
                                   message: str) -> None:
    with pytest.raises(InputError, match=message):
        read_examples(_jsonl(tmp_path / "b.jsonl", records), tok)


def test_bad_files_are_refused(tok: GemmaTokenizer, tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(InputError, match=r"x.jsonl:2: not JSON"):
        read_examples(tmp_path / "x.jsonl", tok)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(InputError, match=r"expected a \.jsonl or \.txt file"):
        read_examples(tmp_path / "x.csv", tok)
    with pytest.raises(InputError, match="cannot read"):
        read_examples(tmp_path / "missing.txt", tok)
    _jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "the cat"}]}])
    with pytest.raises(InputError, match="no token to train on"):  # a chat without a model turn
        read_examples(tmp_path / "p.jsonl", tok)


def _examples(tok: GemmaTokenizer, n: int = 9) -> list[Example]:
    words = ["the cat", "a dog sat", "the", "on the mat now", "cat", "dog dog", "mat", "sat on", "a"]
    return [chat_example(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": w}])
            for w in words[:n]]


@pytest.mark.parametrize("pack", [True, False])
def test_batches_have_one_shape_and_labels_follow_targets(tok: GemmaTokenizer, pack: bool) -> None:
    examples = _examples(tok)
    batches = Batches(examples, batch_size=2, seq_len=12, epochs=2, pack=pack, seed=5)
    seen = list(batches)
    assert len(seen) == len(batches) == 2 * batches.steps_per_epoch
    for b in seen:
        assert b.ids.shape == b.mask.shape == b.labels.shape == (2, 12)
        trained = b.labels != IGNORE_INDEX
        assert (b.labels[trained] == b.ids[trained]).all() and not (trained & ~b.mask).any()
    if not pack:  # one example a row, right-padded
        first = seen[0]
        assert first.mask[:, 0].all() and (first.ids[~first.mask] == 0).all()
        assert all((row == np.sort(row)[::-1]).all() for row in first.mask)


def test_order_depends_on_the_seed_and_resume_is_exact(tok: GemmaTokenizer) -> None:
    examples = _examples(tok)
    run = Batches(examples, batch_size=2, seq_len=8, epochs=3, seed=1)
    full = [b.ids for b in run]
    again = Batches(examples, batch_size=2, seq_len=8, epochs=3, seed=1)
    assert all((a == b.ids).all() for a, b in zip(full, again, strict=True))
    other = [b.ids for b in Batches(examples, batch_size=2, seq_len=8, epochs=3, seed=2)]
    assert any((a != b).any() for a, b in zip(full, other, strict=True))
    for step in (0, 1, run.steps_per_epoch, len(run) - 1, len(run)):
        resumed = [b.ids for b in run.from_step(step)]
        assert len(resumed) == len(run) - step
        assert all((a == b).all() for a, b in zip(full[step:], resumed, strict=True))
    with pytest.raises(InputError, match="outside the run"):
        run.from_step(len(run) + 1)


def test_too_little_data_for_one_batch_is_refused(tok: GemmaTokenizer) -> None:
    with pytest.raises(InputError, match="make no batch of 4"):
        Batches(_examples(tok, 2), batch_size=4, seq_len=64, pack=False)
