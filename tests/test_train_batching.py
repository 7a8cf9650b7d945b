"""Packing, loss and gradient accumulation: exact equalities on a tiny random Phi-3 (fp32, CPU)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Phi3Config, Phi3ForCausalLM

from phi3local.config import Recipe
from phi3local.train.batching import MicroBatch, collate, pack_rows, plan_epoch
from phi3local.train.distributed import World
from phi3local.train.loss import chunked_cross_entropy
from phi3local.train.recipe import forward_loss, optimizer_step
from phi3local.train.tasks import task_for

VOCAB = 97


def tiny_model(sliding_window=None, layers=2, attn="sdpa"):
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                        sliding_window=sliding_window, pad_token_id=0, attn_implementation=attn)
    return Phi3ForCausalLM(config).eval()


def documents(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        length = int(torch.randint(5, 30, (1,), generator=g))
        toks = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        lab = [-100] * (length // 3) + toks[length // 3 :]  # a masked "prompt" then a trained "answer"
        ids.append(toks)
        labels.append(lab)
    return ids, labels


def recipe_for(task="causal_lm", chunk=7):
    recipe = Recipe(task=task)
    recipe.training.loss_chunk_size = chunk
    return recipe


def test_pack_rows_first_fit_never_exceeds_capacity():
    lengths = [5, 9, 3, 7, 2, 10, 1]
    rows = pack_rows(lengths, list(range(len(lengths))), 10)
    assert sorted(d for r in rows for d in r) == list(range(len(lengths)))
    assert all(sum(lengths[d] for d in r) <= 10 for r in rows)
    assert rows == [[0, 2, 4], [1, 6], [3], [5]]


def test_plan_is_deterministic_and_covers_every_document():
    lengths = [3, 8, 5, 12, 7, 2, 9, 4, 6, 1]
    for packing in (True, False):
        a = plan_epoch(lengths, 16, 2, packing, seed=3, epoch=1)
        b = plan_epoch(lengths, 16, 2, packing, seed=3, epoch=1)
        c = plan_epoch(lengths, 16, 2, packing, seed=3, epoch=2)
        assert a == b and a != c
        assert sorted(d for batch in a for row in batch for d in row) == list(range(len(lengths)))


def test_packed_batch_gives_the_same_per_document_hidden_states_and_loss():
    model = tiny_model()
    ids, labels = documents()
    rows = pack_rows([len(x) for x in ids], list(range(len(ids))), 64)
    assert any(len(r) > 1 for r in rows), "the test needs rows holding several documents"
    packed = collate(rows, ids, labels, pad_id=0)
    with torch.no_grad():
        # use_cache=False matters: with a KV cache transformers does not derive the packed mask.
        hidden = model.model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                             use_cache=False).last_hidden_state
        loss_packed, _, _ = forward_loss(recipe_for(), model, packed)
        loss_single = 0.0
        for b, row in enumerate(rows):
            at = 0
            for d in row:
                alone = model.model(input_ids=torch.tensor([ids[d]])).last_hidden_state[0]
                n = len(ids[d])
                assert (hidden[b, at : at + n] - alone).abs().max() < 1e-5
                one = collate([[d]], ids, labels, pad_id=0)
                loss_single += float(forward_loss(recipe_for(), model, one)[0])
                at += n
    assert abs(float(loss_packed) - loss_single) < 1e-4 * max(1.0, loss_single)


def test_chunked_loss_equals_full_cross_entropy_and_its_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (3, 11))
    targets[0, :4] = -100
    loss_sum, correct = chunked_cross_entropy(hidden, targets, head, chunk_size=5, count_correct=True)
    full = torch.nn.functional.cross_entropy(head(hidden).reshape(-1, 50), targets.reshape(-1),
                                             reduction="sum", ignore_index=-100)
    assert torch.allclose(loss_sum, full, rtol=1e-6)
    (g_chunk,) = torch.autograd.grad(loss_sum, hidden)
    (g_full,) = torch.autograd.grad(full, hidden)
    assert torch.allclose(g_chunk, g_full, atol=1e-6)
    keep = targets != -100
    assert int(correct) == int((head(hidden).argmax(-1) == targets)[keep].sum())


def _lora_step(micro_batches_rows, ids, labels):
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["qkv_proj", "o_proj"],
                                                    init_lora_weights=False, lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    recipe = recipe_for()
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    batches = [collate(rows, ids, labels, pad_id=0) for rows in micro_batches_rows]
    loss, _ = optimizer_step(task_for(recipe), model, batches, optimizer, scheduler, World(), device=torch.device("cpu"),
                             max_grad_norm=0.0, chunk_size=recipe.training.loss_chunk_size)
    return float(loss), [p.detach() - b for p, b in zip(params, before)]


def test_accumulating_four_micro_batches_equals_one_batch_of_four():
    ids, labels = documents(4, seed=5)
    loss_one, delta_one = _lora_step([[[0], [1], [2], [3]]], ids, labels)
    loss_acc, delta_acc = _lora_step([[[0]], [[1]], [[2]], [[3]]], ids, labels)
    assert abs(loss_one - loss_acc) < 1e-5
    for a, b in zip(delta_one, delta_acc):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # Normalising by micro-batch count instead (the common bug) would differ: documents have unequal lengths.
    assert len({sum(t != -100 for t in lab) for lab in labels}) > 1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sliding_window_masks_tokens_beyond_the_window(attn):
    window = 4
    model = tiny_model(sliding_window=window, layers=1, attn=attn)
    x = torch.randint(1, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    changed = (a - b).abs().amax(-1)[0]
    # Query q sees keys q-window+1 .. q: token 0 only reaches positions 0..window-1.
    assert (changed[:window] > 1e-6).all()
    assert (changed[window:] < 1e-6).all()


def test_sliding_window_sdpa_equals_eager_with_packing():
    ids, labels = documents(5, seed=2)
    rows = pack_rows([len(x) for x in ids], list(range(len(ids))), 80)
    batch = collate(rows, ids, labels, pad_id=0)
    outs = []
    for attn in ("sdpa", "eager"):
        model = tiny_model(sliding_window=6, attn=attn)
        with torch.no_grad():
            outs.append(model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                              use_cache=False).logits)
    assert (outs[0] - outs[1]).abs().max() < 1e-5


# ------------------------------------------------------------------------------------- LongRoPE (switch at 16)

SWITCH = 16


def longrope_model():
    from phi3local.model.family import longrope_factors

    torch.manual_seed(0)
    short, long = longrope_factors(4)  # head_dim 8: 4 rotary frequencies
    config = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4 * SWITCH,
                        original_max_position_embeddings=SWITCH, pad_token_id=0,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                                         "long_factor": long, "original_max_position_embeddings": SWITCH})
    model = Phi3ForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than the default init, so the factor set shows in the loss
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def mixed_documents():
    """Short documents (<= SWITCH tokens) and two long ones (> SWITCH), all trained after a short prompt."""
    g = torch.Generator().manual_seed(2)
    lengths = [15, 5, 12, 9, 27, 14, 7, 22, 16, 11]
    ids = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
    labels = [[-100] * 2 + t[2:] for t in ids]
    return ids, labels


@torch.no_grad()
def doc_losses(model, rows, ids, labels, position_limit=None, pad_to_multiple_of=1) -> dict[int, float]:
    """Each document's summed token loss inside the collated batch of rows."""
    batch = collate(rows, ids, labels, pad_id=0, position_limit=position_limit, pad_to_multiple_of=pad_to_multiple_of)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none",
                                                   ignore_index=-100)
    out = {}
    for b, row in enumerate(rows):
        at = 0
        for d in row:
            out[d] = float(token_loss[b, at : at + len(ids[d])].sum())
            at += len(ids[d])
    return out


