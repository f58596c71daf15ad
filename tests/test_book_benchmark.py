"""benchmarks/book.py: its arguments (one seed or several), and that its two sides compute the same training
(the whole benchmark is the suite's, minutes long)."""

import argparse

import pytest

from benchmarks.book import seed_list


def test_one_seed_or_several_comma_separated():
    assert seed_list("123") == [123]
    assert seed_list("123,124,125") == [123, 124, 125]


@pytest.mark.parametrize(("text", "message"), [("12a", "seeds are integers, comma-separated"),
                                               ("123,,124", "seeds are integers, comma-separated"),
                                               ("123,123", "each seed once")])
def test_a_seed_that_is_not_an_integer_or_repeats_is_refused_naming_the_value(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message) as error:
        seed_list(text)
    assert repr(text) in str(error.value)


def test_with_dropout_off_the_trainer_takes_the_books_training_steps(tmp_path):
    """What benchmarks.book compares computes the same training: from the book's starting weights, over the
    same batches, the pipeline's Trainer (the fused head and loss, SDPA, fused AdamW) reports the losses
    the book's `train_model_simple` computes, step for step, and ends at its weights. Dropout is off, its
    masks being another generator's (llm/dropout.py), and so is weight decay, which the book applies to
    every parameter and the trainer to matrices only (recipes/book-ch05.yaml lists both differences)."""
    import torch

    from benchmarks import book_ch05 as book
    from benchmarks.book_curves import FixedOrder
    from llm.config import TrainConfig
    from llm.model import GPT, model_config
    from llm.tracking import MemoryTracker
    from llm.train import Trainer

    vocab, T, steps = 1000, 32, 20
    shape = {"vocab_size": vocab, "context_length": T, "emb_dim": 64, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0}
    torch.manual_seed(123)
    reference = book.GPTModel({**book.GPT_CONFIG_124M, **shape})
    torch.manual_seed(123)
    ours = GPT(model_config("gpt2-book", vocab_size=vocab, context_length=T, n_embd=64, n_head=2, n_layer=2,
                            dropout=0.0))
    text = torch.randint(vocab, (3, 2, T + 1))
    batches = [(window[:, :-1], window[:, 1:]) for window in text]
    train, val = [batches[step % 2] for step in range(steps)], batches[2:]  # two batches, as epochs

    optimizer = torch.optim.AdamW(reference.parameters(), lr=book.LEARNING_RATE, weight_decay=0.0)
    book_losses = []
    for x, y in train:  # train_model_simple's step
        optimizer.zero_grad()
        loss = book.calc_loss_batch(x, y, reference, torch.device("cpu"))
        loss.backward()
        optimizer.step()
        book_losses.append(loss.item())
    with torch.no_grad():
        book_val = book.calc_loss_batch(*val[0], reference.eval(), torch.device("cpu")).item()

    config = TrainConfig(seed=123, device="cpu", precision="fp32", batch_size=2, global_batch_size=2,
                         max_steps=steps, lr=book.LEARNING_RATE, min_lr=book.LEARNING_RATE, warmup_steps=0,
                         weight_decay=0.0, beta1=0.9, beta2=0.999, grad_clip=0.0, log_interval=1,
                         eval_interval=steps, eval_batches=1, sample_interval=0, checkpoint_interval=steps)
    tracker = MemoryTracker()
    result = Trainer(ours, FixedOrder(train), val, config, tmp_path, settings={}, tracker=tracker).fit()

    assert [loss for _, loss in tracker.series("train_loss")] == pytest.approx(book_losses, rel=1e-5)
    assert book_losses[-1] < book_losses[0] - 0.5  # it learns the two batches
    assert tracker.series("val_loss")[-1] == (steps, pytest.approx(book_val, rel=1e-5))
    trained = result.model.state_dict()
    torch.testing.assert_close(trained["lm_head.weight"], reference.out_head.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(trained["wte.weight"], reference.tok_emb.weight, rtol=1e-4, atol=1e-6)
    for i, block in enumerate(reference.trf_blocks):
        qkv = torch.cat([block.att.W_query.weight, block.att.W_key.weight, block.att.W_value.weight])
        torch.testing.assert_close(trained[f"h.{i}.attn.c_attn.weight"], qkv, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(trained[f"h.{i}.mlp.c_proj.weight"], block.ff.layers[2].weight, rtol=1e-4,
                                   atol=1e-6)


def test_the_curves_benchmark_runs_both_sides_from_one_start_over_one_order(tmp_path):
    """benchmarks.book_curves at a tiny shape, dropout on: the sides' curves differ only by their draws."""
    import torch

    from benchmarks.book import RECIPE
    from benchmarks.book_curves import EVAL_EVERY, book_curve, epoch_order, our_curve
    from llm.config import load_params

    shape, steps = {"n_layer": 1, "n_head": 2, "n_embd": 32}, 2 * EVAL_EVERY
    text = torch.randint(50257, (7, 257))
    windows = [(window[:-1], window[1:]) for window in text[:6]]
    batches = epoch_order(windows, steps, seed=1)
    assert len(batches) == steps and all(x.shape == (2, 256) for x, _ in batches)
    assert [b[0].tolist() for b in batches[:3]] != [b[0].tolist() for b in epoch_order(windows, steps, seed=2)[:3]]
    val = (text[6:, :-1], text[6:, 1:])
    theirs = book_curve(shape, batches, val, seed=1)
    ours = our_curve(load_params(RECIPE), shape, batches, val, 1, "fp32", tmp_path)
    assert len(theirs) == len(ours) == 2
    assert ours == pytest.approx(theirs, abs=1.5e-3)  # from another seed's start, 4e-3 apart
