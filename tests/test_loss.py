"""The fused, chunked head + cross-entropy equals the plain one, values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

import llm.loss
from llm.loss import IGNORE_INDEX, linear_cross_entropy, logsumexp_


def plain(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 64, 1000])
def test_matches_plain_cross_entropy_with_gradients(chunk_rows):
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    targets[[3, 17, 40]] = IGNORE_INDEX
    expected = plain(hidden, weight, targets)
    expected_grads = torch.autograd.grad(expected * 3.0, (hidden, weight))
    actual = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    actual_grads = torch.autograd.grad(actual * 3.0, (hidden, weight))
    torch.testing.assert_close(actual, expected)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_compiled_path_matches_plain_cross_entropy_with_gradients(reduction):
    # Under torch.compile the loss takes its own branch (one chunk, pointwise only); "aot_eager" traces
    # it as Inductor would, without generating code.
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    targets[[0, 9, 31]] = IGNORE_INDEX
    weights = torch.randn(40)
    expected = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    compiled = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)
    actual = compiled(hidden, weight, targets, reduction=reduction)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad((actual * weights).sum(), (hidden, weight)),
                    torch.autograd.grad((expected * weights).sum(), (hidden, weight))):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_losses_whose_probability_underflows_are_exact_and_ignored_ones_stay_zero(chunk_rows):
    # Logits this far apart put most targets' softmax probability below fp32's smallest normal number:
    # their loss (hundreds) comes from log-sum-exp, not from -log of that probability; an ignored row's
    # probability underflows too, and its loss is still 0, not inf * 0.
    hidden = (torch.randn(30, 16) * 100).requires_grad_()
    weight = torch.randn(200, 16, requires_grad=True)
    targets = torch.randint(0, 200, (30,))
    targets[[2, 11]] = IGNORE_INDEX
    expected = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction="none")
    assert (expected > 200).sum() > 10
    actual = linear_cross_entropy(hidden, weight, targets, chunk_rows, reduction="none")
    torch.testing.assert_close(actual, expected)
    assert actual[[2, 11]].tolist() == [0.0, 0.0]
    for a, e in zip(torch.autograd.grad(actual.sum(), (hidden, weight)),
                    torch.autograd.grad(expected.sum(), (hidden, weight))):
        torch.testing.assert_close(a, e)


def test_without_gradients_gives_the_same_loss_and_all_ignored_gives_zero():
    hidden, weight = torch.randn(2, 5, 8), torch.randn(40, 8)
    targets = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk_rows=3),
                                   plain(hidden.reshape(10, 8), weight, targets.reshape(10)))
        assert linear_cross_entropy(hidden, weight, torch.full((2, 5), IGNORE_INDEX)).item() == 0.0


def test_under_bf16_autocast_it_stays_close_to_the_plain_path():
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = (torch.randn(500, 32) * 0.1).requires_grad_()
    targets = torch.randint(0, 500, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(hidden, weight, targets)
        reference = F.cross_entropy(hidden @ weight.T, targets)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference.float(), atol=2e-2, rtol=1e-2)
    fused.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32



def test_in_bf16_the_gradient_is_the_fp32_softmax_rounded_and_a_confident_rows_is_kept():
    """The bf16 logits become the gradient in place: ATen's softmax computes each row in fp32 and rounds
    once, so the gradient of a non-target logit is exactly the fp32 softmax's, rounded to bf16. The target's,
    p - 1, comes from the other probabilities, so a confident row keeps it where 1 - p from a bf16 p would be
    0; the loss is within 2**-8 of the exact loss of those logits, and relatively so for a confident row.
    With the head's weight the identity (V = C), the logits are the hidden states and the gradient of the
    hidden states is the logits' (64 rows: the mean's 1/64 scales it exactly)."""
    n = vocab = 64
    logits = torch.randn(n, vocab) * 3
    targets = torch.randint(0, vocab, (n,))
    margins = torch.linspace(4, 14, 16)  # rows 0-15 confident: p from about 0.8 to 1 - 5e-5
    logits[torch.arange(16), targets[:16]] = logits[:16].amax(dim=1) + margins
    logits = logits.bfloat16().float()  # what the head computes: bf16 logits
    hidden = logits.clone().requires_grad_()
    weight = torch.eye(vocab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = linear_cross_entropy(hidden, weight, targets, reduction="none")
        (grad,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets), hidden)
    grad = grad * n
    exact = F.cross_entropy(logits.double(), targets, reduction="none")
    others = torch.ones_like(grad, dtype=torch.bool)
    others[torch.arange(n), targets] = False
    assert torch.equal(grad[others], torch.softmax(logits, 1).bfloat16().float()[others])
    target_grad = grad[torch.arange(n), targets].double()
    expected = torch.softmax(logits.double(), 1)[torch.arange(n), targets] - 1
    assert ((target_grad - expected).abs() <= 2**-7 * expected.abs()).all()
    assert (target_grad[:16] < 0).all()  # 1 - p from a bf16 p would be 0 here
    assert ((rows.double() - exact).abs() <= -math.log1p(-2**-8)).all()
    assert ((rows[:16].double() - exact[:16]).abs() <= 2**-7 * exact[:16]).all()


@pytest.mark.parametrize(("autocast", "direct_rows"), [(False, 1024), (True, 1024), (True, 0)])
def test_a_head_tied_to_the_token_embedding_gets_the_sum_of_both_gradients(monkeypatch, autocast, direct_rows):
    # fp32 computes the head's weight gradient in the weight's own layout; bf16 does too up to
    # DIRECT_GRAD_WEIGHT_ROWS rows (40 here), and above them transposes and casts it. Either way autograd
    # adds the embedding's gradient to it, as it does to the plain path's.
    monkeypatch.setattr(llm.loss, "DIRECT_GRAD_WEIGHT_ROWS", direct_rows)
    weight = (torch.randn(300, 16) * 0.1).requires_grad_()
    ids, targets = torch.randint(0, 300, (2, 20)), torch.randint(0, 300, (2, 20))
    targets[1, :5] = IGNORE_INDEX
    mix = torch.randn(16, 16)
    grads = []
    for loss_fn in (linear_cross_entropy, lambda h, w, t: plain(h.reshape(-1, 16), w, t.reshape(-1))):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = torch.tanh(F.embedding(ids, weight) @ mix)
            loss = loss_fn(hidden, weight, targets)
        grads.append(torch.autograd.grad(loss, weight)[0])
    assert grads[0].dtype == torch.float32 and grads[0].is_contiguous()
    torch.testing.assert_close(grads[0], grads[1], **({"atol": 2e-3, "rtol": 2e-2} if autocast else {}))


def test_steps_reuse_the_gradient_buffer_and_overlapping_graphs_stay_correct():
    hidden = torch.randn(40, 8, requires_grad=True)
    weight = torch.randn(90, 8, requires_grad=True)
    targets = torch.randint(0, 90, (40,))
    expected = torch.autograd.grad(plain(hidden, weight, targets) + plain(2 * hidden, weight, targets), hidden)[0]
    # Two forwards before their backwards: the second may not take the first's buffer.
    first = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    second = linear_cross_entropy(2 * hidden, weight, targets, chunk_rows=16)
    torch.testing.assert_close(torch.autograd.grad(first + second, hidden)[0], expected)
    # Step after step, the buffer given back by one backward is the one the next forward writes into.
    given_back = []
    for _ in range(2):
        linear_cross_entropy(hidden, weight, targets, chunk_rows=16).backward()
        given_back.append(llm.loss._spare.flat.data_ptr())
    assert given_back[0] == given_back[1]


def test_batches_of_varying_length_share_one_gradient_buffer_the_largest(monkeypatch):
    # Fine-tuning batches are padded to their own lengths: N changes every step. One buffer, grown to
    # the largest N, serves them all; a smaller N still gets exact gradients from its front.
    monkeypatch.setattr(llm.loss, "_spare", llm.loss._Spare())
    weight = torch.randn(90, 8, requires_grad=True)
    kept = []  # (address, elements) of the buffer given back after each step
    for rows in (30, 50, 20, 50, 35):
        hidden = torch.randn(rows, 8, requires_grad=True)
        targets = torch.randint(0, 90, (rows,))
        (grad,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets, chunk_rows=16), hidden)
        torch.testing.assert_close(grad, torch.autograd.grad(plain(hidden, weight, targets), hidden)[0])
        kept.append((llm.loss._spare.flat.data_ptr(), llm.loss._spare.flat.numel()))
    assert kept[0][1] == 30 * 90
    assert kept[1][1] == 50 * 90 and kept[1:] == [kept[1]] * 4


def test_a_retained_graph_whose_buffer_was_reused_refuses_a_second_backward():
    hidden = torch.randn(40, 8, requires_grad=True)
    weight, targets = torch.randn(90, 8), torch.randint(0, 90, (40,))
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    linear_cross_entropy(hidden, weight, targets)  # takes and rewrites the buffer `loss` still holds
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_per_position_losses_match_plain_cross_entropy_with_gradients_weighted_per_row(chunk_rows):
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (3, 10))
    targets[0, :4] = IGNORE_INDEX
    weights = torch.randn(3, 10)  # a different gradient for each position, as a per-sequence sum gives
    expected = F.cross_entropy((hidden @ weight.T).transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                               reduction="none")
    expected_grads = torch.autograd.grad((expected * weights).sum(), (hidden, weight))
    actual = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows, reduction="none")
    actual_grads = torch.autograd.grad((actual * weights).sum(), (hidden, weight))
    assert actual.shape == (3, 10) and (actual[0, :4] == 0).all()
    torch.testing.assert_close(actual, expected)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk_rows, reduction="none"),
                                   expected)


def test_an_unknown_reduction_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="reduction must be one of mean, none, got 'sum'"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), reduction="sum")


@pytest.mark.parametrize("rows", [1, 2, 8, 9, 17, 130])
def test_the_in_place_logsumexp_is_torchs_to_the_bit(rows):
    logits = torch.randn(rows, 50257) * 4
    logits[0, 3] = float("inf")
    if rows > 2:
        logits[1] = float("-inf")  # a row with nothing possible
        logits[2, 7] = float("nan")
    expected = torch.logsumexp(logits, dim=1)

    computed = logsumexp_(logits.clone())

    assert torch.equal(computed.nan_to_num(), expected.nan_to_num())
    assert torch.equal(computed.isnan(), expected.isnan())


@pytest.mark.parametrize("compiled", [False, True])
def test_a_bf16_head_multiplied_by_vocabulary_blocks_gives_the_one_products_loss_and_gradients(monkeypatch,
                                                                                                compiled):
    # 300 tokens in blocks of 64: four whole blocks and a short one; eager, into the gradient's buffer,
    # and under torch.compile, concatenated.
    hidden = torch.randn(2, 24, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.1).requires_grad_()
    targets = torch.randint(0, 300, (2, 24))
    targets[0, :3] = IGNORE_INDEX
    loss_fn = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True) if compiled \
        else linear_cross_entropy
    results = []
    for block in (0, 64):
        monkeypatch.setattr(llm.loss, "VOCAB_BLOCK", block)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(hidden, weight, targets)
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
        torch._dynamo.reset()
    for one_product, blocked in zip(*results):  # equal here; a CPU's kernels may sum in another order
        torch.testing.assert_close(blocked, one_product, atol=1e-4, rtol=1e-3)


def test_head_logits_by_blocks_are_the_one_products_into_the_buffer_given(monkeypatch):
    monkeypatch.setattr(llm.loss, "VOCAB_BLOCK", 64)
    h, w = torch.randn(10, 32, dtype=torch.bfloat16), torch.randn(300, 32, dtype=torch.bfloat16)
    out = torch.empty(10, 300, dtype=torch.bfloat16)
    assert llm.loss.head_logits(h, w, out=out) is out
    torch.testing.assert_close(out, h @ w.T)  # to bf16 rounding
    torch.testing.assert_close(llm.loss.head_logits(h, w), h @ w.T)
