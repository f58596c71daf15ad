"""The MLflow model of an instruction-tuned checkpoint: an MLflow ChatModel, OpenAI-style chat in and out.

`llm.registry.log_gpt_model` logs a checkpoint whose config names a prompt format (`prompt_style`: the
finetune and preference stages' models, registered as gpt-instruct) with this file, models from code like
the prompt-in text generator of llm/pyfunc.py, which stays the model of base GPTs (gpt-base). Serve it and
send it a chat request:

    mlflow models serve -m "models:/gpt-instruct@champion" --env-manager local -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
         -d '{"messages": [{"role": "user", "content": "Name the capital of France."}], "max_tokens": 32,
              "temperature": 0}'

The answer is an OpenAI chat completion (`choices[0].message.content`, `finish_reason`, `usage`; its
`model` is gpt-<the checkpoint's stage>).

Why two models, not one that takes both kinds of request: MLflow's ChatModel fixes the model's interface
to the chat schema (its signature and its request parsing are MLflow's, which is what makes any chat
client work with it), so it cannot also take `{"inputs": {"prompt": [...]}}`; a plain pyfunc that took
both would be a second, hand-made chat interface. So an instruction model now answers chat requests only
(a prompt request gets HTTP 400: MLflow's schema requires 'messages'). A client that wrapped its
instruction in the Alpaca prompt itself now sends the bare instruction as the user message, with
temperature 0, and gets the same greedy answer, ended where the model starts another part of the format;
the README's serving section has the migration. The continuation of a text of
one's own stays the base model's, and `llm.registry.load_logged_gpt` gives any logged model's GPT in
Python. (MLflow 3 deprecates ChatModel for ResponsesAgent, which speaks OpenAI's Responses API, not chat
completions; ChatModel is MLflow's interface for "strict compatibility with the OpenAI ChatCompletion
API", as its docs put it.)

The conversation becomes the prompt of the checkpoint's format (llm.instructions.prompt_text): each user
message is an instruction (with no input), earlier user and assistant messages are earlier turns, written
before the last user message as the model was fine-tuned on one turn. A system message, first if any
(OpenAI's "developer" role reads the same), takes the place of the format's preamble: for Alpaca, its
sentence "Below is an instruction that describes a task. ..."; for Phi-3, which has none, it goes in a
<|system|> block. No system message: the preamble the model was trained with.

An answer ends at end-of-text, at a text of `stop`, or where the model starts another part of the
format (the next "### Instruction:", say: `PromptTemplate.stops`), none of which is in the answer; then
`finish_reason` is "stop", and "length" when it reached `max_tokens` first. `usage` counts the prompt's
tokens and the tokens generated (the one that ended an answer included). Answers are computed in fp32
on the CPU, as the text generator's are; temperature 0 decodes greedily, and then the answer is
exactly `llm.generate.generate`'s for the same prompt, cut at a stop text.

Request fields (MLflow's ChatParams): `messages`, `max_tokens` (default 64, or the cap if lower),
`temperature` (MLflow's default 1.0: send 0 for greedy), `top_p`, `top_k`, `n` (answers, generated as
one batch), `stop` (a list) and `custom_inputs: {"seed": N}` for reproducible sampling. Fields ChatParams
does not have are dropped by MLflow before the model sees them: OpenAI's `seed` and
`max_completion_tokens` among them (send `max_tokens`). A request may ask for at most
`serving.max_prompts` answers (`n`) and `serving.max_new_tokens` tokens, the caps of params.yaml logged
with the model (its model_config), and a prompt no longer than the model's context; the model refuses
more, and messages in another shape, tools, penalties or streaming, with an INVALID_PARAMETER_VALUE
error: HTTP 400.

Streaming: `predict_stream` gives the answer as ChatCompletionChunks, token by token (pieces that add up
to the whole answer), from Python: `mlflow.pyfunc.load_model(uri).predict_stream({"messages": [...]})`.
`mlflow models serve` cannot stream: its scoring server has the one route POST /invocations and answers
it with `predict`, one JSON body, so a request with `"stream": true` is refused (HTTP 400), not answered
with a body that a streaming client would read as an empty stream.
"""

from __future__ import annotations

