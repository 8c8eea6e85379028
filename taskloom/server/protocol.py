"""OpenAI protocol: request bodies of /v1/completions and /v1/chat/completions as pydantic
models, and of vLLM's /tokenize and /detokenize.

Fields and defaults follow OpenAI's API reference; the usual engine extensions (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, return_token_ids) are accepted in the body as
vLLM accepts them, and `merged_adapters` serves a request with a mix of loaded LoRA adapters
(as LoRAX does). `return_token_ids` adds the prompt's and each choice's token ids to the
response (each chunk's new ids when streaming): what a client of a model without a tokenizer
(random weights), or one that trains on the exact tokens, needs. Structured outputs come as
OpenAI's `response_format` (json_object, json_schema) or as vLLM's `structured_outputs`
({"json" | "regex" | "choice" | "grammar" | "json_object": ...}) and its older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`; one of them at most. A chat may end on an
assistant message for the model to continue (vLLM's `continue_final_message`, with
`add_generation_prompt` false): a reply's prefill.
Types are strict (a string is not a number); ranges are checked by SamplingParams, so the
rules live in one place. Unknown fields are ignored, as OpenAI-compatible servers do.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from taskloom.sampling_params import InvalidParameter, SamplingParams, StructuredOutputs

TokenIds = list[StrictInt]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class MergedAdapters(_Body):
    """Serve the request with loaded adapters merged: {name: weight} by `method` (linear,
    ties, dare_linear) with PEFT's semantics; checked by the engine's MergeSpec."""

    adapters: Annotated[dict[StrictStr, float], Field(min_length=1)]
    method: StrictStr = "linear"
    density: float = 1.0
    majority_sign_method: StrictStr = "total"
    seed: int = 0


class LoadLoRAAdapterRequest(_Body):
    """Body of POST /v1/load_lora_adapter (vLLM's)."""

    lora_name: StrictStr
    lora_path: StrictStr


class UnloadLoRAAdapterRequest(_Body):
    """Body of POST /v1/unload_lora_adapter (vLLM's)."""

    lora_name: StrictStr


class JsonSchemaFormat(_Body):
    name: StrictStr | None = None
    description: StrictStr | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Body):
    """OpenAI's response_format: plain text, any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(_Body):
    """vLLM's structured_outputs: exactly one constraint (checked by StructuredOutputs)."""

    json_: dict[str, Any] | StrictStr | None = Field(default=None, alias="json")
    json_object: StrictBool = False
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None


class _SamplingFields(_Body):
    """Fields that both endpoints share."""

    model: StrictStr
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # extensions
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    return_token_ids: bool = False
    merged_adapters: MergedAdapters | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None

    def structured(self) -> StructuredOutputs | None:
        """The body's constraint on the output, from whichever field gives one; raises
        InvalidParameter when several do or one is malformed."""
        given: list[tuple[str, StructuredOutputs]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            given.append(("response_format", StructuredOutputs(json_object=True)))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise InvalidParameter("response_format", "response_format of type "
                                       "json_schema needs json_schema.schema")
            given.append(("response_format", StructuredOutputs(json=rf.json_schema.json_schema)))
        so = self.structured_outputs
        if so is not None:
            given.append(("structured_outputs", StructuredOutputs(
                json=so.json_, json_object=so.json_object, regex=so.regex, choice=so.choice,
                grammar=so.grammar)))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"),
                           ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                given.append((name, StructuredOutputs(**{kind: value})))
        if len(given) > 1:
            raise InvalidParameter(given[1][0], "give one structured output at most, got "
                                   f"{', '.join(n for n, _ in given)}")
        return given[0][1] if given else None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None,
                        tool_constraint: StructuredOutputs | None = None) -> SamplingParams:
        """SamplingParams for one prompt; raises ValueError naming a bad value.
        `tool_constraint` is what a chat's tool_choice holds the output to."""
        structured = self.structured()
        if tool_constraint is not None:
            if structured is not None:
                raise InvalidParameter("tool_choice", "tool_choice \"required\" or a named "
                                       "function cannot be combined with another structured "
                                       "output (response_format, structured_outputs, guided_*)")
            structured = tool_constraint
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            structured_outputs=structured)


class CompletionRequest(_SamplingFields):
    """Body of POST /v1/completions."""

    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (each text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)        # type: ignore[arg-type]


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Body):
    name: StrictStr
    arguments: StrictStr


class ToolCall(_Body):
    """A call the assistant made, in a conversation sent back with its result."""

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict[str, Any]:
        """As chat templates expect it: arguments as an object where they parse as one."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except json.JSONDecodeError:
            arguments = self.function.arguments
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": arguments}}


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template reads it (developer is OpenAI's new system)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text()}
        if self.tool_calls:     # content "" rather than null: templates read it as text
            message["tool_calls"] = [c.for_template() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(_Body):
    name: Annotated[StrictStr, Field(min_length=1)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(_SamplingFields):
    """Body of POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    # extensions (vLLM's)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as the chat template expects them."""
        return [m.for_template() for m in self.messages]

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class TokenizeCompletionRequest(_Body):
    """Body of POST /tokenize with a prompt (vLLM's)."""

    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChatRequest(_Body):
    """Body of POST /tokenize with messages, rendered as /v1/chat/completions renders them
    (vLLM's: the template writes any special tokens, so none are added by default)."""

    model: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    return_token_strs: StrictBool = False
    tools: list[Tool] | None = None

    def conversation(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]


class DetokenizeRequest(_Body):
    """Body of POST /detokenize (vLLM's)."""

    model: StrictStr | None = None
    tokens: TokenIds
