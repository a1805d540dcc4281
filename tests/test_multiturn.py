"""Multi-turn chat through one cache (issue #15): later turns fold, and the recall task's samples."""
import torch
from transformers import DynamicCache

import shadowkv_fx
from shadowkv_fx.cache import ShadowKVCache
from shadowkv_fx.evaluation.multiturn import converse, make_multiturn_sample, turn_text
from shadowkv_fx.evaluation.tasks import format_prompt
from tests.models import assert_close, full_rank, tiny_pair

CHUNK, LOCAL, OUTLIERS = 4, 2, 2
REPLY = 6


def test_folding_multiturn_equals_dense_and_folds_each_later_turn():
    """Five later turns of 13-29 tokens, each entering the cache in one forward: at full budget and
    rank the conversation is dense's token for token, every turn moves the store forward, and the
    dense tail ends within the fold window; its buffer is sized by the longest turn (capacity doubles
    when a turn does not fit), never by the conversation."""
    dense, model = tiny_pair("llama", seed=21, peaked=True)  # a wrongly rebuilt folded key moves the logits
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=4096, rank=full_rank(model), chunk_size=CHUNK,
                                        local_chunks=LOCAL, outlier_chunks=OUTLIERS, fold_chunks=1)
    shadowkv_fx.optimize(model, config)
    g = torch.Generator().manual_seed(21)
    prompt = torch.randint(3, 96, (1, 40), generator=g)
    turns = [torch.randint(3, 96, (1, n), generator=g) for n in (13, 29, 17, 24, 21)]
    # default capacity (64 later tokens): the store grows mid-conversation, as in a chat nobody sized
    cache = ShadowKVCache(config=config, num_layers=model.config.num_hidden_layers)
    stored = []

    def after_turn(turn, ids):
        state = cache.layers[0].state
        stored.append((state.chunks[0] * CHUNK, ids.shape[1]))

    kwargs = dict(eos_token_id=None, min_new_tokens=REPLY, pad_token_id=0, output_logits=True)
    want = converse(dense, prompt, turns, DynamicCache(), REPLY, REPLY, **kwargs)
    got = converse(model, prompt, turns, cache, REPLY, REPLY, after_turn=after_turn, **kwargs)

    assert torch.equal(got.ids, want.ids), (got.ids, want.ids)
    for turn, (g_steps, w_steps) in enumerate(zip(got.logits, want.logits)):
        for step, (g_, w) in enumerate(zip(g_steps, w_steps, strict=True)):
            assert_close(g_, w, atol=2e-4, rtol=1e-4, what=f"turn {turn} step {step} logits")
    tokens_stored = [s for s, _ in stored]
    assert all(b > a for a, b in zip(tokens_stored[1:], tokens_stored[2:])), f"every later turn folds: {stored}"
    cached, window = cache.get_seq_length(), config.fold_window
    assert tokens_stored[-1] >= cached - window, f"all but the fold window is folded: {stored}, {cached} cached"
    state = cache.layers[0].state
    tail_slots = state.k_buf.shape[2] - state.tail_start
    later = cached - prompt.shape[1]
    assert tail_slots <= 2 * (window + max(t.shape[1] for t in turns) + 1) < later, (tail_slots, later)


def test_turn_text_continues_the_chat_template(tokenizer):
    """Prompt + reply + turn text is what the template renders for the whole conversation."""
    whole = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Doc."}, {"role": "assistant", "content": "Noted."},
         {"role": "user", "content": "More."}], tokenize=False, add_generation_prompt=True)
    assert format_prompt(tokenizer, "Doc.", "") + "Noted." + turn_text(tokenizer, "More.") == whole


def test_recall_samples_are_seeded_and_the_answer_sits_in_an_early_turn(tokenizer):
    sizes = dict(doc_length=512, turns=6, turn_length=128)
    sample = make_multiturn_sample(tokenizer, index=1, seed=3, **sizes)
    assert make_multiturn_sample(tokenizer, index=1, seed=3, **sizes) == sample
    assert make_multiturn_sample(tokenizer, index=2, seed=3, **sizes).turns != sample.turns
    assert make_multiturn_sample(tokenizer, index=1, seed=4, **sizes).turns != sample.turns

    (value,) = sample.references
    key = sample.facts[sample.query_turn][0]
    assert sample.query_turn < 6 // 2, "asked about a turn from the first half"
    holding = [i for i, text in enumerate(sample.turns) if value in text]
    assert holding == [sample.query_turn] and value not in sample.prompt
    assert key in sample.turns[-1] and sample.turns[-1].endswith(sample.answer_prefix)
    assert len({k for k, _ in sample.facts}) == 6, "distinct keys: the question is unambiguous"
    assert 400 < sample.doc_tokens <= 512
    assert all(80 < n <= 128 for n in sample.turn_tokens[:-1]), sample.turn_tokens  # whole sentences


def test_a_reply_ending_in_eos_hands_it_to_the_turn_text():
    """The eos that ended a reply was never cached: the next turn (which closes the reply itself,
    as the chat template does) replaces it, and ShadowKV still follows dense."""
    dense, model = tiny_pair("llama", seed=22, peaked=True)
    config = shadowkv_fx.ShadowKVConfig(sparse_budget=4096, rank=full_rank(model), chunk_size=CHUNK,
                                        local_chunks=LOCAL, outlier_chunks=OUTLIERS, fold_chunks=1)
    shadowkv_fx.optimize(model, config)
    g = torch.Generator().manual_seed(22)
    prompt = torch.randint(3, 96, (1, 30), generator=g)
    turns = [torch.randint(3, 96, (1, 9), generator=g) for _ in range(2)]
    first = converse(dense, prompt, [], DynamicCache(), REPLY, 1, pad_token_id=0).replies[0][0, 0].item()
    kwargs = dict(eos_token_id=first, pad_token_id=0, output_logits=True)
    want = converse(dense, prompt, turns, DynamicCache(), REPLY, REPLY, **kwargs)
    cache = ShadowKVCache(model.config.num_hidden_layers, config)
    got = converse(model, prompt, turns, cache, REPLY, REPLY, **kwargs)
    assert want.replies[0].tolist() == [[first]], "the first reply is the eos alone"
    assert torch.equal(want.ids[:, :prompt.shape[1] + turns[0].shape[1]], torch.cat([prompt, turns[0]], 1))
    assert torch.equal(got.ids, want.ids)
    for turn, (g_steps, w_steps) in enumerate(zip(got.logits, want.logits, strict=True)):
        for step, (g_, w) in enumerate(zip(g_steps, w_steps, strict=True)):
            assert_close(g_, w, atol=2e-4, rtol=1e-4, what=f"turn {turn} step {step} logits")
