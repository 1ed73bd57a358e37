"""Shared-prompt packing gives the log-probs and gradients of the plain forward pass."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from harpo_core.losses import token_logprobs
from harpo_core.packing import pack_shared_prompts, shared_prompt_forward

VOCAB = 50


def tiny_model(attention: str):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, attn_implementation=attention)
    return Qwen2ForCausalLM(config).eval()


def grouped_batch():
    """Right-padded rows: a group of 4 with response lengths 5, 1, 3, 0 (prompt of 6), a lone
    row (prompt of 3), a group of 3 (prompt of 9), and a row whose prompt has the group's
    length but other tokens, so it must not join the group."""
    gen = torch.Generator().manual_seed(1)
    spec = [(0, 6, 5), (0, 6, 1), (0, 6, 3), (0, 6, 0), (1, 3, 4), (2, 9, 2), (2, 9, 6),
            (2, 9, 2), (3, 9, 3)]
    prompts = {p: torch.randint(3, VOCAB, (n,), generator=gen) for p, n, _ in spec}
    width = max(n + r for _, n, r in spec) + 2  # extra padding columns on every row
    ids = torch.zeros(len(spec), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids)
    for row, (p, n, r) in enumerate(spec):
        ids[row, :n] = prompts[p]
        ids[row, n:n + r] = torch.randint(3, VOCAB, (r,), generator=gen)
        attention[row, :n + r] = 1
        response[row, n:n + r] = 1
    return ids, attention, response


def test_rows_that_share_a_prompt_are_packed_together():
    ids, attention, response = grouped_batch()
    pack = pack_shared_prompts(ids, attention, response)
    assert pack.row_pack.tolist() == [0, 0, 0, 0, 1, 2, 2, 2, 3]
    # prompt once, then the responses one after another
    assert pack.input_ids.shape == (4, 9 + 2 + 6 + 2)
    assert pack.input_ids[0, :6 + 9].tolist() == (
        ids[0, :6].tolist() + ids[0, 6:11].tolist() + ids[1, 6:7].tolist()
        + ids[2, 6:9].tolist())
    # each response token keeps the position it had in its own row
    assert pack.position_ids[0, 6:15].tolist() == [6, 7, 8, 9, 10, 6, 6, 7, 8]
    # response 2 sees the prompt and itself, not responses 0 and 1
    seen = pack.allowed[0, 13]
    assert seen[:6].all() and not seen[6:12].any() and seen[12:14].all() and not seen[14:].any()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_log_probs_and_gradients_match_the_plain_forward(attention):
    ids, attention_mask, response = grouped_batch()
    mask = response.bool()
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))
    model = tiny_model(attention)

    logits = model(input_ids=ids, attention_mask=attention_mask).logits
    plain = token_logprobs(logits, ids)
    plain_predicting = logits[:, :-1][mask[:, 1:]]
    (plain * weights)[mask].sum().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    packed, predicting = shared_prompt_forward(model, ids, attention_mask, response)
    (packed * weights)[mask].sum().backward()

    assert torch.allclose(packed[mask], plain[mask], atol=1e-5)
    assert (packed[~mask] == 0).all()
    assert torch.allclose(predicting, plain_predicting, atol=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, plain_grads[name], atol=1e-5), name


def test_a_response_that_sees_its_neighbour_would_be_caught():
    """The comparison above can fail: leak one response into another and the log-probs move."""
    ids, attention_mask, response = grouped_batch()
    model = tiny_model("eager")
    plain = token_logprobs(model(input_ids=ids, attention_mask=attention_mask).logits, ids)
    pack = pack_shared_prompts(ids, attention_mask, response)

    def row2_second_token(pack):  # row 2's response sits at packed columns 12..14
        logits = model(input_ids=pack.input_ids, position_ids=pack.position_ids,
                       attention_mask=pack.attention_mask(torch.float32)).logits
        return torch.log_softmax(logits[0, 12], -1)[ids[2, 7]].item()

    assert row2_second_token(pack) == pytest.approx(plain[2, 7].item(), abs=1e-5)
    pack.allowed[0, 12, 6] = True  # row 2's first token attends to row 0's first token
    assert abs(row2_second_token(pack) - plain[2, 7].item()) > 1e-4