import contextlib
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.llm import (ChatChoice, ChatChoiceDelta, ChatChunkChoice, ChatCompletionChunk,
                              ChatCompletionResponse, ChatMessage, ChatParams, TokenUsageStats)

from llm.checkpoint import read_config, require_language_model
from llm.generate import Sampling, TextDecoder, generate_steps, load_for_inference
from llm.instructions import Record, prompt_text, template
from llm.pyfunc import check_request, default_max_new_tokens, serving_limits
from llm.tokenizer import get_tokenizer
from llm.validation import ConfigError, from_mapping

SYSTEM_ROLES = ("system", "developer")
CHAT_SHAPE = ("a chat is an optional system message, then user and assistant messages in turn, ending with "
              "the user message to answer")

# What logging runs the model on (MLflow checks a ChatModel's answer when it logs one): one greedy token.
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 1, "temperature": 0.0,
                 "n": 1, "stream": False}


def refuse(message: str) -> MlflowException:
    """The error for a request the model does not take: HTTP 400 from the scoring server."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def conversation(messages: Sequence[ChatMessage]) -> tuple[str | None, list[Record], Record]:
    """A chat's system message (None: none), its earlier turns (each an instruction and the answer
    given), and the instruction to answer; refused unless it has CHAT_SHAPE, each message with text."""
    if not messages:
        raise refuse(f'a chat request needs "messages", such as [{{"role": "user", "content": "Say hi"}}]: '
                     f"{CHAT_SHAPE}")
    for number, message in enumerate(messages):
        if not isinstance(message.content, str):
            raise refuse(f"messages[{number}] ({message.role}) has no text content: this model reads messages "
                         f"whose content is a string")
    system = messages[0].content if messages[0].role in SYSTEM_ROLES else None
    turns = messages[1:] if system is not None else messages
    first = len(messages) - len(turns)  # the index of the first user message
    for offset, message in enumerate(turns):
        expected = ("user", "assistant")[offset % 2]
        if message.role != expected:
            raise refuse(f"messages[{first + offset}] has role {message.role!r} where a {expected} message "
                         f"belongs: {CHAT_SHAPE}")
    if len(turns) % 2 == 0:  # none, or ending with an assistant message
        raise refuse(f"the chat has no user message to answer at its end: {CHAT_SHAPE}")
    texts = [message.content for message in turns]
    history = [Record(texts[i], "", texts[i + 1]) for i in range(0, len(texts) - 1, 2)]
    return system, history, Record(texts[-1], "", "")


@dataclass
class Answer:
    """One choice of a request as it is generated."""

    decoder: TextDecoder
    tokens: int = 0  # generated so far
    finish_reason: str | None = None  # "stop" or "length" once it ends


@dataclass
class Request:
    """A checked request: its prompt's tokens, how to generate, and its answers once generated."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    n: int
    stop: list[str]
    answers: list[Answer] = field(default_factory=list)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")

    def usage(self) -> TokenUsageStats:
        completion = sum(answer.tokens for answer in self.answers)
        return TokenUsageStats(prompt_tokens=len(self.prompt), completion_tokens=completion,
                               total_tokens=len(self.prompt) + completion)