def test_longrope_plan_keeps_long_documents_apart():
    ids, _ = mixed_documents()
    lengths = [len(x) for x in ids]
    for packing in (True, False):
        plan = plan_epoch(lengths, 48, 3, packing, seed=3, epoch=1, long_from=SWITCH)
        assert plan == plan_epoch(lengths, 48, 3, packing, seed=3, epoch=1, long_from=SWITCH)
        assert sorted(d for batch in plan for row in batch for d in row) == list(range(len(ids)))
        for batch in plan:
            docs = [d for row in batch for d in row]
            long = [lengths[d] > SWITCH for d in docs]
            assert all(long) or not any(long), (batch, [lengths[d] for d in docs])
            if any(long):
                assert all(len(row) == 1 for row in batch)  # never packed with another document
    # Without a document past the switch the plan is the plain one, so resuming an old run is unchanged.
    short = [n for n in lengths if n <= SWITCH]
    assert plan_epoch(short, 48, 3, True, 3, 1, long_from=SWITCH) == plan_epoch(short, 48, 3, True, 3, 1)


def test_longrope_every_document_loss_in_packed_batches_equals_its_loss_alone():
    model = longrope_model()
    ids, labels = mixed_documents()
    lengths = [len(x) for x in ids]
    alone = {d: doc_losses(model, [[d]], ids, labels)[d] for d in range(len(ids))}

    planned: dict[int, float] = {}
    plan = plan_epoch(lengths, 48, 3, True, seed=0, epoch=0, long_from=SWITCH)
    assert any(len(row) > 1 for batch in plan for row in batch), "the test needs packed rows"
    for rows in plan:
        planned.update(doc_losses(model, rows, ids, labels, position_limit=SWITCH))
    for d in range(len(ids)):
        assert abs(planned[d] - alone[d]) <= 1e-5 * max(1.0, alone[d]), (d, lengths[d], planned[d], alone[d])

    # The plain plan puts long and short documents in one batch: short ones then train on the long factors.
    plain: dict[int, float] = {}
    for rows in plan_epoch(lengths, 48, 3, True, seed=0, epoch=0):
        plain.update(doc_losses(model, rows, ids, labels))
    worst = max(abs(plain[d] - alone[d]) / alone[d] for d in range(len(ids)) if lengths[d] <= SWITCH)
    assert worst > 1e-3


