"""The book's chapter 5 pretraining run, as the book's code computes it: the reference of benchmarks/book.py.

Source: Sebastian Raschka, "Build a Large Language Model (From Scratch)", code at
https://github.com/rasbt/LLMs-from-scratch (Apache License 2.0, "Copyright (c) Sebastian Raschka"), files
- ch04/01_main-chapter-code/gpt.py (also ch05/01_main-chapter-code/previous_chapters.py): GPTDatasetV1,
  create_dataloader_v1, MultiHeadAttention, LayerNorm, GELU, FeedForward, TransformerBlock, GPTModel,
  generate_text_simple;
- ch05/01_main-chapter-code/gpt_train.py: text_to_token_ids, token_ids_to_text, calc_loss_batch,
  calc_loss_loader, evaluate_model, generate_and_print_sample, train_model_simple, and main's data split;
- ch05/01_main-chapter-code/ch05.ipynb: the run's settings, which differ from gpt_train.py's (lr 4e-4, not
  5e-4; eval_iter 5, not 1): torch.manual_seed(123), GPTModel(GPT_CONFIG_124M) at context 256,
  AdamW(lr=0.0004, weight_decay=0.1), 10 epochs, eval_freq 5, eval_iter 5, "Every effort moves you".

Written anew after those files rather than copied; it keeps their names, their modules in the order they
create their parameters (so torch.manual_seed(123) gives the book's starting weights), and their
arithmetic step for step: separate W_query/W_key/W_value projections without bias, scores masked by a
registered float mask buffer (`triu(ones, 1)`, used as `.bool()`) filled with -inf in place, softmax of
scores / sqrt(head_dim), dropout on the weights, out_proj; LayerNorm with its own scale and shift
(biased variance, eps 1e-5); the tanh GELU written out; dropout 0.1 after the embeddings and after
attention and the feed-forward; an untied out_head without bias; the full (B, T, vocab) logits, then
F.cross_entropy. Data: a 90/10 split of the text by characters, GPT-2 token windows of 256 at stride 256,
batch 2, train shuffled with drop_last, val in order without; training zeroes the gradients, steps AdamW on
every parameter (weight decay on all of them, torch's default betas), evaluates train and val over 5
batches every 5 steps (global_step % 5 == 0, from step 0) and prints a greedy 50-token sample after every
epoch. fp32 throughout, no autocast, no clipping, no schedule.

What differs from the book's files, none of it in what a step computes:
- the project's formatting and type hints; settings are module constants, not dicts passed around;
- `train_model_simple` also returns the time (time.perf_counter()) of each evaluation, and takes the
  print function; `main` takes the text (read by the caller) and the epochs, and returns the model too;
- `create_dataloader_v1` takes the tokenizer, as the notebook's later version does, and always has
  num_workers 0 (the book's default);
- no plotting, no saving, no download (benchmarks/book.py fetches the-verdict through llm.download).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import tiktoken
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

GPT_CONFIG_124M = {
    "vocab_size": 50257,
    "context_length": 256,  # the book's shortened context (GPT-2: 1024)
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}
SEED = 123
LEARNING_RATE, WEIGHT_DECAY = 0.0004, 0.1
BATCH_SIZE, NUM_EPOCHS, TRAIN_RATIO = 2, 10, 0.90
EVAL_FREQ, EVAL_ITER = 5, 5
START_CONTEXT, SAMPLE_TOKENS = "Every effort moves you", 50


# --- chapter 2: the data -----------------------------------------------------------------------------

class GPTDatasetV1(Dataset):
    """Windows of `max_length` tokens every `stride` tokens, each with its next-token targets."""

    def __init__(self, txt: str, tokenizer: tiktoken.Encoding, max_length: int, stride: int):
        token_ids = tokenizer.encode(txt)
        starts = range(0, len(token_ids) - max_length, stride)
        self.input_ids = [torch.tensor(token_ids[i:i + max_length]) for i in starts]
        self.target_ids = [torch.tensor(token_ids[i + 1:i + max_length + 1]) for i in starts]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader_v1(txt: str, tokenizer: tiktoken.Encoding, batch_size: int, max_length: int, stride: int,
                         shuffle: bool, drop_last: bool) -> DataLoader:
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=0)


def book_loaders(text_data: str, tokenizer: tiktoken.Encoding) -> tuple[DataLoader, DataLoader]:
    """gpt_train.py's split and loaders: the first 90% of the characters to train on, the rest to validate."""
    split_idx = int(TRAIN_RATIO * len(text_data))
    context = GPT_CONFIG_124M["context_length"]
    train_loader = create_dataloader_v1(text_data[:split_idx], tokenizer, BATCH_SIZE, context, context,
                                        shuffle=True, drop_last=True)
    val_loader = create_dataloader_v1(text_data[split_idx:], tokenizer, BATCH_SIZE, context, context,
                                      shuffle=False, drop_last=False)
    return train_loader, val_loader