class ChatGenerator(mlflow.pyfunc.ChatModel):
    def load_context(self, context) -> None:
        checkpoint = Path(context.artifacts["checkpoint"])
        saved = read_config(checkpoint)
        require_language_model(saved, checkpoint)
        self.style = saved.extra.get("prompt_style", "alpaca")
        self.name = f"gpt-{saved.extra.get('stage', 'instruct')}"
        self.model = load_for_inference(checkpoint)  # in fp32: the same answers on whichever CPU serves it
        self.tokenizer = get_tokenizer(saved.tokenizer)
        self.limits = serving_limits(getattr(context, "model_config", None))

    def request(self, messages: Sequence[ChatMessage], params: ChatParams) -> Request:
        """The request checked against the model and its caps: its prompt's tokens and its sampling."""
        if params.tools:
            raise refuse('this model cannot call tools: send the request without "tools"')
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(params, name):
                raise refuse(f"{name} is not supported by this model: leave it out or send 0")
        max_tokens = default_max_new_tokens(self.limits) if params.max_tokens is None else params.max_tokens
        if max_tokens < 1 or params.n < 1:
            raise refuse(f"max_tokens and n must be at least 1, got max_tokens {max_tokens} and n {params.n}")
        check_request(self.limits, params.n, max_tokens, what="choices", tokens_param="max_tokens")
        system, history, last = conversation(messages)
        prompt = self.tokenizer.encode_ordinary(prompt_text(last, self.style, system=system, history=history))
        context_length = self.model.config.context_length
        if len(prompt) > context_length:
            # Cropped to its end, as generate would, the prompt would lose its preamble and first turns.
            raise refuse(f"the conversation's prompt is {len(prompt)} tokens, above this model's context of "
                         f"{context_length}: send fewer or shorter messages")
        settings = {"temperature": float(params.temperature), "top_k": params.top_k or None,
                    "top_p": params.top_p if params.top_p is not None and params.top_p < 1 else None,
                    "seed": (params.custom_inputs or {}).get("seed")}
        try:
            sampling = from_mapping(Sampling, settings, source="the request")
        except ConfigError as exc:
            raise refuse(str(exc)) from None
        return Request(prompt, max_tokens, sampling, params.n, list(params.stop or []))

    def generate(self, request: Request) -> Iterator[tuple[int, str]]:
        """(choice index, text piece) as the answers grow, all decoded as one batch; fills
        `request.answers`."""
        stops = [*template(self.style).stops, *request.stop]
        request.answers = [Answer(TextDecoder(self.tokenizer, stops)) for _ in range(request.n)]
        steps = generate_steps(self.model, [request.prompt] * request.n, request.max_tokens, request.sampling)
        with contextlib.closing(steps):  # leaving early still restores the model's mode
            for next_ids in steps:
                for index, (answer, token) in enumerate(zip(request.answers, next_ids.tolist())):
                    if answer.finish_reason:
                        continue
                    answer.tokens += 1
                    if token == self.tokenizer.eot_token:
                        piece, answer.finish_reason = answer.decoder.finish(), "stop"
                    else:
                        piece = answer.decoder.add(token)
                        answer.finish_reason = "stop" if answer.decoder.stopped else None
                    if piece:
                        yield index, piece
                if all(answer.finish_reason for answer in request.answers):
                    return
        for index, answer in enumerate(request.answers):
            if answer.finish_reason:
                continue
            answer.finish_reason = "length"  # still going after max_tokens
            if piece := answer.decoder.finish():
                yield index, piece

    def predict(self, context, messages: list[ChatMessage], params: ChatParams) -> ChatCompletionResponse:
        if params.stream:
            raise refuse('"stream": true is not served here: `mlflow models serve` answers with one JSON body '
                         '(its scoring server calls predict, never predict_stream); send "stream": false, or '
                         'stream in Python with mlflow.pyfunc.load_model(uri).predict_stream(request)')
        request = self.request(messages, params)
        texts = [""] * request.n
        for index, piece in self.generate(request):
            texts[index] += piece
        choices = [ChatChoice(index=index, message=ChatMessage(role="assistant", content=text),
                              finish_reason=answer.finish_reason)
                   for index, (text, answer) in enumerate(zip(texts, request.answers))]
        return ChatCompletionResponse(choices=choices, usage=request.usage(), id=request.id, model=self.name)

    def predict_stream(self, context, messages: list[ChatMessage],
                       params: ChatParams) -> Iterator[ChatCompletionChunk]:
        request = self.request(messages, params)  # checked before the first chunk: an error, not a stream

        def chunks() -> Iterator[ChatCompletionChunk]:
            for index, piece in self.generate(request):
                delta = ChatChoiceDelta(content=piece)
                yield ChatCompletionChunk(choices=[ChatChunkChoice(index=index, delta=delta)], id=request.id,
                                          model=self.name)
            # The last chunk says why each answer ended, and what the request used.
            ends = [ChatChunkChoice(index=index, delta=ChatChoiceDelta(), finish_reason=answer.finish_reason)
                    for index, answer in enumerate(request.answers)]
            yield ChatCompletionChunk(choices=ends, usage=request.usage(), id=request.id, model=self.name)

        return chunks()


with warnings.catch_warnings():
    # MLflow 3 marks ChatModel deprecated; it is still its chat-completion interface (module docstring).
    warnings.filterwarnings("ignore", message=".*ChatModel.* is deprecated", category=FutureWarning)
    set_model(ChatGenerator())