def test_longrope_padding_never_moves_a_short_batch_past_the_switch():
    model = longrope_model()
    ids, labels = mixed_documents()
    # 15 + 14 tokens, then a document of exactly SWITCH tokens (still short) and 13 pads up to position 28.
    rows = [[0, 5], [8]]
    alone = doc_losses(model, [[8]], ids, labels)[8]
    batch = collate(rows, ids, labels, pad_id=0, position_limit=SWITCH)
    assert int(batch.position_ids.max()) < SWITCH
    assert abs(doc_losses(model, rows, ids, labels, position_limit=SWITCH)[8] - alone) <= 1e-5 * alone
    assert abs(doc_losses(model, rows, ids, labels)[8] - alone) > 1e-3 * alone  # continued pads: long factors


def test_longrope_long_document_trains_on_the_long_factors():
    model = longrope_model()
    rotary = model.model.rotary_emb
    ids, labels = mixed_documents()
    long_doc = max(range(len(ids)), key=lambda d: len(ids[d]))
    doc_losses(model, [[1], [2]], ids, labels, position_limit=SWITCH)
    assert torch.equal(rotary.inv_freq, rotary.original_inv_freq)
    doc_losses(model, [[long_doc]], ids, labels, position_limit=SWITCH)
    assert not torch.equal(rotary.inv_freq, rotary.original_inv_freq)
    assert torch.equal(rotary.inv_freq, rotary.long_inv_freq)


