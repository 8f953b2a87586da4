"""dvpo.data: JSONL readers and their errors, the HH split, templates, truncation, value batches."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from dvpo.data import (
    DataError,
    DataStats,
    EncodedSequence,
    Encoder,
    ValueExample,
    collate_values,
    parse_hh_dialogue,
    read_preference_pairs,
    read_prompts,
    read_scored,
    render_plain,
    split_hh,
    truncate,
)
from dvpo.data.jsonl import iter_jsonl
from dvpo.models import train_bpe_tokenizer

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
needs_hh = pytest.mark.skipif(not HH.is_file(), reason="shared HH data not present")


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["\n\nHuman: hello there, how are you?\n\nAssistant: I am fine, thanks. And you?"] * 20
    return train_bpe_tokenizer(texts, 300)


# --- readers and errors ----------------------------------------------------------------------

def test_corrupt_line_names_file_and_line(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, good, '{"prompt": "p", "chosen": ', good])
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: invalid JSON"):
        read_preference_pairs(path)


def test_structural_errors_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl.gz", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                {"prompt": "p", "chosen": "a"}], gz=True)
    with pytest.raises(DataError, match=r"p\.jsonl\.gz:2: missing field\(s\) 'rejected'"):
        read_preference_pairs(path)
    path = write_jsonl(tmp_path / "s.jsonl", ['[1, 2]'])
    with pytest.raises(DataError, match=r"s\.jsonl:1: expected a JSON object"):
        list(iter_jsonl(path))
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "response": "a", "reward": "high"}])
    with pytest.raises(DataError, match=r"r\.jsonl:1: 'reward' must be a finite number"):
        read_scored(path)
    path = write_jsonl(tmp_path / "h.jsonl", [{"chosen": "Human: hi", "rejected": "Human: hey"}])
    with pytest.raises(DataError, match=r"h\.jsonl:1: HH record"):
        read_preference_pairs(path)


def test_skips_are_counted_with_positions(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "  ", "rejected": "b"}, "", {"prompt": "q", "chosen": "c", "rejected": "d"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    stats = DataStats("pairs")
    pairs = read_preference_pairs(path, stats)
    assert [p.chosen for p in pairs] == ["a", "c"]
    assert stats.read == 4 and stats.kept == 2  # the blank line is not a record
    assert stats.skipped == {"chosen and rejected are identical": 1, "empty response": 1}
    assert stats.examples["empty response"] == [f"{path}:3"]
    assert pairs[1].where == f"{path}:5"


def test_preference_formats(tmp_path):
    conv = [{"role": "user", "content": "hi"}]
    rows = [
        {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"},
        {"prompt": conv, "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "go away"},
        {"chosen": conv + [{"role": "assistant", "content": "hello"}],
         "rejected": conv + [{"role": "assistant", "content": "no"}]},
    ]
    pairs = read_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("Q: 2+2?\nA:", " 4", " 5")
    assert (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected) == (conv, "hello", "go away")
    assert (pairs[2].prompt, pairs[2].chosen, pairs[2].rejected) == (conv, "hello", "no")


def test_scored_and_prompt_readers(tmp_path):
    scored = read_scored(write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "p", "response": "r", "reward": 0.5}, {"prompt": "p", "response": "", "reward": 1}]))
    assert [(s.response, s.reward) for s in scored] == [("r", 0.5)]
    stats = DataStats("prompts")
    prompts = read_prompts(write_jsonl(tmp_path / "q.jsonl", [
        {"prompt": "tell me"}, {"prompt": " "},
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}]), stats)
    assert [p.prompt for p in prompts] == ["tell me", [{"role": "user", "content": "hi"}]]
    assert stats.skipped == {"empty prompt": 1}


# --- Anthropic HH ----------------------------------------------------------------------------

@needs_hh
def test_hh_split_on_a_real_line():
    first = next(iter_jsonl(HH))[1]
    prompt, chosen, rejected = split_hh(first["chosen"], first["rejected"], "hh:1")
    assert [m["role"] for m in prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert prompt[-1]["content"] == "okay some of these do not have anything to do with pens"
    assert chosen.startswith("No, sorry!  All of these involve a pen")
    assert rejected.startswith("There are lots of funny things you can do with pens")
    # The plain template gives back the original dialogue text.
    assert render_plain(prompt) + " " + chosen == first["chosen"]
    assert render_plain(prompt) + " " + rejected == first["rejected"]


@needs_hh
def test_hh_file_reads_with_counted_skips():
    stats = DataStats("hh")
    pairs = read_preference_pairs(HH, stats)
    assert stats.read == 2312 and len(pairs) == stats.kept == 2312 - sum(stats.skipped.values())
    assert stats.skipped == {"empty response": 4}
    # Line 1255 diverges before its last assistant turn: the prompt is the shared prefix.
    diverged = next(p for p in pairs if p.where.endswith(":1255"))
    assert diverged.prompt[-1]["role"] == "user" and diverged.chosen != diverged.rejected


def test_parse_hh_dialogue_keeps_a_preamble():
    msgs = parse_hh_dialogue("Be nice.\n\nHuman: hi\n\nAssistant: hello\n\nHuman:  two spaces")
    assert msgs == [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"}, {"role": "user", "content": " two spaces"}]
    assert render_plain(msgs) == "Be nice.\n\nHuman: hi\n\nAssistant: hello\n\nHuman:  two spaces\n\nAssistant:"


# --- templates, encoding, truncation ---------------------------------------------------------

def test_truncation_never_cuts_the_response():
    bos, p, r = 1, [1, 10, 11, 12, 13], [20, 21, 22, 2]
    assert truncate(p, r, 9, bos_token_id=bos) == (p, False)
    assert truncate(p, r, 7, bos_token_id=bos) == ([1, 12, 13], True)  # the prompt's left side, BOS kept
    assert truncate(p, r, 6, bos_token_id=bos) == ([1, 13], True)
    assert truncate(p, r, 5, bos_token_id=bos) is None  # BOS alone is no context: dropped
    assert truncate(p, r, 5) == ([13], True)
    assert truncate(p, r, 4) is None  # the response alone fills max_length
    assert truncate(p, r, 20, max_prompt_length=2, bos_token_id=bos) == ([1, 13], True)
    assert truncate(p, r, 7, bos_token_id=bos, mode="drop") is None
    assert truncate(p, r, 9, bos_token_id=bos, mode="drop") == (p, False)
    assert truncate(p, r, 7, max_prompt_length=3, bos_token_id=bos, mode="drop") == ([1, 12, 13], True)
    with pytest.raises(ValueError, match="mode must be one of drop, prompt_left"):
        truncate(p, r, 9, mode="right")


def test_long_examples_are_dropped_by_default_and_counted(tokenizer):
    conv = [{"role": "user", "content": "hello there, how are you?"}]
    responses = ["I am fine, thanks. And you? I am fine, thanks.", "fine"]
    full = [len(s) for s in Encoder(tokenizer, template="plain", max_length=1000).encode(conv, responses, "x:0")]
    stats = DataStats("enc")
    drop = Encoder(tokenizer, template="plain", max_length=max(full) - 1, stats=stats)
    assert drop.encode(conv, responses, "x:1") is None
    assert stats.skipped == {"longer than data.max_length (data.truncation=drop)": 1}
    assert stats.as_dict()["skipped_examples"] == {"longer than data.max_length (data.truncation=drop)": ["x:1"]}
    assert drop.encode(conv, responses[1:], "x:2") is not None  # the short one fits

    stats = DataStats("enc")
    left = Encoder(tokenizer, template="plain", max_length=max(full) - 3, truncation="prompt_left", stats=stats)
    long, short = left.encode(conv, responses, "x:3")
    reference = Encoder(tokenizer, template="plain").encode(conv, responses, "x:0")
    assert long.response_ids == reference[0].response_ids and short == reference[1]  # responses untouched
    assert len(long) == max(full) - 3 and long.prompt_ids[0] == tokenizer.bos_token_id
    assert long.prompt_ids[1:] == reference[0].prompt_ids[-(len(long.prompt_ids) - 1):]  # the prompt's right end
    assert stats.notes == {"sequences with the prompt truncated": 1} and not stats.skipped
    with pytest.raises(ValueError, match="truncation must be one of"):
        Encoder(tokenizer, truncation="keep_end")


def test_encoder_plain_and_chat(tokenizer):
    conv = [{"role": "user", "content": "hello there"}]
    enc = Encoder(tokenizer, template="auto", max_length=64)
    assert enc.template == "plain"
    (seq,) = enc.encode(conv, ["I am fine"], "x:1")
    assert seq.prompt_ids[0] == tokenizer.bos_token_id and seq.response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(seq.prompt_ids + seq.response_ids) == \
        "<bos>\n\nHuman: hello there\n\nAssistant: I am fine<eos>"
    (raw,) = enc.encode("Q:", [" A"], "x:2")  # raw text prompt: response appended verbatim
    assert tokenizer.decode(raw.prompt_ids + raw.response_ids) == "<bos>Q: A<eos>"

    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    try:
        chat = Encoder(tokenizer, template="auto", max_length=64)
        assert chat.template == "chat"
        (seq,) = chat.encode(conv, ["I am fine"], "x:3")
        assert tokenizer.decode(seq.prompt_ids + seq.response_ids) == \
            "<|user|>hello there<|assistant|>I am fine<eos>"
    finally:
        tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        Encoder(tokenizer, template="chat")


def test_encoder_counts_truncation_and_identical_pairs(tokenizer):
    stats = DataStats("enc")
    enc = Encoder(tokenizer, template="plain", max_length=12, truncation="prompt_left", stats=stats)
    out = enc.encode([{"role": "user", "content": "hello there, how are you?"}], ["I am fine", "And you?"], "x:1")
    assert all(len(s) <= 12 and s.response_ids[-1] == tokenizer.eos_token_id for s in out)
    assert stats.notes["sequences with the prompt truncated"] == 2
    # texts that differ but encode alike (an explicit EOS is not doubled)
    same = Encoder(tokenizer, template="plain", stats=stats).encode("p", [" fine", " fine<eos>"], "x:2")
    assert same is None and stats.skipped == {"responses encode identically": 1}


# --- value batches ---------------------------------------------------------------------------

def test_collate_masks_and_rewards():
    a = ValueExample((EncodedSequence([1, 5], [6, 7, 2]), EncodedSequence([1, 5], [8, 2])), (1.0, -1.0))
    b = ValueExample((EncodedSequence([1], [9, 2]),), (0.25,))
    batch = collate_values([a, b], pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 2], [1, 5, 8, 2, 0], [1, 9, 2, 0, 0]]
    # column t is the state before token t+1; response tokens start at prompt_len
    assert batch.mask.tolist() == [[False, True, True, True], [False, True, True, False], [True, True, False, False]]
    assert batch.rewards.tolist() == [[0, 0, 0, 1], [0, 0, -1, 0], [0, 0.25, 0, 0]]
    assert batch.pairs.tolist() == [[0, 1]] and batch.example_rows == [[0, 1], [2]]
    extra = torch.arange(12.0).reshape(3, 4)
    sub, sub_extra = batch.select([1], extra)
    assert sub.input_ids.tolist() == [[1, 9, 2]] and sub.pairs.numel() == 0
    assert sub_extra.tolist() == [[8.0, 9.0]]
    sub, _ = batch.select([1, 0], extra)
    assert sub.pairs.tolist() == [[1, 2]] and sub.example_rows == [[0], [1, 2]]