# --- chapters 3 and 4: the model ---------------------------------------------------------------------

class MultiHeadAttention(nn.Module):
    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: Tensor) -> Tensor:
        b, num_tokens, _ = x.shape
        # (b, T, d_out) -> (b, heads, T, head_dim), in the book's order: keys, queries, values
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        attn_scores = queries @ keys.transpose(2, 3)
        attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = self.dropout(torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1))
        context_vec = (attn_weights @ values).transpose(1, 2)
        return self.out_proj(context_vec.contiguous().view(b, num_tokens, self.d_out))


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * ((x - mean) / torch.sqrt(var + self.eps)) + self.shift


class GELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), GELU(),
                                    nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.att = MultiHeadAttention(d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
                                      num_heads=cfg["n_heads"], dropout=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_resid = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_resid(self.att(self.norm1(x)))
        return x + self.drop_resid(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx: Tensor) -> Tensor:
        _, seq_len = in_idx.shape
        x = self.tok_emb(in_idx) + self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))


def generate_text_simple(model: nn.Module, idx: Tensor, max_new_tokens: int, context_size: int) -> Tensor:
    """Greedy decoding, the whole (cropped) context through the model for every new token."""
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])
        idx_next = torch.argmax(logits[:, -1, :], dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


# --- chapter 5: training -----------------------------------------------------------------------------

def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding) -> Tensor:
    return torch.tensor(tokenizer.encode(text)).unsqueeze(0)


def token_ids_to_text(token_ids: Tensor, tokenizer: tiktoken.Encoding) -> str:
    return tokenizer.decode(token_ids.squeeze(0).tolist())


def calc_loss_batch(input_batch: Tensor, target_batch: Tensor, model: nn.Module, device: torch.device) -> Tensor:
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader: DataLoader, model: nn.Module, device: torch.device,
                     num_batches: int | None = None) -> float:
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, device: torch.device,
                   eval_iter: int) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model: GPTModel, tokenizer: tiktoken.Encoding, device: torch.device,
                              start_context: str, log: Callable[[str], None] = print) -> None:
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(model, encoded, SAMPLE_TOKENS, context_size)
    log(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))
    model.train()


@dataclass
class History:
    """What train_model_simple records at each evaluation, and when (time.perf_counter())."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    track_tokens_seen: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # global_step: optimizer steps taken, less one
    times: list[float] = field(default_factory=list)


def train_model_simple(model: GPTModel, train_loader: DataLoader, val_loader: DataLoader,
                       optimizer: torch.optim.Optimizer, device: torch.device, num_epochs: int, eval_freq: int,
                       eval_iter: int, start_context: str, tokenizer: tiktoken.Encoding,
                       log: Callable[[str], None] = print) -> History:
    history = History()
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                history.times.append(time.perf_counter())
                history.train_losses.append(train_loss)
                history.val_losses.append(val_loss)
                history.track_tokens_seen.append(tokens_seen)
                history.steps.append(global_step)
                log(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context, log)
    return history


def seeded_model_and_optimizer(seed: int, device: torch.device) -> tuple[GPTModel, torch.optim.AdamW]:
    """The notebook's training cell up to training: the seed, the model on `device`, its AdamW."""
    torch.manual_seed(seed)
    model = GPTModel(GPT_CONFIG_124M)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    return model, optimizer


def main(train_loader: DataLoader, val_loader: DataLoader, tokenizer: tiktoken.Encoding,
         num_epochs: int = NUM_EPOCHS, log: Callable[[str], None] = print,
         seed: int = SEED) -> tuple[GPTModel, History]:
    """The notebook's training cell: seed, model, optimizer, train_model_simple."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, optimizer = seeded_model_and_optimizer(seed, device)
    history = train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs=num_epochs,
                                 eval_freq=EVAL_FREQ, eval_iter=EVAL_ITER, start_context=START_CONTEXT,
                                 tokenizer=tokenizer, log=log)
    return model, history