def test_flash_attention_gets_packed_documents_as_one_row_with_every_boundary():
    """transformers finds packed documents for flash-attn's varlen kernel only in a single row (its
    `_is_packed_sequence`), so a [B, L] packed batch is flattened; the flat row keeps every loss."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    from phi3local.train.recipe import rows_for_attention

    model = tiny_model()
    ids, labels = documents(n=9)
    rows = pack_rows([len(x) for x in ids], list(range(len(ids))), 64)
    packed = collate(rows, ids, labels, pad_id=0)
    assert packed.input_ids.shape[0] > 1 and any(len(r) > 1 for r in rows)
    assert not _is_packed_sequence(packed.position_ids, packed.input_ids.shape[0])  # what went wrong before
    assert rows_for_attention(packed, "sdpa") == (packed.input_ids, packed.position_ids, packed.targets)

    flat_ids, flat_pos, flat_targets = rows_for_attention(packed, "flash_attention_2")
    assert flat_ids.shape == (1, packed.padded_tokens) and _is_packed_sequence(flat_pos, 1)
    # The varlen kernel's segments: one per document; a row's pads ride with its last document.
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(flat_pos)
    width, starts = packed.input_ids.shape[1], []
    for b, row in enumerate(rows):
        at = b * width
        for d in row:
            starts.append(at)
            at += len(ids[d])
    assert cu_seqlens.tolist() == starts + [packed.padded_tokens]

    # The same loss from the flat row (SDPA finds the same boundaries from the same position_ids).
    flat = MicroBatch(flat_ids, flat_pos, flat_targets, None, packed.doc_ids, packed.trained_tokens,
                      packed.real_tokens, packed.padded_tokens)
    with torch.no_grad():
        loss_rows = float(forward_loss(recipe_for(), model, packed)[0])
        loss_flat = float(forward_loss(recipe_for(), model, flat)[0])
        loss_alone = sum(float(forward_loss(recipe_for(), model, collate([[d]], ids, labels, pad_id=0))[0])
                         for d in range(len(ids)))
    assert abs(loss_flat - loss_alone) < 1e-4 * loss_alone and abs(loss_rows - loss_alone) < 1e-4 * loss_alone


def classifier():
    from transformers import Phi3ForSequenceClassification

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0,
                        num_labels=3)
    return Phi3ForSequenceClassification(config).eval()


@torch.no_grad()
def test_widths_rounded_to_a_multiple_keep_every_document_loss():
    model = tiny_model()
    ids, labels = documents(n=8, seed=4)
    lengths = [len(x) for x in ids]
    for packing in (True, False):
        for rows in plan_epoch(lengths, 64, 3, packing, seed=0, epoch=0):
            exact = collate(rows, ids, labels, pad_id=0)
            rounded = collate(rows, ids, labels, pad_id=0, pad_to_multiple_of=16)
            assert rounded.input_ids.shape[1] % 16 == 0 and rounded.input_ids.shape[1] >= exact.input_ids.shape[1]
            assert (rounded.trained_tokens, rounded.real_tokens) == (exact.trained_tokens, exact.real_tokens)
            mine, theirs = doc_losses(model, rows, ids, labels), doc_losses(model, rows, ids, labels,
                                                                            pad_to_multiple_of=16)
            assert all(abs(mine[d] - theirs[d]) <= 1e-6 * max(1.0, mine[d]) for d in mine), (rows, mine, theirs)
            recipe = recipe_for()
            assert abs(float(forward_loss(recipe, model, exact)[0]) - float(forward_loss(recipe, model, rounded)[0])) <= 1e-5
    # Classification reads each row's last real token: the extra pads change no logit.
    cls = classifier()
    recipe = recipe_for(task="classification")
    rows = [[0], [1], [2]]
    exact, rounded = (collate(rows, ids, labels, pad_id=0, class_labels=[0, 1, 2, 0, 1, 2, 0, 1], pad_to_multiple_of=m)
                      for m in (1, 16))
    assert rounded.input_ids.shape[1] == 32 > exact.input_ids.shape[1]
    assert torch.allclose(forward_loss(recipe, cls, exact)[2], forward_loss(recipe, cls, rounded)[2], atol=1e-6, rtol=0)


def test_rounded_width_stops_at_the_model_positions_and_longrope_switch():
    from phi3local.train.batching import padded_width

    assert [padded_width(w, 64) for w in (1, 64, 65, 200)] == [64, 64, 128, 256]
    assert padded_width(200, 64, max_width=240) == 240  # never past the model's positions...
    assert padded_width(250, 64, max_width=240) == 250  # ...but a longer row keeps its own width
    ids, labels = mixed_documents()
    batch = collate([[0, 5], [8]], ids, labels, pad_id=0, position_limit=SWITCH, pad_to_multiple_of=64,
                    max_width=4 * SWITCH)
    assert batch.input_ids.shape[1] == 4 * SWITCH and int(batch.position_ids.max()) < SWITCH


def test_a_longrope_classifier_keeps_its_logits_when_rounding_passes_the_switch():
    """Classification runs on collate's positions: pads rounded past a LongRoPE switch (widths 15 -> 24 with a
    switch at 16) wrap below it instead of moving the whole batch onto the long factors."""
    from transformers import Phi3ForSequenceClassification

    causal = longrope_model()
    config = causal.config
    config.num_labels = 3
    torch.manual_seed(0)
    model = Phi3ForSequenceClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    ids, labels = mixed_documents()
    recipe = recipe_for(task="classification")
    logits = {}
    with torch.no_grad():
        for multiple in (1, 12):
            batch = collate([[0], [5]], ids, labels, 0, class_labels=[0] * len(ids), position_limit=SWITCH,
                            pad_to_multiple_of=multiple, max_width=4 * SWITCH)
            logits[batch.input_ids.shape[1]] = forward_loss(recipe, model, batch)[2]
    assert sorted(logits) == [15, 24]
    assert (logits[24] - logits[15]).abs().max() < 1e-5
