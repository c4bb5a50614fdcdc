from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterInfo(_message.Message):
    __slots__ = ("name", "rank", "target_modules", "size_bytes", "source", "pinned", "resident", "base_model")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    size_bytes: int
    source: str
    pinned: bool
    resident: bool
    base_model: str
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., size_bytes: _Optional[int] = ..., source: _Optional[str] = ..., pinned: _Optional[bool] = ..., resident: _Optional[bool] = ..., base_model: _Optional[str] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("name", "path", "pin")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    pin: bool
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., pin: _Optional[bool] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("adapter", "weight", "examples")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    weight: float
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    def __init__(self, adapter: _Optional[str] = ..., weight: _Optional[float] = ..., examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ...) -> None: ...

class Recipe(_message.Message):
    __slots__ = ("method", "sources", "parameters", "options", "rank", "seed", "examples", "raw")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    method: str
    sources: _containers.RepeatedCompositeFieldContainer[Source]
    parameters: _containers.ScalarMap[str, float]
    options: _containers.ScalarMap[str, str]
    rank: int
    seed: int
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    raw: bool
    def __init__(self, method: _Optional[str] = ..., sources: _Optional[_Iterable[_Union[Source, _Mapping]]] = ..., parameters: _Optional[_Mapping[str, float]] = ..., options: _Optional[_Mapping[str, str]] = ..., rank: _Optional[int] = ..., seed: _Optional[int] = ..., examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., raw: _Optional[bool] = ...) -> None: ...

class ModuleReport(_message.Message):
    __slots__ = ("path", "rank", "energy_kept", "relative_error")
    PATH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ENERGY_KEPT_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    path: str
    rank: int
    energy_kept: float
    relative_error: float
    def __init__(self, path: _Optional[str] = ..., rank: _Optional[int] = ..., energy_kept: _Optional[float] = ..., relative_error: _Optional[float] = ...) -> None: ...

class ComposeAdapterRequest(_message.Message):
    __slots__ = ("name", "recipe", "pin")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    recipe: Recipe
    pin: bool
    def __init__(self, name: _Optional[str] = ..., recipe: _Optional[_Union[Recipe, _Mapping]] = ..., pin: _Optional[bool] = ...) -> None: ...

class ComposeAdapterResponse(_message.Message):
    __slots__ = ("adapter", "report")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    report: _containers.RepeatedCompositeFieldContainer[ModuleReport]
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ..., report: _Optional[_Iterable[_Union[ModuleReport, _Mapping]]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Messages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("adapter", "recipe", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    recipe: Recipe
    prompt: str
    messages: Messages
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapter: _Optional[str] = ..., recipe: _Optional[_Union[Recipe, _Mapping]] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[Messages, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "usage")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    usage: Usage
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class Example(_message.Message):
    __slots__ = ("input", "target")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    input: str
    target: str
    def __init__(self, input: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("adapter", "recipe", "examples", "raw")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    recipe: Recipe
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    raw: bool
    def __init__(self, adapter: _Optional[str] = ..., recipe: _Optional[_Union[Recipe, _Mapping]] = ..., examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., raw: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("log_likelihood", "target_tokens", "mean_loss")
    LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    log_likelihood: _containers.RepeatedScalarFieldContainer[float]
    target_tokens: _containers.RepeatedScalarFieldContainer[int]
    mean_loss: float
    def __init__(self, log_likelihood: _Optional[_Iterable[float]] = ..., target_tokens: _Optional[_Iterable[int]] = ..., mean_loss: _Optional[float] = ...) -> None: ...

class ExportAdapterRequest(_message.Message):
    __slots__ = ("name", "path", "dtype", "overwrite")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    dtype: str
    overwrite: bool
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., dtype: _Optional[str] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class ExportAdapterResponse(_message.Message):
    __slots__ = ("path", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class BakeModelRequest(_message.Message):
    __slots__ = ("adapter", "output_path", "dtype", "max_shard_bytes", "overwrite")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_SHARD_BYTES_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    output_path: str
    dtype: str
    max_shard_bytes: int
    overwrite: bool
    def __init__(self, adapter: _Optional[str] = ..., output_path: _Optional[str] = ..., dtype: _Optional[str] = ..., max_shard_bytes: _Optional[int] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class BakeModelProgress(_message.Message):
    __slots__ = ("bytes_done", "bytes_total", "manifest_json")
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    bytes_done: int
    bytes_total: int
    manifest_json: str
    def __init__(self, bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class SearchWeightsRequest(_message.Message):
    __slots__ = ("adapters", "examples", "budget", "optimizer", "seed", "l1", "output_name", "parallel", "raw", "pin", "method", "per", "lr", "bound", "batch_size")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    L1_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PER_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedScalarFieldContainer[str]
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    budget: int
    optimizer: str
    seed: int
    l1: float
    output_name: str
    parallel: int
    raw: bool
    pin: bool
    method: str
    per: str
    lr: float
    bound: float
    batch_size: int
    def __init__(self, adapters: _Optional[_Iterable[str]] = ..., examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., budget: _Optional[int] = ..., optimizer: _Optional[str] = ..., seed: _Optional[int] = ..., l1: _Optional[float] = ..., output_name: _Optional[str] = ..., parallel: _Optional[int] = ..., raw: _Optional[bool] = ..., pin: _Optional[bool] = ..., method: _Optional[str] = ..., per: _Optional[str] = ..., lr: _Optional[float] = ..., bound: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class SearchWeightsProgress(_message.Message):
    __slots__ = ("evaluations", "best_loss", "best_weights", "adapter")
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    BEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    BEST_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    evaluations: int
    best_loss: float
    best_weights: _containers.RepeatedScalarFieldContainer[float]
    adapter: AdapterInfo
    def __init__(self, evaluations: _Optional[int] = ..., best_loss: _Optional[float] = ..., best_weights: _Optional[_Iterable[float]] = ..., adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...
