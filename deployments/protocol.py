"""The OpenAI wire protocol: typed requests, responses and stream chunks, shared by HTTP and handles.

Requests use `extra="forbid"`: an unknown field is a 400 naming it. They are also `strict`, as OpenAI's schema
is: `"stream": "yes"` is not a boolean, `[true, false]` is not a list of token ids, `"5"` is not an
integer (an integer is still a number for float fields). Text the tokenizer is given (prompt, message
content, stop strings) must be valid Unicode: a lone UTF-16 surrogate, legal in JSON as `"\\ud800"`, is a 400
naming the field rather than an exception inside the tokenizer. Fields OpenAI defines but the engine
does not do yet (chat echo, tools, ...) are declared so the error can say *that* rather than "unknown
field"; a value other than the no-op default fails validation naming the field. Extensions (vLLM's
convention): `priority` (lower = more urgent), `top_k`, `ignore_eos`, `stop_token_ids`,
`repetition_penalty`, `min_tokens`, and structured output's `guided_regex` and `guided_choice` beside OpenAI's
`response_format` (at most one of the three per request).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from engine.choices import MAX_CHOICES
from engine.request import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES, MAX_PENALTY

FinishReason = Literal["stop", "length"]

# The request field that a SamplingParams constraint field comes from (for the 400's `param`).
CONSTRAINT_PARAMS = {"json_schema": "response_format", "regex": "guided_regex", "choice": "guided_choice"}
MAX_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's limit; vLLM's default)
_TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,9}")  # a logit_bias key: a token id in canonical decimal


def _unsupported(field: str, value: Any, hint: str) -> ValueError:
    return ValueError(f"{field}={value!r} is not supported by this server ({hint})")


def check_text(value: str, what: str) -> str:
    """`value` if it is valid Unicode (encodable as UTF-8), else a ValueError naming `what` and the culprit."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        raise ValueError(
            f"{what} contains U+{ord(bad):04X} at character {e.start}, a lone UTF-16 surrogate: "
            "not valid Unicode text"
        ) from None
    return value


REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_CHARS = 256


def check_request_id(value: str) -> str:
    """`value` if it can be a client's request id: 1-256 printable ASCII characters (no spaces or controls:
    it is echoed in a response header and written into log lines), else a ValueError saying why."""
    if not 1 <= len(value) <= MAX_REQUEST_ID_CHARS:
        raise ValueError(f"{REQUEST_ID_HEADER} must be 1-{MAX_REQUEST_ID_CHARS} characters, got {len(value)}")
    bad = next((c for c in value if not "!" <= c <= "~"), None)
    if bad is not None:
        raise ValueError(
            f"{REQUEST_ID_HEADER} must be printable ASCII without spaces; it contains U+{ord(bad):04X}"
        )
    return value


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# --- requests -----------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(default=False, description="Send a last chunk with `usage` and no choices.")


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema` (OpenAI's shape). The output is generated to validate against `schema`,
    whatever `strict` says."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="The schema's name (OpenAI's rule: 1-64 of "
                      "a-z, A-Z, 0-9, _ and -).")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="A JSON schema (an object).")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: `text` (no constraint), `json_object` (any JSON object) or `json_schema`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format.json_schema is required with type 'json_schema' and only then")
        return self


class _SamplingFields(BaseModel):
    """Fields common to completions and chat, with OpenAI's ranges and types (strict: no coercion)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(
        default=None, description="Served model id; None means the one this server serves."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy. OpenAI's default is 1.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = Field(
        default=None, description="Up to 4 strings; the text stops before them."
    )
    user: str | None = Field(default=None, description="Accepted for compatibility; not used.")
    presence_penalty: float = Field(
        default=0.0, ge=-MAX_PENALTY, le=MAX_PENALTY,
        description="Subtracted from the logit of every token already in the output (-2 to 2).",
    )
    frequency_penalty: float = Field(
        default=0.0, ge=-MAX_PENALTY, le=MAX_PENALTY,
        description="Subtracted from a token's logit once per time it is already in the output (-2 to 2).",
    )
    logit_bias: dict[str, float] | None = Field(
        default=None,
        description="Token id (a decimal string) -> bias added to its logit (-100 to 100); at most 300 entries.",
    )
    n: int = Field(
        default=1, ge=1, le=MAX_CHOICES,
        description=f"Choices to generate (1-{MAX_CHOICES}), each its own seed stream: with `seed` s, choice i "
        "samples with seed s + i. The prompt is computed once; each choice counts against the server's "
        "admission limit.",
    )
    # Extensions.
    priority: int = Field(
        default=0,
        description="Scheduling priority: lower value = more urgent (vLLM's convention). The server bounds it "
        "to [server.priority_min, server.priority_max].",
    )
    top_k: int = Field(default=0, ge=0, description="0 = off.")
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    repetition_penalty: float = Field(
        default=1.0, gt=0.0, allow_inf_nan=False,
        description="vLLM's: a token of the prompt or the output has a positive logit divided by it, a negative "
        "one multiplied; 1 = off.",
    )
    min_tokens: int = Field(
        default=0, ge=0, description="vLLM's: EOS and stop_token_ids cannot end the output before this many tokens."
    )
    # Structured output: at most one of these three.
    response_format: ResponseFormat | None = Field(
        default=None, description="OpenAI's: json_object or json_schema constrain the output to valid JSON."
    )
    guided_regex: str | None = Field(default=None, description="vLLM's: the whole output matches this regex.")
    guided_choice: list[str] | None = Field(
        default=None, min_length=1, description="vLLM's: the output is exactly one of these strings."
    )
    timeout: float | None = Field(
        default=None,
        gt=0.0,
        description="Seconds this request may take (capped by the server's `request_timeout_s`). When it "
        "passes, the request ends with finish_reason 'length' and a `warning` saying so.",
    )

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(v)}")
        for key, bias in v.items():
            if not _TOKEN_ID.fullmatch(key):
                shown = key if len(key) <= 24 else key[:24] + "..."
                raise ValueError(f"logit_bias keys must be token ids written as decimal integers, got {shown!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:  # NaN fails too
                raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                 f"got {bias!r} for token {key}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4:
            raise ValueError(f"stop takes at most 4 strings, got {len(items)}")
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        for s in items:
            check_text(s, "a stop string")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v and any(t < 0 for t in v):
            raise ValueError(f"stop_token_ids must be non-negative, got {v}")
        return v

    @field_validator("guided_regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        return check_text(v, "guided_regex") if v is not None else v

    @field_validator("guided_choice")
    @classmethod
    def _choices(cls, v: list[str] | None) -> list[str] | None:
        for c in v or ():
            if not c:
                raise ValueError("guided_choice strings must not be empty")
            check_text(c, "a guided_choice string")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream=true")
        return self

    @model_validator(mode="after")
    def _one_constraint(self) -> _SamplingFields:
        given = [name for name, on in (("response_format", self._json_schema() is not None),
                                       ("guided_regex", self.guided_regex is not None),
                                       ("guided_choice", self.guided_choice is not None)) if on]
        if len(given) > 1:
            raise ValueError(f"give at most one of response_format (json_object, json_schema), guided_regex and "
                             f"guided_choice; got {' and '.join(given)}")
        return self

    def _json_schema(self) -> str | None:
        """`response_format`'s schema as JSON text (json_object: any object); None for text or none."""
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        return json.dumps(rf.json_schema.schema_) if rf.json_schema is not None else '{"type": "object"}'

    def constraint(self) -> dict[str, Any]:
        """The structured-output constraint as SamplingParams fields (`CONSTRAINT_PARAMS` maps them back)."""
        schema = self._json_schema()
        if schema is not None:
            return {"json_schema": schema}
        if self.guided_regex is not None:
            return {"regex": self.guided_regex}
        if self.guided_choice is not None:
            return {"choice": tuple(self.guided_choice)}
        return {}

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def logit_bias_ids(self) -> dict[int, float]:
        """`logit_bias` keyed by token id (the keys are checked to be decimal integers)."""
        return {int(key): bias for key, bias in (self.logit_bias or {}).items()}

    def prompt_logprobs_count(self) -> int | None:
        """How many alternatives each prompt token's logprob comes with; None: no prompt logprobs asked."""
        return None

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def choices_to_generate(self) -> int:
        """How many choices the engine generates: `n` (completions' `best_of` may ask for more)."""
        return self.n

    def choices_param(self) -> str:
        """The field that sets `choices_to_generate()`, for a 400 about it."""
        return "n"


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="One prompt: a string or a list of token ids (a list of one of either is accepted)."
    )
    echo: bool = Field(
        default=False,
        description="Put the prompt before the completion in the choice's text; with `logprobs`, the prompt "
        "tokens' logprobs come first too (the first token's null). With max_tokens=0: only the prompt.",
    )
    max_tokens: int | None = Field(
        default=16, ge=0, description="OpenAI's default is 16; null means 16 too. 0 only with echo (score the prompt)."
    )
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS,
        description="Return each token's logprob with its `logprobs` most likely alternatives (0-20).",
    )
    best_of: int | None = Field(
        default=None, ge=1, le=MAX_CHOICES,
        description="Generate this many choices (>= n) and return the n with the highest cumulative logprob "
        "(of the sampled tokens under the raw logits), best first; not with stream=true.",
    )
    # Not supported yet.
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(
        cls, v: str | list[int] | list[str] | list[list[int]]
    ) -> str | list[int] | list[str] | list[list[int]]:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise _unsupported("prompt", f"<{len(v)} prompts>", "one prompt per request")
        if v == [] or v == "" or v == [""] or v == [[]]:
            raise ValueError("prompt must not be empty")
        for text in [v] if isinstance(v, str) else [p for p in v if isinstance(p, str)]:
            check_text(text, "the prompt")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _zero_only_with_echo(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens=0 generates nothing: it is only allowed with echo=true (to score the prompt)")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if v is None or v == n:
            return v
        if v < n:
            raise ValueError(f"best_of ({v}) must be >= n ({n})")
        if info.data.get("stream"):
            raise ValueError(f"best_of ({v}) > n ({n}) is not supported with stream=true: which choices are the "
                             "best is known only once all have finished")
        return v

    def choices_to_generate(self) -> int:
        return max(self.n, self.best_of or 1)

    def choices_param(self) -> str:
        return "best_of" if self.choices_to_generate() > self.n else "n"

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise _unsupported("suffix", v, "insertion is not implemented")
        return v

    def single_prompt(self) -> str | list[int]:
        """The one prompt, unwrapped from a list of one."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]

    def logprobs_count(self) -> int | None:
        """How many alternatives each token's logprob comes with; None: no logprobs asked."""
        return self.logprobs

    def prompt_logprobs_count(self) -> int | None:
        """echo with logprobs: the prompt tokens' logprobs too, with as many alternatives; None: not asked."""
        return self.logprobs if self.echo else None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _valid_text(cls, v: str) -> str:
        return check_text(v, "the text")


class ChatMessage(BaseModel):
    """One chat message. Only text content; fields the openai client echoes back from a response
    (refusal, annotations, audio, tool_calls, function_call) are accepted when empty."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any | None = None
    tool_calls: list[Any] | None = None
    function_call: Any | None = None

    @field_validator("content")
    @classmethod
    def _valid_content(cls, v: str | list[TextPart] | None) -> str | list[TextPart] | None:
        return check_text(v, "the content") if isinstance(v, str) else v

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise _unsupported("tool_calls", "<...>", "tools are not implemented")
        return v

    @field_validator("function_call", "audio")
    @classmethod
    def _not_set(cls, v: Any, info: Any) -> Any:
        if v is not None:
            raise _unsupported(info.field_name, "<...>", "not implemented")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions. The prompt is the tokenizer's chat template over `messages`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Default: the server's default_max_tokens, capped by the context left.",
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="OpenAI's newer name for max_tokens."
    )
    logprobs: bool = Field(default=False, description="Return the logprob of each output token.")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS,
        description="With logprobs=true: also the most likely alternatives at each position (0-20).",
    )
    # Not supported yet.
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    echo: bool = False  # vLLM's chat extension (the last message before the reply): not supported

    @field_validator("echo")
    @classmethod
    def _no_chat_echo(cls, v: bool) -> bool:
        if v:
            raise _unsupported("echo", v, "chat completions do not echo; /v1/completions does, with a prompt "
                               "(POST /tokenize with these messages gives the templated prompt's token ids)")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs=true")
        return v

    @field_validator("tools", "functions")
    @classmethod
    def _tools(cls, v: list[Any] | None, info: Any) -> list[Any] | None:
        if v:
            raise _unsupported(info.field_name, "<...>", "tool calling is not implemented")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _tool_choice(cls, v: Any, info: Any) -> Any:
        if v is not None and v != "none":
            raise _unsupported(info.field_name, v, "tool calling is not implemented")
        return v

    @model_validator(mode="after")
    def _max_tokens_agree(self) -> ChatCompletionRequest:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError(
                f"max_tokens ({self.max_tokens}) and max_completion_tokens ({self.max_completion_tokens}) disagree"
            )
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_count(self) -> int | None:
        """How many alternatives each token's logprob comes with; None: no logprobs asked."""
        return (self.top_logprobs or 0) if self.logprobs else None


GenerateRequest = CompletionRequest | ChatCompletionRequest


class TokenizeCompletionRequest(BaseModel):
    """POST /tokenize with a prompt (vLLM's shape): its token ids exactly as /v1/completions would see them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str

    @field_validator("prompt")
    @classmethod
    def _valid_prompt(cls, v: str) -> str:
        return check_text(v, "the prompt")


class TokenizeChatRequest(BaseModel):
    """POST /tokenize with messages (vLLM's shape): the chat template over them, tokenized as
    /v1/chat/completions would."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = Field(default=True, description="End with the assistant turn's opening.")


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's shape): token ids back to text. Ids outside the vocabulary are a 400."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


# --- responses ----------------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """A completion choice's logprobs (OpenAI's legacy shape): one entry per token in each list."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token (nothing precedes it)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="Where each token starts in the choice's text (characters).")


class _Warned(BaseModel):
    """A response that may carry a `warning` (a request cut short by its deadline); absent when there is none."""

    warning: str | None = None

    @model_serializer(mode="wrap")
    def _drop_no_warning(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("warning") is None:
            data.pop("warning", None)
        return data


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionResponse(_Warned):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(CompletionResponse):
    """One SSE chunk of a streamed completion (OpenAI uses the same object name for chunks)."""


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="The token's text as UTF-8 bytes.")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The most likely tokens at this position, best first.")


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(_Warned):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends `{"content": "x"}`, not `{"role": null, "content": "x"}`; the final delta is `{}`.
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Warned):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


GenerateResponse = CompletionResponse | ChatCompletionResponse
StreamChunk = CompletionStreamResponse | ChatCompletionChunk


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "baton"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class EngineStatus(BaseModel):
    """GET /stats and the handle's `engine_status()`: the engine's live view (not part of OpenAI's API)."""

    healthy: bool
    model: str
    replica: str = Field(description="The engine replica that answered (its Serve replica id).")
    node_id: str | None = Field(default=None, description="The Ray node that replica runs on.")
    pid: int | None = Field(default=None, description="That replica's process id.")
    metrics: dict[str, float]
    config: dict[str, Any] = Field(description="The engine config in force, live knobs included.")
